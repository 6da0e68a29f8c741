"""Vocabulary-chunked log-probs (`policy.head_logps`) equal the plain log-softmax in value and gradient, and
top-p on a top-k candidate set equals the full-sort nucleus (with the exact fallback)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emorl_jax.config import TINY
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.rl.policy import head_logps, token_logps
from emorl_jax.rl.sampler import SamplingParams, filter_logits


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [96, 128, 500])  # 512 = 5 1/3 x 96 (the last chunk overlaps), 4 x 128, 2 x 500
def test_chunked_equals_plain_in_value_and_gradient(tied, chunk):
    cfg = TINY.replace(text=dataclasses.replace(TINY.text, tie_word_embeddings=tied))
    graphdef, params = nnx.split(AudioLM(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(3, 5, cfg.text.hidden_size)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, cfg.text.vocab_size, (3, 5)), jnp.int32).at[0, 0].set(cfg.text.vocab_size - 1)
    weights = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)

    def loss(params, hidden, vocab_chunk):
        model = nnx.merge(graphdef, params)
        logps = head_logps(model, hidden, tokens, temperature=0.7, vocab_chunk=vocab_chunk)
        return jnp.sum(logps * weights), logps

    (plain, plain_logps), plain_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, hidden, 0)
    (value, logps), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                                    static_argnums=2)(params, hidden, chunk)
    model = nnx.merge(graphdef, params)
    oracle = jax.nn.log_softmax(model.logits(hidden) / 0.7, axis=-1)  # the plain form, written out
    np.testing.assert_allclose(plain_logps, np.take_along_axis(oracle, tokens[..., None], -1)[..., 0], atol=1e-6)
    np.testing.assert_allclose(logps, plain_logps, atol=1e-6)
    assert float(value) == pytest.approx(float(plain), abs=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
        np.testing.assert_allclose(got, want, atol=1e-6)
    head = grads[0]["language_model"]["embed_tokens"]["embedding"] if tied else grads[0]["lm_head"]["kernel"]
    assert float(jnp.abs(head[...]).max()) > 1e-3  # the head's gradient flows through the chunks


def test_token_logps_is_log_softmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 7)), jnp.float32)
    tokens = jnp.array([0, 6, 3, 3])
    want = jax.nn.log_softmax(logits)[jnp.arange(4), tokens]
    np.testing.assert_allclose(token_logps(logits, tokens), want, atol=1e-6)


def _full_sort_top_p(logits, top_p):
    """The nucleus by sorting the whole vocabulary (the reference)."""
    ordered = np.sort(logits, axis=-1)[:, ::-1]
    probs = np.exp(ordered - ordered.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    before = np.cumsum(probs, -1) - probs
    cutoff = np.where(before < top_p, ordered, np.inf).min(-1, keepdims=True)
    return np.where(logits < cutoff, -np.inf, logits)


@pytest.mark.parametrize("scale", [8.0, 0.05])  # peaked rows: the 16 candidates cover top_p; flat: fallback
def test_top_p_on_candidates_equals_the_full_sort(scale):
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(4, 300)) * scale).astype(np.float32)
    logits[0, :5] = logits[0].max()  # ties at the top
    params = SamplingParams(temperature=1.0, top_p=0.8, top_p_candidates=16)
    got = np.asarray(jax.jit(filter_logits, static_argnums=1)(jnp.asarray(logits), params))
    np.testing.assert_array_equal(got, _full_sort_top_p(logits, 0.8))
    kept = np.isfinite(got).sum(-1)
    assert (kept <= 16).all() if scale > 1 else (kept > 16).all()  # both branches of the cond are exercised
