"""Rewards for GRPO, pure host-side functions of strings and arrays (DESIGN.md §5): parse a completion,
the format reward, ESWR (emotion similarity-weighted reward), binary accuracy, and their weighted sum.

Completion layouts, one per prompt mode:
  ir   <answer>label</answer>
  eur  <think>…</think><answer>label</answer>
  esr  <think><content>…</content><acoustics>…</acoustics><summary>…</summary></think><answer>label</answer>
Whitespace is allowed between and inside blocks. A completion is well-formed when its tags are exactly the
mode's, each once, in order, every leaf block is non-empty, and nothing but whitespace lies outside the
blocks. Tags are matched literally (lower case, no spaces inside the angle brackets); in "eur" mode the
think block is free text, so a <content>-style tag inside it is an unexpected tag. The caller strips end
tokens (e.g. "<|im_end|>", or decodes with skip_special_tokens): left in, they are text outside the envelope.
The answer is judged apart from the format: it is read from the single <answer>…</answer> block whenever
there is exactly one (even in a malformed completion) and mapped to the label set by
`emotions.normalize_label` ("Joy." -> happy); none, several, or an unknown word give None.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np

from emorl_jax.data.emotions import normalize_label

# Each mode's blocks: a name, or (name, children) for a block made of sub-blocks.
_LAYOUTS: dict[str, tuple] = {
    "ir": ("answer",),
    "eur": ("think", "answer"),
    "esr": (("think", ("content", "acoustics", "summary")), "answer"),
}
MODES = tuple(_LAYOUTS)
_TAG = re.compile(r"<(/?)(think|content|acoustics|summary|answer)>")
ACCURACY_KINDS = ("eswr", "binary")
ALPHA_SCHEDULES = ("constant", "linear_decay")


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A parsed completion. `answer` is a label of the label set or None; `answer_text` the raw (stripped)
    text of the single answer block. `think` and the ESR sections are filled only when well-formed."""
    answer: str | None
    well_formed: bool
    error: str | None = None  # why it is not well-formed; None when it is
    answer_text: str | None = None
    think: str | None = None
    content: str | None = None
    acoustics: str | None = None
    summary: str | None = None


def _expected_tags(mode: str) -> tuple[list[str], set[str]]:
    """The mode's tag sequence and the names of its leaf blocks (those that hold text)."""
    tags, leaves = [], set()

    def walk(block):
        name, children = block if isinstance(block, tuple) else (block, ())
        tags.append(f"<{name}>")
        for child in children:
            walk(child)
        if not children:
            leaves.add(name)
        tags.append(f"</{name}>")

    for block in _LAYOUTS[mode]:
        walk(block)
    return tags, leaves


def _snippet(text: str) -> str:
    text = text.strip()
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _structure_error(text: str, matches: list[re.Match], mode: str) -> str | None:
    """None if the tags and the text between them make exactly the mode's layout, else the first problem."""
    expected, leaves = _expected_tags(mode)
    found = [m.group(0) for m in matches]
    for tag in dict.fromkeys(found):
        if tag not in expected:
            return f"unexpected {tag} in {mode} mode"
        if found.count(tag) > 1:
            return f"{found.count(tag)} {tag} tags"
    for tag in expected:
        if tag not in found:
            return f"missing {tag}"
    for have, want in zip(found, expected):
        if have != want:
            return f"wrong order: {have} where {want} belongs"
    # The tags are now exactly `expected`: check the text between consecutive tags (and at both ends).
    names = [None, *found, None]
    ends, starts = [0, *(m.end() for m in matches)], [*(m.start() for m in matches), len(text)]
    for before, after, segment in zip(names, names[1:], (text[a:b] for a, b in zip(ends, starts))):
        if before is not None and before[1:-1] in leaves:  # the inside of a leaf block, followed by its end tag
            if not segment.strip():
                return f"empty {before} block"
        elif segment.strip():
            where = (f"before {after}" if before is None else f"after {before}" if after is None
                     else f"between {before} and {after}")
            return f"text outside the blocks {where}: {_snippet(segment)}"
    return None


def parse_completion(text: str, labels: Sequence[str], *, mode: str = "esr") -> Parsed:
    """Parses one completion for `mode` ("ir", "eur", "esr"; see the module docstring)."""
    if mode not in _LAYOUTS:
        raise ValueError(f"parse_completion: unknown mode {mode!r}; known: {', '.join(MODES)}")
    matches = list(_TAG.finditer(text))
    opens = [m for m in matches if m.group(0) == "<answer>"]
    closes = [m for m in matches if m.group(0) == "</answer>"]
    answer_text = None
    if len(opens) == 1 and len(closes) == 1 and opens[0].end() <= closes[0].start():
        answer_text = text[opens[0].end():closes[0].start()].strip()
    answer = normalize_label(answer_text, labels) if answer_text is not None else None
    error = _structure_error(text, matches, mode)
    if error is not None:
        return Parsed(answer, False, error, answer_text)
    block = lambda name: _block(text, matches, name)
    if mode == "esr":
        return Parsed(answer, True, None, answer_text, block("think"), block("content"), block("acoustics"),
                      block("summary"))
    return Parsed(answer, True, None, answer_text, block("think") if mode == "eur" else None)


def _block(text: str, matches: list[re.Match], name: str) -> str:
    """The stripped text between the (single) <name> and </name> tags."""
    start = next(m.end() for m in matches if m.group(0) == f"<{name}>")
    end = next(m.start() for m in matches if m.group(0) == f"</{name}>")
    return text[start:end].strip()


