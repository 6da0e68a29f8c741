"""Rollout throughput on a GRPO-shaped workload: our jitted sampler vs transformers `generate`, same random model.

8 prompts, each a 10 s clip (250 audio slots) between 60 + 60 text tokens (the ESR instruction's share: 370-token
prompts), G=6 sampled completions of exactly 128 new tokens (no EOS), temperature 1, no top-k/top-p, on CPU.
Prints tokens/s (generated tokens / wall seconds, median of the repeats after a warm-up; compile time
separately). transformers runs in the same process with the same weights, `num_return_sequences=6` (it repeats
each prompt and its audio G times before its prefill). Torch runs with 1 thread and with one thread per CPU; the
faster is the reference (on a shared machine OpenMP threads can stall badly). Ours and the torch variants are
timed round-robin, so that load changes on a shared machine hit them alike.

    python benchmarks/rollouts.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import os

import common  # noqa: I001  (puts the repo on sys.path)
import jax
import numpy as np
import torch
from flax import nnx

from emorl_jax.rl.sampler import SamplingParams, make_sampler, rollout_keys


def hf_generate_fn(hf, batch, group_size: int, new_tokens: int):
    kw = dict(input_ids=torch.tensor(batch["prompt_ids"]), attention_mask=torch.tensor(batch["prompt_mask"]),
              input_features=torch.tensor(batch["input_features"]),
              feature_attention_mask=torch.tensor(batch["feature_mask"]))

    def run(i):
        torch.manual_seed(i)
        with torch.no_grad():
            out = hf.generate(**kw, do_sample=True, num_return_sequences=group_size, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0)
        assert out.shape == (len(batch["prompt_ids"]) * group_size, batch["prompt_ids"].shape[1] + new_tokens)
        return out.numpy()

    return run


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    prompts, group, new, text = (2, 3, 16, 10) if args.quick else (8, 6, 128, 60)
    cfg = common.BENCH
    print(common.machine_info(torch_threads=os.cpu_count()))
    print(f"setup: {prompts} prompts x G={group}, {new} new tokens, {cfg.audio.num_frames // 100} s audio "
          f"({cfg.audio.num_embeddings} audio slots, prompt {cfg.audio.num_embeddings + 2 * text} "
          f"tokens), tiny model, fp32")
    hf = common.make_hf_model(cfg)
    model = common.to_ours(hf)
    batch = common.audio_prompts(cfg, prompts, text_tokens=text)
    tokens = prompts * group * new

    graphdef, state = nnx.split(model)
    sample = make_sampler(graphdef, group_size=group, eos_ids=(), pad_id=0,
                          params=SamplingParams(max_new_tokens=new, temperature=1.0))
    inputs = [batch[k] for k in ("prompt_ids", "prompt_mask", "input_features", "feature_mask")]
    keys = lambda i: rollout_keys(jax.random.key(i + 100), prompts, group)
    compiled, compile_s = common.timed(lambda: sample.lower((state,), *inputs, keys(0)).compile())
    out = compiled((state,), *inputs, keys(0))
    assert np.asarray(out.mask).all(), "our sampler stopped early"

    torch_fns = common.torch_threads(hf_generate_fn(hf, batch, group, new), args.quick)
    medians = common.interleaved_medians({"ours": lambda i: compiled((state,), *inputs, keys(i)), **torch_fns},
                                         args.repeats)
    ours_s, ref_s = medians["ours"], min(medians[t] for t in torch_fns)
    threads = ", ".join(f"{t} thread(s) {tokens / medians[t]:.0f} tok/s" for t in torch_fns)
    print(f"compile: ours {compile_s:.2f} s (sampler, once); transformers generate has no compile step")
    common.report("rollout tokens/s (CPU, steady state)", tokens / ours_s, tokens / ref_s,
                  f"ours {ours_s * 1e3:.1f} ms, transformers {ref_s * 1e3:.1f} ms per batch; torch {threads}; "
                  f"load {common.load()}")


if __name__ == "__main__":
    main()
