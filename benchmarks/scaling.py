"""Sampler scaling on CPU: decode time per step at 512 vs 128 new tokens, and the group sampler (each prompt prefilled
once, its KV stored once and shared by its G rollouts: group_size=G) vs prefill-per-rollout (each prompt repeated
G times, group_size=1).

Decode ms/step at length N = (T(N) - T(1)) / (N - 1), where T(n) is the median wall time of a whole sampler call
with `max_new_tokens=n` (no EOS, so exactly n steps); T(1) is the prefill (audio encoding, prompt, first token).
The same tiny model and 10 s clips as rollouts.py, 4 prompts x G=8.

    python benchmarks/scaling.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import common  # noqa: I001  (puts the repo on sys.path)
import jax
import numpy as np
from flax import nnx

from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.rl.sampler import SamplingParams, make_sampler, rollout_keys

KEYS = ("prompt_ids", "prompt_mask", "input_features", "feature_mask")


def sampler_seconds(graphdef, state, batch, *, group: int, new: int, repeats: int) -> float:
    """Median seconds of one compiled sampler call (B prompts x `group` rollouts of exactly `new` tokens)."""
    prompts = len(batch["prompt_ids"])
    sample = make_sampler(graphdef, group_size=group, eos_ids=(), pad_id=0,
                          params=SamplingParams(max_new_tokens=new, temperature=1.0))
    inputs = [batch[k] for k in KEYS]
    keys = lambda i: rollout_keys(jax.random.key(i + 100), prompts, group)
    compiled = sample.lower((state,), *inputs, keys(0)).compile()
    return common.median_time(lambda i: compiled((state,), *inputs, keys(i)), repeats)


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    prompts, group = (2, 4) if args.quick else (4, 8)
    # quick: lengths long enough (and 3 repeats) that decoding stands out of the timing noise of a busy machine
    lengths = (32, 64) if args.quick else (128, 256, 512)
    repeats = 3 if args.quick else args.repeats
    cfg = common.BENCH
    print(common.machine_info())
    print(f"setup: {prompts} prompts x G={group}, prompt {cfg.audio.num_embeddings + 2 * common.TEXT_TOKENS} tokens "
          f"({cfg.audio.num_frames // 100} s audio), tiny model, fp32, temperature 1")
    graphdef, state = nnx.split(AudioLM(cfg, rngs=nnx.Rngs(0)))
    batch = common.audio_prompts(cfg, prompts)

    run = lambda n: sampler_seconds(graphdef, state, batch, group=group, new=n, repeats=repeats)
    prefill = run(1)
    per_step, totals = {}, {}
    for n in lengths:
        total = totals[n] = run(n)
        per_step[n] = (total - prefill) / (n - 1) * 1e3
        print(f"length {n}: total {total * 1e3:.1f} ms, decode {per_step[n]:.3f} ms/step "
              f"({per_step[n] / (prompts * group) * 1e3:.1f} us per generated token), load {common.load()}",
              flush=True)
    print(f"prefill (T(1)): {prefill * 1e3:.1f} ms")
    longest, shortest = per_step[lengths[-1]], per_step[lengths[0]]
    common.report(f"decode ms/step at {lengths[-1]} vs {lengths[0]} new tokens", longest / shortest,
                  1.0, "reference 1 = flat; the prompt's KV is fixed, each rollout's own slots span the max length")

    n = lengths[0]
    tiled = totals[n]
    repeated = {k: np.repeat(v, group, axis=0) for k, v in batch.items()}
    per_rollout = sampler_seconds(graphdef, state, repeated, group=1, new=n, repeats=repeats)
    tokens = prompts * group * n
    common.report(f"rollout tokens/s, shared prompt vs prefill per rollout (G={group}, {n} tokens)",
                  tokens / tiled, tokens / per_rollout,
                  f"shared {tiled * 1e3:.1f} ms, per-rollout {per_rollout * 1e3:.1f} ms; load {common.load()}")


if __name__ == "__main__":
    main()
