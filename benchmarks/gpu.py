"""GPU rollouts and GRPO train steps of a ~2B-shaped random model in bf16: `model.attention=cudnn` vs `xla`.

For a lent GPU (`device` tool; one command, about 5 minutes on an H200). The model: Qwen2-Audio's audio tower
(32 layers, width 1280) and a Qwen2-1.5B-shaped decoder (28 layers, width 1536, 12 heads, 2 KV heads, MLP 8960,
Qwen2-Audio's 156032-token vocabulary, untied head): 2.2B parameters, random N(0, 0.02) weights.

- Parity: the grouped log-probs (prompt once + G completions, packed under cuDNN) of both implementations.
- Rollouts: 8 prompts (10 s clip = 250 audio slots + 120 text tokens = 370 tokens) x G=6 x 128 new tokens,
  temperature 1, no EOS, from the bf16 rollout weights (`steps.cast_to_compute_dtype`). Tokens/s; decode ms per
  step = (time at N new tokens - time at 1) / (N - 1); the achieved HBM bandwidth of a decode step = (the
  decoder's and head's bf16 weights + the prompt KV + the own KV slots up to the last filled 64-slot chunk) / its
  time, as a fraction of `--peak-tbs` (H200: 4.8 TB/s). Decode ms per step at 512 vs 128 new tokens. Decode steps
  are XLA einsums under every implementation (a kernel serves the prefill), so they are timed once.
- Train step: reference log-probs + `make_grpo_update` (AdamW, clip 1.0, fp32 params, bf16 compute, remat) on
  4 prompts x G=8 completions of 64..128 tokens; completion tokens/s.
Every timing is the median of `--repeats` after a warm-up, cuDNN and XLA interleaved; each line prints
`ratio` = cudnn / xla.

    python benchmarks/gpu.py                  # on the GPU
    python benchmarks/gpu.py --quick          # tiny model, xla on both sides: the CPU smoke test
"""

from __future__ import annotations

import dataclasses

import common  # noqa: I001  (puts the repo on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emorl_jax.config import QWEN2_AUDIO_7B, TextConfig
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.models.lora import split_trainable
from emorl_jax.models.qwen2 import DECODE_CHUNK
from emorl_jax.rl.sampler import SamplingParams, make_sampler, rollout_keys
from emorl_jax.rl.steps import (cast_to_compute_dtype, init_train_state, make_grpo_update, make_logps_fn,
                                make_optimizer)
from emorl_jax.sharding import make_mesh, param_shardings

GPU_2B = QWEN2_AUDIO_7B.replace(
    text=TextConfig(vocab_size=156032, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False),
    audio=dataclasses.replace(QWEN2_AUDIO_7B.audio, max_source_positions=500),  # a 10 s window
    dtype="bfloat16", param_dtype="float32", remat=True)


def extra_args(p):
    p.add_argument("--peak-tbs", type=float, default=4.8, help="the GPU's peak HBM bandwidth, TB/s (H200: 4.8)")
    p.add_argument("--attention", default="cudnn", help="the implementation compared with xla")


