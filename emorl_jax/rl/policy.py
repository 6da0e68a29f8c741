"""Per-token log-probs of completions given their prompts (policy, old policy, reference), and the SFT loss.

Each prompt (and its audio) is embedded once and its embeddings tiled to the G completions that share it.
Only completion positions go through the vocabulary projection.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emorl_jax.models.audio_lm import AudioLM


def completion_logps(model: AudioLM, prompt_ids, prompt_mask, input_features, feature_attention_mask,
                     completions, completion_mask, *, group_size: int, temperature: float = 1.0) -> jax.Array:
    """log p(completion token | prompt, earlier tokens), fp32 [B*G, N]; 0 where completion_mask is 0.

    prompt_ids/prompt_mask [B, T] left-padded; completions/completion_mask [B*G, N] (row b*G + r continues
    prompt b); input_features [clips, mel, frames] or None. `temperature` divides the logits first, so that the
    log-probs are those of the distribution the sampler drew from at that temperature (as TRL and verl do).
    """
    if temperature <= 0:
        raise ValueError(f"completion_logps: temperature must be > 0, got {temperature}")
    t = prompt_ids.shape[1]
    prompt = jnp.repeat(model.embed(prompt_ids, input_features, feature_attention_mask), group_size, axis=0)
    embeds = jnp.concatenate([prompt, model.language_model.embed_tokens(completions)], axis=1)
    mask = jnp.concatenate([jnp.repeat(prompt_mask, group_size, axis=0), completion_mask], axis=1).astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    hidden, _ = model.language_model(embeds, positions, mask)
    logits = model.logits(hidden[:, t - 1:-1]) / temperature  # fp32 [B*G, N, V]; position i predicts token i + 1
    return jnp.where(completion_mask.astype(bool), token_logps(logits, completions), 0.0)


def token_logps(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log_softmax(logits)[..., token] for fp32 logits [..., V] and tokens [...], written as two reductions over
    the vocabulary (the token's logit by a masked sum, minus the log-sum-exp), so that logits sharded over the
    vocabulary are never gathered: each device reduces its slice and only [...]-shaped partial sums cross devices.
    """
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    picked = jnp.sum(jnp.where(vocab == tokens[..., None], logits, 0.0), axis=-1)
    return picked - jax.nn.logsumexp(logits, axis=-1)


def sft_loss(model: AudioLM, prompt_ids, prompt_mask, input_features, feature_attention_mask, targets,
             target_mask) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced negative log-likelihood of the targets: (sum over target tokens, token count)."""
    logp = completion_logps(model, prompt_ids, prompt_mask, input_features, feature_attention_mask, targets,
                            target_mask, group_size=1)
    return -logp.sum(), target_mask.sum().astype(jnp.float32)
