"""The Qwen2-Audio-7B-Instruct chat prompt, the instructions of the three prompting conditions, SFT targets.

`build_prompt` renders what the model's chat template (tokenizer_config.json of
Qwen/Qwen2-Audio-7B-Instruct; transformers' Qwen2AudioProcessor default) gives for one user turn holding
the audio clips followed by the text, with the generation prompt:

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\nAudio 1: <|audio_bos|><|AUDIO|>×n1<|audio_eos|>\\nAudio 2: ...\\n{text}<|im_end|>\\n
    <|im_start|>assistant\\n

with each `<|AUDIO|>` expanded to the clip's number of audio embeddings, as the processor does.

Prompting conditions (DESIGN §5): "ir" answer only, "eur" free reasoning in <think> then the answer,
"esr" structured reasoning <think><content>…</content><acoustics>…</acoustics><summary>…</summary></think>
then <answer>label</answer>. Targets are written without whitespace between blocks (the canonical form).
"""

from __future__ import annotations

from collections.abc import Sequence

from emorl_jax.errors import ConfigError
from emorl_jax.text.tokenizer import AUDIO_BOS, AUDIO_EOS, AUDIO_TOKEN, IM_END, IM_START, Tokenizer

SYSTEM_PROMPT = "You are a helpful assistant."
MODES = ("ir", "eur", "esr")
_TAGS = ("think", "content", "acoustics", "summary", "answer")


def build_prompt(text: str, *, num_audio_tokens: Sequence[int]) -> str:
    """The chat prompt string for one user turn: clip k gets `num_audio_tokens[k]` `<|AUDIO|>` tokens."""
    if any(int(n) < 1 for n in num_audio_tokens):
        raise ValueError(f"every clip needs >= 1 audio token, got {list(num_audio_tokens)}")
    clips = "".join(f"Audio {k}: {AUDIO_BOS}{AUDIO_TOKEN * int(n)}{AUDIO_EOS}\n"
                    for k, n in enumerate(num_audio_tokens, start=1))
    return (f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n"
            f"{IM_START}user\n{clips}{text}{IM_END}\n"
            f"{IM_START}assistant\n")


def instruction(mode: str, labels: Sequence[str]) -> str:
    """The user text asking for the speaker's emotion among `labels` in the format of `mode`."""
    _check_mode(mode)
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be non-empty and distinct, got {list(labels)}")
    task = ("Identify the emotion of the speaker in the audio. "
            f"Choose exactly one label from: {', '.join(labels)}. ")
    if mode == "ir":
        return task + "Output only the label inside <answer> </answer> tags, e.g. <answer>LABEL</answer>."
    if mode == "eur":
        return task + ("First think about the question inside <think> </think> tags, then output the label "
                       "inside <answer> </answer> tags: <think>...</think><answer>LABEL</answer>.")
    return task + ("Reason step by step inside <think> </think> in three parts: in <content> </content> the "
                   "words and emotionally salient phrases; in <acoustics> </acoustics> the pitch, rhythm, speed, "
                   "volume and voice quality; in <summary> </summary> the two views combined. Then output the "
                   "label inside <answer> </answer> tags. Format: <think><content>...</content><acoustics>..."
                   "</acoustics><summary>...</summary></think><answer>LABEL</answer>.")


def format_target(label: str, mode: str, *, think: str | None = None, content: str | None = None,
                  acoustics: str | None = None, summary: str | None = None) -> str:
    """An SFT target completion in the format of `mode`, ending with the end-of-turn token `<|im_end|>`.

    "ir" takes no reasoning; "eur" needs `think`; "esr" needs `content`, `acoustics` and `summary`.
    Every part must be non-empty and free of the format's tags.
    """
    _check_mode(mode)
    given = {"think": think, "content": content, "acoustics": acoustics, "summary": summary}
    needed = {"ir": (), "eur": ("think",), "esr": ("content", "acoustics", "summary")}[mode]
    extra = [k for k, v in given.items() if v is not None and k not in needed]
    if extra:
        raise ValueError(f"mode {mode!r} takes no {extra}")
    parts = {"answer": label, **{k: given[k] for k in needed}}
    for name, value in parts.items():
        if not value or not value.strip():
            raise ValueError(f"mode {mode!r}: {name} must be a non-empty string, got {value!r}")
        if any(f"<{t}>" in value or f"</{t}>" in value for t in _TAGS) or IM_END in value:
            raise ValueError(f"{name} must not contain format tags or {IM_END}: {value!r}")
    if mode == "esr":
        think = "".join(f"<{k}>{parts[k]}</{k}>" for k in ("content", "acoustics", "summary"))
    reasoning = "" if mode == "ir" else f"<think>{think}</think>"
    return f"{reasoning}<answer>{label}</answer>{IM_END}"


def encode_prompt(tokenizer: Tokenizer, mode: str, labels: Sequence[str],
                  num_audio_tokens: Sequence[int]) -> list[int]:
    """Token ids of `build_prompt(instruction(mode, labels), ...)`; checks each `<|AUDIO|>` stayed one id."""
    ids = tokenizer.encode(build_prompt(instruction(mode, labels), num_audio_tokens=num_audio_tokens))
    found, expected = ids.count(tokenizer.audio_token_id), sum(int(n) for n in num_audio_tokens)
    if found != expected:
        raise ValueError(f"prompt holds {found} audio token ids, expected {expected}: the tokenizer does not "
                         f"keep {AUDIO_TOKEN} atomic")
    return ids


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"prompt_mode: unknown prompting mode {mode!r}; expected one of {MODES}")