def decode_bytes(cfg, params, prompts: int, group: int, prompt_len: int, new: int) -> float:
    """HBM bytes an average decode step reads at least: the rollout copy's decoder layers, final norm and head (the
    embedding table is gathered, one row per token), the prompt KV once per prompt and each row's own slots up to
    the last filled chunk (`DECODE_CHUNK`), averaged over the `new` steps."""
    text = params["language_model"]
    weights = sum(x.nbytes for part in (text["layers"], text["norm"], params["lm_head"]) for x in jax.tree.leaves(part))
    t = cfg.text
    kv_slot = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 2  # K and V, bf16
    own = np.mean([min(new, -(-(s + 1) // DECODE_CHUNK) * DECODE_CHUNK) for s in range(new)])
    return weights + kv_slot * (prompts * prompt_len + prompts * group * own)


def main():
    args = common.parse_args(__doc__.splitlines()[0], extra_args)
    quick = args.quick
    cfg = common.BENCH.replace(dtype="bfloat16", remat=True) if quick else GPU_2B
    other = "xla" if quick else args.attention  # CPU: no cuDNN, so the smoke run compares xla with itself
    prompts, group, new, long_new, text = (2, 2, 64, 128, 10) if quick else (8, 6, 128, 512, 60)
    print(common.machine_info())
    print(f"devices: {jax.devices()}")
    model = AudioLM(cfg, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    parts = {}  # implementation: (graphdef, params, frozen) of the same weights
    for impl in ("xla", other):
        abstract = nnx.eval_shape(lambda impl=impl: AudioLM(cfg.replace(attention=impl), rngs=nnx.Rngs(0)))
        graphdef = nnx.split(abstract)[0]
        parts[impl] = split_trainable(nnx.merge(graphdef, state), lora=False)
    n_params = sum(x.size for x in jax.tree.leaves(state))
    print(f"model: {n_params / 1e9:.2f}B params, {cfg.audio.num_frames // 100} s audio window, bf16 compute")
    batch = common.audio_prompts(cfg, prompts, text_tokens=text)
    prompt_len = batch["prompt_ids"].shape[1]
    inputs = [batch[k] for k in ("prompt_ids", "prompt_mask", "input_features", "feature_mask")]

    # parity: the grouped log-prob pass
    rng = np.random.default_rng(0)
    comps = rng.integers(cfg.audio_token_index + 1, cfg.text.vocab_size, (prompts * group, new)).astype(np.int32)
    lp_batch = dict(zip(("prompt_ids", "prompt_mask", "input_features", "feature_mask"), inputs),
                    completions=comps, completion_mask=np.ones_like(comps))
    logps = {impl: np.asarray(make_logps_fn(g, group_size=group)(params, frozen, lp_batch))
             for impl, (g, params, frozen) in parts.items()}
    diff = np.abs(logps[other] - logps["xla"])
    print(f"parity ({other} vs xla, grouped log-probs, bf16): max |diff| {diff.max():.3g}, mean {diff.mean():.3g}, "
          f"mean |logp| {np.abs(logps['xla']).mean():.3g}")

    # rollouts from the bf16 copy
    graphdef, params, frozen = parts["xla"]
    rollout = jax.jit(lambda p, f: cast_to_compute_dtype(graphdef, p, f))(params, frozen)
    keys = lambda i: rollout_keys(jax.random.key(i), prompts, group)

    def sampler(impl, n):
        sample = make_sampler(parts[impl][0], group_size=group, eos_ids=(), pad_id=0,
                              params=SamplingParams(max_new_tokens=n, temperature=1.0))
        compiled, compile_s = common.timed(lambda: sample.lower((rollout, frozen), *inputs, keys(0)).compile())
        print(f"compile: sampler {impl} N={n} {compile_s:.1f} s", flush=True)
        return lambda i: jax.block_until_ready(compiled((rollout, frozen), *inputs, keys(i)).tokens)

    # decode steps are XLA einsums under every implementation (only the prefill differs): time them once
    runs = {("xla", n): sampler("xla", n) for n in (1, new, long_new)} | {(other, new): sampler(other, new)}
    med = common.interleaved_medians(runs, args.repeats)
    step_ms = {n: (med[("xla", n)] - med[("xla", 1)]) / (n - 1) * 1e3 for n in (new, long_new)}
    tokens = prompts * group * new
    common.report(f"rollout tokens/s ({other} / xla)", tokens / med[(other, new)], tokens / med[("xla", new)],
                  f"{other} {med[(other, new)] * 1e3:.1f} ms, xla {med[('xla', new)] * 1e3:.1f} ms per batch")
    moved = decode_bytes(cfg, rollout, prompts, group, prompt_len, new)
    achieved = moved / (step_ms[new] / 1e3) / 1e12
    print(f"decode step (N={new}): {step_ms[new]:.3f} ms, >= {moved / 1e9:.2f} GB read, {achieved:.2f} TB/s = "
          f"{achieved / args.peak_tbs:.1%} of peak {args.peak_tbs} TB/s")
    common.report(f"decode ms/step {long_new} vs {new} new tokens (target <= 1.3)", step_ms[long_new], step_ms[new])

    # GRPO train step
    mesh = make_mesh((1, -1, 1))
    train_group, train_new = (2, 16) if quick else (8, 128)
    train_prompts = 2 if quick else 4
    tb = common.grpo_batch(cfg, train_prompts, train_group, train_new, text_tokens=text)
    train_tokens = int(tb["completion_mask"].sum())
    steps = {}
    ref_params = jax.device_put(parts["xla"][1], param_shardings(parts["xla"][1], mesh))
    for impl, (graphdef, params, frozen) in parts.items():
        params = jax.tree.map(jnp.copy, ref_params)  # init_train_state donates its params
        tx = make_optimizer(learning_rate=1e-6, total_steps=1000, warmup_fraction=0.0)
        train_state, shardings = init_train_state(tx, params, mesh)
        logps_fn = make_logps_fn(graphdef, group_size=train_group)
        update = make_grpo_update(graphdef, tx, group_size=train_group, clip_eps=0.2, beta=0.04,
                                  normalization="sequence", state_shardings=shardings)
        holder = {"state": train_state}

        def step(_, holder=holder, logps_fn=logps_fn, update=update, ref_params=ref_params, frozen=frozen):
            ref = logps_fn(ref_params, frozen, tb)
            holder["state"], metrics = update(holder["state"], frozen, {**tb, "ref_logps": ref})
            return jax.block_until_ready(metrics["loss"])

        _, first_s = common.timed(lambda step=step: step(-1))
        print(f"compile + first train step ({impl}): {first_s:.1f} s", flush=True)
        steps[impl] = step
    med = common.interleaved_medians(steps, args.repeats)
    common.report(f"GRPO train step completion tokens/s ({other} / xla)", train_tokens / med[other],
                  train_tokens / med["xla"], f"{other} {med[other] * 1e3:.1f} ms, xla {med['xla'] * 1e3:.1f} ms "
                  f"per step of {train_tokens} tokens")


if __name__ == "__main__":
    main()
