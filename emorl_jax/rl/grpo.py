"""GRPO as pure, jittable jax.numpy functions: group-normalised advantages and the clipped-ratio loss with the
k3 KL penalty to a reference policy (DESIGN.md §5).

Shapes: N completions (rows; G consecutive rows share a prompt), T completion positions. Log-probs are natural
logs per token. The loss comes back as a (numerator, denominator) pair so that gradient accumulation over
micro-batches gives the exact global mean: sum the numerators, sum the denominators, divide once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NORMALIZATIONS = ("sequence", "token")


def group_advantages(rewards: jax.Array, group_size: int, *, std_ddof: int = 0,
                     eps: float = 1e-4) -> tuple[jax.Array, jax.Array]:
    """A_i = (r_i - mean(r)) / (std(r) + eps) within consecutive groups of `group_size` rows.

    rewards [N] -> (advantages [N] float, group_is_uniform [N] bool). Rows of a group whose rewards are all
    equal get an advantage of exactly 0 (the float mean of equal values need not equal them) and are flagged
    so the caller can drop them from the loss (otherwise they would still feel the KL pull).
    `std_ddof` 0 is the population std (the paper's reading); TRL and tunix use 1.
    """
    rewards = jnp.asarray(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [N], got shape {rewards.shape}")
    n = rewards.shape[0]
    if group_size < 1 or n % group_size:
        raise ValueError(f"group_advantages: {n} rewards do not split into groups of {group_size}")
    if std_ddof < 0 or std_ddof >= group_size:
        raise ValueError(f"group_advantages: std_ddof={std_ddof} needs 0 <= ddof < group_size={group_size}")
    r = rewards.astype(jnp.promote_types(rewards.dtype, jnp.float32)).reshape(n // group_size, group_size)
    mean = r.mean(axis=1, keepdims=True)
    std = r.std(axis=1, ddof=std_ddof, keepdims=True)
    uniform = jnp.broadcast_to(r.max(axis=1, keepdims=True) == r.min(axis=1, keepdims=True), r.shape)
    advantages = jnp.where(uniform, 0.0, (r - mean) / (std + eps))
    return advantages.reshape(n), uniform.reshape(n)


def k3_kl(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
    """Per-token k3 estimator of KL(pi || pi_ref): exp(x) - x - 1 with x = ref - logp, in the inputs' dtype.

    Written as expm1(x) - x: expm1 rounds to a neighbour of the exact value, which exceeds x, so the
    difference is >= 0 in floating point (exp(x) - 1 - x cancels and can go negative for small x).
    """
    x = ref_logps - logps
    return jnp.expm1(x) - x


def grpo_loss(logps: jax.Array, old_logps: jax.Array, ref_logps: jax.Array, advantages: jax.Array,
              completion_mask: jax.Array, *, clip_eps: float = 0.2, beta: float = 0.04,
              normalization: str = "sequence",
              sequence_weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The GRPO objective as (loss_sum, denominator, metric sums); the loss is loss_sum / denominator.

    logps, old_logps, ref_logps [N, T]: per-token log-probs under the policy being trained, the policy that
    sampled, and the reference. advantages [N]. completion_mask [N, T] in {0, 1}. sequence_weights [N] in
    {0, 1} (default all 1) drops rows (uniform-reward groups, truncated completions) from numerator and
    denominator alike. Per kept token: rho = exp(logp - old), surrogate = min(rho A, clip(rho, 1-eps, 1+eps) A),
    term = -(surrogate - beta * k3_kl(logp, ref)).
      "sequence": loss_sum = sum_i (1/|o_i|) sum_t term, denominator = number of kept rows with |o_i| > 0.
      "token":    loss_sum = sum_i sum_t term,            denominator = number of kept tokens.
    Masked tokens and dropped rows get exactly zero gradient, whatever values (inf, NaN) they hold.
    Computed in at least float32. Metrics are sums over kept tokens, additive across micro-batches:
    "tokens", "rows" (kept), "clipped_sum" (tokens where the clip is active: rho < 1-eps with A < 0 or
    rho > 1+eps with A > 0), "kl_sum", "neg_logp_sum", "ratio_sum"; `metric_means` turns them into means.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"grpo_loss: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    shape = logps.shape
    if len(shape) != 2 or any(x.shape != shape for x in (old_logps, ref_logps, completion_mask)):
        raise ValueError("grpo_loss: logps, old_logps, ref_logps and completion_mask must share one [N, T] shape, "
                         f"got {[x.shape for x in (logps, old_logps, ref_logps, completion_mask)]}")
    if advantages.shape != shape[:1]:
        raise ValueError(f"grpo_loss: advantages must be [N]={shape[:1]}, got {advantages.shape}")
    dtype = jnp.promote_types(logps.dtype, jnp.float32)
    weights = jnp.ones(shape[:1], dtype) if sequence_weights is None else sequence_weights.astype(dtype)
    if weights.shape != shape[:1]:
        raise ValueError(f"grpo_loss: sequence_weights must be [N]={shape[:1]}, got {weights.shape}")

    valid = (completion_mask > 0) & (weights[:, None] > 0)
    # Replace masked entries before any arithmetic so their gradient is exactly zero (no 0 * inf = NaN).
    safe = lambda x: jnp.where(valid, x.astype(dtype), 0.0)
    logp, old, ref = safe(logps), safe(old_logps), safe(ref_logps)
    adv = advantages.astype(dtype)[:, None]

    ratio = jnp.exp(logp - old)
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    surrogate = jnp.minimum(ratio * adv, clipped_ratio * adv)
    kl = k3_kl(logp, ref)
    term = jnp.where(valid, -(surrogate - beta * kl), 0.0)

    valid_f = valid.astype(dtype)
    lengths = valid_f.sum(axis=1)
    if normalization == "sequence":
        per_row = term.sum(axis=1) / jnp.maximum(lengths, 1.0)
        loss_sum = (weights * per_row).sum()
        denominator = (weights * (lengths > 0)).sum()
    else:
        loss_sum = (weights * term.sum(axis=1)).sum()
        denominator = (weights * lengths).sum()

    clip_active = ((ratio < 1.0 - clip_eps) & (adv < 0)) | ((ratio > 1.0 + clip_eps) & (adv > 0))
    token_sum = lambda x: jax.lax.stop_gradient(jnp.where(valid, x, 0.0).sum())
    metrics = {
        "tokens": lengths.sum(),
        "rows": (lengths > 0).astype(dtype).sum(),
        "clipped_sum": token_sum(clip_active.astype(dtype)),
        "kl_sum": token_sum(kl),
        "neg_logp_sum": token_sum(-logp),
        "ratio_sum": token_sum(ratio),
    }
    return loss_sum, denominator, metrics


def metric_means(metrics: dict) -> dict[str, float]:
    """Summed `grpo_loss` metrics (one batch or accumulated micro-batches) -> per-token means:
    clip_fraction, kl, entropy_proxy (-mean token log-prob), ratio; plus the kept token and row counts.
    0 where no token was kept."""
    tokens = float(metrics["tokens"])
    mean = lambda key: float(metrics[key]) / tokens if tokens else 0.0
    return {"clip_fraction": mean("clipped_sum"), "kl": mean("kl_sum"), "entropy_proxy": mean("neg_logp_sum"),
            "ratio": mean("ratio_sum"), "kept_tokens": tokens, "kept_rows": float(metrics["rows"])}
