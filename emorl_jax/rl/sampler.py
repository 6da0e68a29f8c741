"""Rollouts: encode each clip and prefill each prompt once, then one jitted `lax.while_loop` decodes G rollouts per
prompt until every row has emitted an EOS id (or `max_new_tokens`). The prompt's KV cache is stored once per
prompt and each rollout's own KV once per row; every decode step attends to both (`KVCache.prefix`).

Prompts are left-padded ([B, T], attention mask 1 = real token); positions count real tokens, so padding never
shifts RoPE. Rollout r of prompt b is row b*G + r of every output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.models.qwen2 import KVCache


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy (argmax); top_k 0 and top_p 1 disable those filters. top_p looks for its nucleus
    among the `top_p_candidates` largest logits first (`filter_logits`)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    top_p_candidates: int = 1024


class Rollouts(NamedTuple):
    """tokens [R, N] (pad after EOS), logps [R, N] fp32 log-probs of the sampled tokens under the sampling
    distribution (after temperature/top-k/top-p; the model's own for greedy), mask [R, N] 1 for generated tokens
    up to and including the EOS, truncated [R] True where no EOS came within N tokens."""

    tokens: jax.Array
    logps: jax.Array
    mask: jax.Array
    truncated: jax.Array


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Temperature, top-k and top-p (nucleus) filtering of logits [R, V]; removed entries become -inf.

    The nucleus keeps the largest logits while the probability mass strictly above them is below top_p (ties
    at the cutoff kept). It is found among the `top_p_candidates` largest logits (`lax.top_k`) instead of
    sorting the vocabulary; when those candidates hold less than top_p of a row's mass, the nucleus may reach
    beyond them, and every row is done with the full sort instead (`lax.cond`), so the result is always exact.
    """
    logits = logits.astype(jnp.float32) / params.temperature
    if params.top_k > 0:
        kth = jax.lax.top_k(logits, params.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if params.top_p < 1.0:
        candidates = min(params.top_p_candidates, logits.shape[-1])
        top = jax.lax.top_k(logits, candidates)[0]  # [R, K] descending
        probs = jnp.exp(top - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
        covered = jnp.all(jnp.sum(probs, axis=-1) >= params.top_p)
        cutoff = jax.lax.cond(covered, lambda: _nucleus_cutoff(top, probs, params.top_p),
                              lambda: _nucleus_cutoff(*_sorted_probs(logits), params.top_p))
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _sorted_probs(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Logits [R, V] sorted descending, and their probabilities."""
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    return ordered, jax.nn.softmax(ordered, axis=-1)


def _nucleus_cutoff(ordered: jax.Array, probs: jax.Array, top_p: float) -> jax.Array:
    """[R, 1]: the smallest of the descending logits whose mass strictly above is below top_p."""
    before = jnp.cumsum(probs, axis=-1) - probs
    return jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)


def _pick(logits: jax.Array, keys: jax.Array, step: jax.Array, params: SamplingParams):
    """Next token [R] and its log-prob [R] from logits [R, V], one PRNG key per row."""
    if params.temperature == 0.0:
        token = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    else:
        filtered = filter_logits(logits, params)
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
        token = jax.vmap(jax.random.categorical)(step_keys, filtered)
        logp = jax.nn.log_softmax(filtered, axis=-1)
    return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def generate(model: AudioLM, prompt_ids, prompt_mask, input_features, feature_attention_mask, keys, *,
             group_size: int, eos_ids: Sequence[int], pad_id: int, params: SamplingParams) -> Rollouts:
    """Traceable rollout loop (call under jit; see `make_sampler`).

    prompt_ids/prompt_mask [B, T]; input_features [N, mel, frames] or None; keys [B*G] PRNG keys, one per
    rollout (row b*G + r), so a rollout depends only on its own key.
    """
    b, t = prompt_ids.shape
    rows, n = b * group_size, params.max_new_tokens
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
    hidden, prompt_cache = model.prefill(prompt_ids, input_features, feature_attention_mask, prompt_mask, positions)
    logits = jnp.repeat(model.logits(hidden[:, -1]), group_size, axis=0)
    cache = KVCache.init(model.cfg, rows, n, prefix=prompt_cache)  # the prompt's KV once, the completions' per row
    next_pos = jnp.repeat(positions[:, -1] + 1, group_size)
    eos = jnp.asarray(eos_ids, jnp.int32)

    def cond(carry):
        step, _, _, _, _, _, done = carry
        return (step < n) & ~jnp.all(done)

    def body(carry):
        step, cache, logits, tokens, logps, mask, done = carry
        token, logp = _pick(logits, keys, step, params)
        live = ~done
        token = jnp.where(live, token, pad_id)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
        logps = jax.lax.dynamic_update_slice_in_dim(logps, jnp.where(live, logp, 0.0)[:, None], step, axis=1)
        mask = jax.lax.dynamic_update_slice_in_dim(mask, live.astype(jnp.int32)[:, None], step, axis=1)
        done = done | jnp.isin(token, eos)
        hidden, cache = model.hidden_states(token[:, None], attention_mask=live.astype(jnp.int32)[:, None],
                                            positions=(next_pos + step)[:, None], cache=cache)
        return step + 1, cache, model.logits(hidden[:, 0]), tokens, logps, mask, done

    init = (jnp.zeros((), jnp.int32), cache, logits, jnp.full((rows, n), pad_id, jnp.int32),
            jnp.zeros((rows, n), jnp.float32), jnp.zeros((rows, n), jnp.int32), jnp.zeros((rows,), bool))
    _, _, _, tokens, logps, mask, done = jax.lax.while_loop(cond, body, init)
    return Rollouts(tokens, logps, mask, ~done)


def make_sampler(graphdef, *, group_size: int, eos_ids: Sequence[int], pad_id: int, params: SamplingParams):
    """A jitted `sample(states, prompt_ids, prompt_mask, input_features, feature_attention_mask, keys) -> Rollouts`.

    `states` is the tuple of nnx.States that `nnx.merge(graphdef, *states)` turns back into the model (e.g.
    `(params,)`, or `(trainable, frozen)` as the trainer splits them). It runs wherever its inputs live: params
    placed on a mesh (`sharding.shard_model`) and batches sharded over ('data', 'fsdp') give a sharded rollout
    (GSPMD propagates the shardings through the loop).
    """

    def sample(states, prompt_ids, prompt_mask, input_features, feature_attention_mask, keys):
        model = nnx.merge(graphdef, *states)
        return generate(model, prompt_ids, prompt_mask, input_features, feature_attention_mask, keys,
                        group_size=group_size, eos_ids=tuple(eos_ids), pad_id=pad_id, params=params)

    return jax.jit(sample)


def rollout_keys(key: jax.Array, num_prompts: int, group_size: int) -> jax.Array:
    """One PRNG key per rollout [B*G] from a step key."""
    return jax.random.split(key, num_prompts * group_size)