def format_reward(parsed: Parsed) -> float:
    """1.0 for an exact structural match of the mode's layout, else 0.0."""
    return 1.0 if parsed.well_formed else 0.0


def accuracy_reward(pred: str | None, gold: str) -> float:
    """Binary exact-match reward (the ablation of ESWR); None (unparsed) earns 0."""
    return 1.0 if pred is not None and pred == gold else 0.0


def _label_indices(values: Sequence[str | None], labels: Sequence[str], what: str, *, strict: bool) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    out = np.array([index.get(v, -1) if v is not None else -1 for v in values], dtype=np.int64)
    if strict and np.any(out < 0):
        bad = values[int(np.argmin(out))]
        raise ValueError(f"{what} label {bad!r} is not in the label set {list(labels)}")
    return out


def eswr_rewards(preds: Sequence[str | None], golds: Sequence[str], similarity: np.ndarray,
                 labels: Sequence[str], *, alpha: float = 1.0, gamma: float = 0.7) -> np.ndarray:
    """ESWR for a batch, float64 [N]: 1 if pred == gold (neutral included), alpha * S[pred, gold] if that
    similarity exceeds gamma, else 0. A None or out-of-set prediction earns 0; a gold outside `labels`
    raises. similarity [L, L] in the order of `labels` (see `emotions.similarity_matrix`)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.shape != (len(labels), len(labels)):
        raise ValueError(f"eswr: similarity matrix has shape {similarity.shape}, expected "
                         f"{(len(labels), len(labels))} for labels {list(labels)}")
    if len(preds) != len(golds):
        raise ValueError(f"eswr: {len(preds)} predictions but {len(golds)} gold labels")
    p = _label_indices(preds, labels, "prediction", strict=False)
    g = _label_indices(golds, labels, "gold", strict=True)
    s = similarity[np.maximum(p, 0), g]
    partial = np.where(s > gamma, alpha * s, 0.0)
    return np.where(p < 0, 0.0, np.where(p == g, 1.0, partial))


def eswr_reward(pred: str | None, gold: str, similarity: np.ndarray, labels: Sequence[str], *,
                alpha: float = 1.0, gamma: float = 0.7) -> float:
    """ESWR of one prediction (see `eswr_rewards`)."""
    return float(eswr_rewards([pred], [gold], similarity, labels, alpha=alpha, gamma=gamma)[0])


def alpha_schedule(step: int, total_steps: int, kind: str = "constant", value: float = 1.0) -> float:
    """ESWR's alpha at `step` of `total_steps`: "constant" (value) or "linear_decay" (value -> 0 linearly)."""
    if kind not in ALPHA_SCHEDULES:
        raise ValueError(f"alpha_schedule: unknown kind {kind!r}; known: {', '.join(ALPHA_SCHEDULES)}")
    if total_steps < 1 or not 0 <= step <= total_steps:
        raise ValueError(f"alpha_schedule: need 0 <= step <= total_steps and total_steps >= 1, "
                         f"got step={step}, total_steps={total_steps}")
    return float(value) if kind == "constant" else float(value) * (1.0 - step / total_steps)


def compute_rewards(completions: Sequence[str], golds: Sequence[str], *, labels: Sequence[str],
                    similarity: np.ndarray | None = None, mode: str = "esr",
                    weights: Mapping[str, float] | None = None, accuracy: str = "eswr", alpha: float = 1.0,
                    gamma: float = 0.7) -> dict[str, np.ndarray]:
    """Rewards of N completions against their gold labels, every piece float64 [N]:
    "total" = weights["format"] * format + weights["accuracy"] * (ESWR or binary accuracy), weights 1 and 1
    by default (the plain sum); "format" (1 = well-formed); "eswr" (accuracy="eswr") or "accuracy"
    (accuracy="binary"); "correct" (exact match); "valid" (an in-set answer was parsed).
    `similarity` [L, L] is needed for ESWR only."""
    if accuracy not in ACCURACY_KINDS:
        raise ValueError(f"compute_rewards: accuracy must be one of {ACCURACY_KINDS}, got {accuracy!r}")
    if len(completions) != len(golds):
        raise ValueError(f"compute_rewards: {len(completions)} completions but {len(golds)} gold labels")
    w = {"format": 1.0, "accuracy": 1.0}
    unknown = set(weights or {}) - set(w)
    if unknown:
        raise ValueError(f"compute_rewards: unknown reward weights {sorted(unknown)}; known: {sorted(w)}")
    w.update(weights or {})
    _label_indices(golds, labels, "gold", strict=True)
    parsed = [parse_completion(text, labels, mode=mode) for text in completions]
    preds = [p.answer for p in parsed]
    out = {
        "format": np.array([format_reward(p) for p in parsed], dtype=np.float64),
        "correct": np.array([accuracy_reward(p, g) for p, g in zip(preds, golds)], dtype=np.float64),
        "valid": np.array([p is not None for p in preds], dtype=np.float64),
    }
    if accuracy == "eswr":
        if similarity is None:
            raise ValueError("compute_rewards: accuracy='eswr' needs a similarity matrix")
        out["eswr"] = eswr_rewards(preds, golds, similarity, labels, alpha=alpha, gamma=gamma)
    else:
        out["accuracy"] = out["correct"].copy()
    out["total"] = w["format"] * out["format"] + w["accuracy"] * out["eswr" if accuracy == "eswr" else "accuracy"]
    return out
