"""Shared benchmark helpers: the benchmark model, a random HF twin converted with `checkpoint.from_hf`, synthetic
audio prompts, median timing and the `name: ours X, reference Y, ratio Z` report lines.

A report's ratio is ours / reference as printed: above 1 is better for rates (tokens/s), below 1 for times.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from emorl_jax.config import TINY, AudioLMConfig  # noqa: E402

# TINY with a 10 s audio window (1000 mel frames -> 250 audio embeddings), Qwen2-Audio's 128 mel bins and an
# untied head (transformers' Qwen2-Audio always keeps a separate lm_head).
BENCH = TINY.replace(audio=dataclasses.replace(TINY.audio, num_mel_bins=128, max_source_positions=500),
                     text=dataclasses.replace(TINY.text, tie_word_embeddings=False))
TEXT_TOKENS = 10  # text tokens on each side of a prompt's audio run


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small shapes and one repeat: a seconds-long smoke run")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up run (median reported)")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.quick:
        args.repeats = 1
    return args


def machine_info(torch_threads: int | None = None) -> str:
    """One line: CPU count and model, load average, library versions, JAX device kind and count."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import flax
    versions = [f"jax {jax.__version__}", f"flax {flax.__version__}"]
    if "torch" in sys.modules:
        import torch
        import transformers
        versions += [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    dev = jax.devices()[0]
    threads = f", torch threads {torch_threads}" if torch_threads else ""
    return (f"machine: {os.cpu_count()} CPUs ({cpu}), load {load()}, {', '.join(versions)}, "
            f"jax device {dev.platform}/{dev.device_kind} x{jax.device_count()}{threads}")


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def median_time(fn: Callable[[int], object], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn(i)` (i = run index, e.g. for fresh PRNG keys); see `interleaved_medians`."""
    return interleaved_medians({"fn": fn}, repeats, warmup)["fn"]


def torch_threads(fn: Callable[[int], object], quick: bool = False) -> dict[int, Callable[[int], object]]:
    """`fn` wrapped to run torch with 1 thread and with one per CPU (only the latter when quick), by thread count."""
    import torch

    def with_threads(n):
        def run(i):
            torch.set_num_threads(n)
            return fn(i)
        return run

    return {n: with_threads(n) for n in ([os.cpu_count()] if quick else sorted({1, os.cpu_count()}))}


def interleaved_medians(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median wall seconds of each `fn(i)` over `repeats` runs (i = run index), timed round-robin (one run of
    each per round) so that a change in machine load hits them alike; `warmup` untimed rounds first (i < 0);
    results waited for with `jax.block_until_ready`."""
    for i in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn(-1 - i))
    times = {k: [] for k in fns}
    for i in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(i))
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    """(result, wall seconds) of one call, waited for."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def report(name: str, ours: float, reference: float, note: str = "") -> None:
    """Prints `name: ours X, reference Y, ratio Z` (Z = X / Y), then an optional note in brackets."""
    tail = f"  [{note}]" if note else ""
    print(f"{name}: ours {ours:.6g}, reference {reference:.6g}, ratio {ours / reference:.3f}{tail}", flush=True)


def make_hf_model(cfg: AudioLMConfig = BENCH, seed: int = 0, std: float = 0.1):
    """A random transformers Qwen2AudioForConditionalGeneration with `cfg`'s shapes and N(0, std) weights
    (larger than the default init, so logits are not ~0)."""
    import torch
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    from emorl_jax.config import to_hf_config

    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(Qwen2AudioConfig(**to_hf_config(cfg))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def to_ours(hf_model, dtype: str = "float32"):
    """The same weights as an AudioLM, through `save_pretrained` and `checkpoint.from_hf`."""
    from emorl_jax import checkpoint

    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        return checkpoint.from_hf(d, dtype=dtype, param_dtype="float32")


def grpo_batch(cfg: AudioLMConfig, prompts: int, group: int, new: int, seed: int = 0,
               text_tokens: int = TEXT_TOKENS) -> dict[str, np.ndarray]:
    """`audio_prompts` plus B*G completions of random length in [new/2, new] (right-padded), advantages, all rows
    kept (weights 1): one GRPO update's batch."""
    rng = np.random.default_rng(seed)
    batch = audio_prompts(cfg, prompts, seed, text_tokens)
    rows = prompts * group
    lengths = rng.integers(new // 2, new + 1, (rows, 1))
    batch.update(completions=rng.integers(cfg.audio_token_index + 1, cfg.text.vocab_size, (rows, new)).astype(np.int32),
                 completion_mask=(np.arange(new)[None] < lengths).astype(np.int32),
                 advantages=rng.normal(size=rows).astype(np.float32), weights=np.ones(rows, np.float32))
    return batch


def audio_prompts(cfg: AudioLMConfig, num_prompts: int, seed: int = 0,
                  text_tokens: int = TEXT_TOKENS) -> dict[str, np.ndarray]:
    """Unpadded prompts, each `text_tokens` text ids, one full-window clip's audio slots, `text_tokens` text ids.

    prompt_ids/prompt_mask [B, T], input_features [B, mel, frames] (N(0, 1) "log-mel"), feature_mask [B, frames].
    """
    rng = np.random.default_rng(seed)
    n_audio, frames = cfg.audio.num_embeddings, cfg.audio.num_frames
    text = lambda: rng.integers(cfg.audio_token_index + 1, cfg.text.vocab_size, text_tokens)
    ids = np.stack([np.concatenate([text(), np.full(n_audio, cfg.audio_token_index), text()])
                    for _ in range(num_prompts)]).astype(np.int32)
    return {"prompt_ids": ids, "prompt_mask": np.ones_like(ids),
            "input_features": rng.normal(size=(num_prompts, cfg.audio.num_mel_bins, frames)).astype(np.float32),
            "feature_mask": np.ones((num_prompts, frames), np.int32)}
