"""Per-token log-probs of completions given their prompts (policy, old policy, reference), and the SFT loss.

Each prompt (and its audio) is embedded and run through the decoder once for the G completions that share it
(`Qwen2Model.grouped`): T + G*N tokens per group instead of G*(T + N). Only completion positions go through
the vocabulary projection, in vocabulary chunks when `vocab_chunk` is set (`head_logps`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emorl_jax.models.audio_lm import AudioLM


def completion_logps(model: AudioLM, prompt_ids, prompt_mask, input_features, feature_attention_mask,
                     completions, completion_mask, *, group_size: int, temperature: float = 1.0,
                     vocab_chunk: int = 0) -> jax.Array:
    """log p(completion token | prompt, earlier tokens), fp32 [B*G, N]; 0 where completion_mask is 0.

    prompt_ids/prompt_mask [B, T] left-padded; completions/completion_mask [B*G, N] (row b*G + r continues
    prompt b); input_features [clips, mel, frames] or None. `temperature` divides the logits first, so that the
    log-probs are those of the distribution the sampler drew from at that temperature (as TRL and verl do).
    `vocab_chunk` > 0 computes them `vocab_chunk` vocabulary entries at a time (`head_logps`).
    """
    if temperature <= 0:
        raise ValueError(f"completion_logps: temperature must be > 0, got {temperature}")
    prompt = model.embed(prompt_ids, input_features, feature_attention_mask)
    completion = model.language_model.embed_tokens(completions)
    prompt_hidden, hidden = model.language_model.grouped(prompt, prompt_mask, completion, completion_mask,
                                                         group_size)
    # Token i of a completion is predicted from the hidden state before it: the prompt's last, then its own.
    last = jnp.repeat(prompt_hidden[:, -1:], group_size, axis=0)
    before = jnp.concatenate([last, hidden[:, :-1]], axis=1)
    logps = head_logps(model, before, completions, temperature=temperature, vocab_chunk=vocab_chunk)
    return jnp.where(completion_mask.astype(bool), logps, 0.0)


def head_logps(model: AudioLM, hidden: jax.Array, tokens: jax.Array, *, temperature: float = 1.0,
               vocab_chunk: int = 0) -> jax.Array:
    """log_softmax(logits / temperature)[token], fp32 [R, N], of hidden [R, N, d] and tokens [R, N].

    vocab_chunk 0 (or >= vocab) computes the fp32 logits [R, N, V] at once. Otherwise a scan over chunks of
    `vocab_chunk` entries keeps one chunk's logits [R, N, C] live: each chunk yields its log-sum-exp and the
    picked token's logit, merged exactly afterwards; the chunk's logits are recomputed in the backward pass
    (`jax.checkpoint`), so neither pass holds [R, N, V]. The last chunk is shifted back to end at V (no
    padding copy of the head), its entries that the previous chunk covered masked out.
    """
    vocab = model.cfg.text.vocab_size
    if vocab_chunk <= 0 or vocab_chunk >= vocab:
        return token_logps(model.logits(hidden) / temperature, tokens)
    tied = model.lm_head is None
    weight = model.language_model.embed_tokens.embedding[...] if tied else model.lm_head.kernel[...]
    dtype = model.cfg.compute_dtype
    h = hidden.astype(dtype)

    @jax.checkpoint
    def chunk(carry, k):
        first = k * vocab_chunk  # the chunk's own entries are [first, first + vocab_chunk) within the vocabulary
        start = jnp.minimum(first, vocab - vocab_chunk)
        w = jax.lax.dynamic_slice_in_dim(weight, start, vocab_chunk, axis=0 if tied else 1).astype(dtype)
        logits = jnp.einsum("rnd,vd->rnv" if tied else "rnd,dv->rnv", h, w,
                            preferred_element_type=jnp.float32) / temperature
        ids = start + jnp.arange(vocab_chunk)
        own = ids >= first
        logits = jnp.where(own, logits, -jnp.inf)
        picked = jnp.sum(jnp.where(own & (ids == tokens[..., None]), logits, 0.0), axis=-1)
        return carry, (jax.nn.logsumexp(logits, axis=-1), picked)

    chunks = -(-vocab // vocab_chunk)
    _, (lse, picked) = jax.lax.scan(chunk, None, jnp.arange(chunks))
    return picked.sum(0) - jax.nn.logsumexp(lse, axis=0)


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
