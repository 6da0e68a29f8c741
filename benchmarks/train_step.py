"""GRPO train-step throughput: ours (jitted reference log-probs + `make_grpo_update`) vs plain PyTorch.

One step = reference-policy log-probs (no gradient) + policy log-probs + the GRPO loss (clipped ratio, k3 KL,
sequence normalisation) + backward + global-norm clipping + AdamW, on 4 prompts with a 10 s clip x G=8
completions of up to 64 tokens, the same random tiny model on both sides. The PyTorch side is what a plain
implementation does: transformers' forward on each prompt+completion row (prompt and audio repeated G times),
`torch.autograd`, `torch.nn.utils.clip_grad_norm_` and `torch.optim.AdamW`. Prints completion tokens/s (median
of the repeats after a warm-up; compile time separately) and checks that both compute the same first loss.
Torch runs with 1 thread and with one thread per CPU; the faster is the reference; all are timed round-robin.

    python benchmarks/train_step.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import copy
import os

import common  # noqa: I001  (puts the repo on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
import torch

from emorl_jax.models.lora import split_trainable
from emorl_jax.rl.steps import init_train_state, make_grpo_update, make_logps_fn, make_optimizer
from emorl_jax.sharding import make_mesh, param_shardings

CLIP_EPS, BETA, LR = 0.2, 0.04, 1e-5


def torch_logps(model, b: dict, group: int) -> torch.Tensor:
    """[B*G, N] completion log-probs from transformers' forward on the prompt+completion rows."""
    rep = lambda x: x.repeat_interleave(group, 0)
    t = b["prompt_ids"].shape[1]
    ids = torch.cat([rep(b["prompt_ids"]), b["completions"]], 1)
    mask = torch.cat([rep(b["prompt_mask"]), b["completion_mask"]], 1)
    logits = model(input_ids=ids, attention_mask=mask, input_features=rep(b["input_features"]),
                   feature_attention_mask=rep(b["feature_mask"])).logits[:, t - 1:-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, b["completions"][..., None].long())[..., 0]
    return logp * b["completion_mask"]


def torch_grpo_loss(logp, b: dict) -> torch.Tensor:
    """DESIGN.md §5's loss with sequence normalisation (as `rl.grpo.grpo_loss`)."""
    valid = (b["completion_mask"] > 0) & (b["weights"][:, None] > 0)
    zero = torch.zeros_like(logp)
    logp, old, ref = (torch.where(valid, x, zero) for x in (logp, b["old_logps"], b["ref_logps"]))
    adv = b["advantages"][:, None]
    ratio = torch.exp(logp - old)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - CLIP_EPS, 1 + CLIP_EPS) * adv)
    x = ref - logp
    term = torch.where(valid, -(surrogate - BETA * (torch.expm1(x) - x)), zero)
    lengths = valid.float().sum(1)
    per_row = term.sum(1) / lengths.clamp(min=1.0)
    return (b["weights"] * per_row).sum() / (b["weights"] * (lengths > 0)).sum()


def torch_step_fn(hf, batch: dict, group: int):
    """A closure running one plain-PyTorch GRPO step; returns it and a list collecting the losses."""
    model, ref_model = hf.train(), copy.deepcopy(hf).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    b = {k: torch.from_numpy(v) for k, v in batch.items()}
    losses = []

    def step(_):
        with torch.no_grad():
            b["ref_logps"] = torch_logps(ref_model, b, group)
        loss = torch_grpo_loss(torch_logps(model, b, group), b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())

    return step, losses


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    prompts, group, new = (2, 2, 16) if args.quick else (4, 8, 64)
    cfg = common.BENCH
    print(common.machine_info(torch_threads=os.cpu_count()))
    print(f"setup: {prompts} prompts x G={group}, completions of {new // 2}..{new} tokens, "
          f"{cfg.audio.num_frames // 100} s audio, prompt {cfg.audio.num_embeddings + 2 * common.TEXT_TOKENS} "
          "tokens, tiny model, fp32, AdamW + clip 1.0")
    hf = common.make_hf_model(cfg)
    model = common.to_ours(hf)
    batch = common.grpo_batch(cfg, prompts, group, new)
    tokens = int(batch["completion_mask"].sum())

    mesh = make_mesh((1, -1, 1))
    graphdef, params, frozen = split_trainable(model, lora=False)
    params = jax.device_put(params, param_shardings(params, mesh))  # as emorl_jax.train places them
    ref_params = jax.tree.map(jnp.copy, params)
    logps_fn = make_logps_fn(graphdef, group_size=group)
    # The sampling policy: the current one, perturbed so that the first loss depends on the log-probs (ratios != 1).
    noise = np.random.default_rng(1).normal(0, 0.1, batch["completions"].shape).astype(np.float32)
    batch["old_logps"] = np.asarray(logps_fn(params, frozen, batch)) + noise
    tx = make_optimizer(learning_rate=LR, total_steps=1000, warmup_fraction=0.0)
    state, shardings = init_train_state(tx, params, mesh)
    update = make_grpo_update(graphdef, tx, group_size=group, clip_eps=CLIP_EPS, beta=BETA,
                              normalization="sequence", state_shardings=shardings)
    losses = []

    def ours_step(_):
        nonlocal state
        ref = logps_fn(ref_params, frozen, batch)
        state, metrics = update(state, frozen, {**batch, "ref_logps": ref})
        losses.append(metrics["loss"])
        return state.params

    _, first_s = common.timed(lambda: ours_step(-1))  # trace + compile + one step
    torch_step, torch_losses = torch_step_fn(hf, batch, group)
    torch_fns = common.torch_threads(torch_step, args.quick)
    medians = common.interleaved_medians({"ours": ours_step, **torch_fns}, args.repeats)
    ours_s, ref_s = medians["ours"], min(medians[t] for t in torch_fns)

    first_ours, first_torch = float(losses[0]), torch_losses[0]
    assert abs(first_ours - first_torch) <= 1e-4 * max(1.0, abs(first_torch)), (first_ours, first_torch)
    print(f"first-step loss: ours {first_ours:.7f}, torch {first_torch:.7f}, "
          f"|diff| {abs(first_ours - first_torch):.2g}")
    print(f"compile: ours {first_s - ours_s:.2f} s (first step minus a steady step)")
    threads = ", ".join(f"{t} thread(s) {tokens / medians[t]:.0f} tok/s" for t in torch_fns)
    common.report("GRPO train step completion tokens/s (CPU)", tokens / ours_s, tokens / ref_s,
                  f"ours {ours_s * 1e3:.1f} ms, torch {ref_s * 1e3:.1f} ms per step of {tokens} tokens; "
                  f"torch {threads}; load {common.load()}")


if __name__ == "__main__":
    main()
