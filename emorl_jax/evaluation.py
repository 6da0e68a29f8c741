"""Greedy evaluation of a model on batches of prompts: decode, parse answers, score, write the outputs.

Used by `python -m emorl_jax.eval` and by the trainer's before/after evaluations.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import numpy as np

from emorl_jax.metrics import compute_metrics, format_table, plot_confusion
from emorl_jax.rl.rewards import parse_completion
from emorl_jax.rl.sampler import SamplingParams, make_sampler, rollout_keys

PROMPT_KEYS = ("prompt_ids", "prompt_mask", "input_features", "feature_mask")


def _pad_rows(batch: dict, rows: int) -> dict:
    """Repeats the last row so every batch has `rows` rows (one compiled shape); padding rows are dropped later."""
    n = len(batch["prompt_ids"])
    if n == rows:
        return batch
    return {k: np.concatenate([v, np.repeat(v[-1:], rows - n, axis=0)]) for k, v in batch.items()}


class GreedyEvaluator:
    """Decodes greedily (the sampler at temperature 0, one rollout per prompt) and parses each answer."""

    def __init__(self, graphdef, tokenizer, *, labels: Sequence[str], mode: str, max_new_tokens: int,
                 batch_size: int):
        self.tokenizer, self.labels, self.mode, self.batch_size = tokenizer, tuple(labels), mode, batch_size
        self.sample = make_sampler(graphdef, group_size=1, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                                   params=SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))

    def predict(self, states: tuple, batches: Iterable[dict]) -> list[dict]:
        """One record per utterance: utt_id, gold, pred (None if unparseable), well_formed, completion."""
        out = []
        keys = rollout_keys(jax.random.key(0), self.batch_size, 1)  # unused by greedy decoding
        for batch in batches:
            n = len(batch["prompt_ids"])
            arrays = _pad_rows({k: batch[k] for k in PROMPT_KEYS}, self.batch_size)
            roll = self.sample(states, *(arrays[k] for k in PROMPT_KEYS), keys)
            tokens, mask = np.asarray(roll.tokens), np.asarray(roll.mask)
            for i in range(n):
                text = self.tokenizer.decode(tokens[i][mask[i].astype(bool)], skip_special_tokens=True)
                parsed = parse_completion(text, self.labels, mode=self.mode)
                out.append({"utt_id": str(batch["utt_id"][i]), "gold": self.labels[int(batch["label"][i])],
                            "pred": parsed.answer, "well_formed": bool(parsed.well_formed), "completion": text,
                            "truncated": bool(roll.truncated[i])})
        return out

    def evaluate(self, states: tuple, batches: Iterable[dict]) -> tuple[list[dict], dict]:
        predictions = self.predict(states, batches)
        metrics = compute_metrics([p["gold"] for p in predictions], [p["pred"] for p in predictions], self.labels)
        metrics["format_rate"] = float(np.mean([p["well_formed"] for p in predictions])) if predictions else 0.0
        return predictions, metrics


def write_outputs(out_dir: str | Path, predictions: list[dict], metrics: dict, labels: Sequence[str],
                  title: str = "") -> None:
    """predictions.jsonl, metrics.json and confusion.png under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "predictions.jsonl").open("w") as f:
        for p in predictions:
            f.write(json.dumps(p) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_confusion(metrics["confusion"], list(labels), out_dir / "confusion.png", title=title or None)


def summary_table(rows: dict[str, dict]) -> str:
    """A printable table of the headline metrics, one row per named evaluation."""
    keys = ("n", "wa", "ua", "weighted_f1", "macro_f1", "invalid_rate", "format_rate")
    return format_table([{"run": name, **{k: m[k] for k in keys if k in m}} for name, m in rows.items()])
