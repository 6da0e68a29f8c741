"""Completion log-probs (the prompt run once for its G completions) equal log-softmax of the full forward, in
value and gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emorl_jax.config import TINY
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.rl.policy import completion_logps, sft_loss


def test_completion_logps_match_full_forward():
    model = AudioLM(TINY, rngs=nnx.Rngs(5))
    rng = np.random.default_rng(0)
    frames = TINY.audio.num_frames
    feats = rng.normal(size=(2, TINY.audio.num_mel_bins, frames)).astype(np.float32)
    fmask = np.ones((2, frames), np.int32)
    n_audio = TINY.audio.num_embeddings
    rows = [[11, 12, *[TINY.audio_token_index] * n_audio, 13], [14, *[TINY.audio_token_index] * n_audio, 15, 16, 17]]
    prompt = np.array([[0] + rows[0], rows[1]], np.int32)
    pmask = np.array([[0] + [1] * len(rows[0]), [1] * len(rows[1])], np.int32)
    g, n = 3, 5
    comps = rng.integers(10, 500, (2 * g, n)).astype(np.int32)
    cmask = np.ones((2 * g, n), np.int32)
    cmask[1, 3:] = 0  # an early EOS
    cmask[4, :] = 0  # an empty completion
    got = np.asarray(completion_logps(model, prompt, pmask, feats, fmask, comps, cmask, group_size=g))
    for row in range(2 * g):
        b = row // g
        seq = np.concatenate([prompt[b], comps[row]])[None]
        am = np.concatenate([pmask[b], cmask[row]])[None]
        pos = np.maximum(np.cumsum(am, -1) - 1, 0)
        logits = model(jnp.asarray(seq), feats[b:b + 1], fmask[b:b + 1], jnp.asarray(am), jnp.asarray(pos))
        logp = np.asarray(jax.nn.log_softmax(logits[0, prompt.shape[1] - 1:-1], -1))
        expected = np.take_along_axis(logp, comps[row][:, None], -1)[:, 0] * cmask[row]
        np.testing.assert_allclose(got[row], expected, atol=1e-5)
    total, count = sft_loss(model, prompt, pmask, feats, fmask, comps[::g], cmask[::g])
    assert float(count) == cmask[::g].sum()
    np.testing.assert_allclose(float(total), -got[::g].sum(), rtol=1e-5)


def test_logps_at_the_rollout_temperature_equal_the_samplers():
    """At temperature T the policy's log-probs are those the sampler drew from (GRPO's ratio starts at 1)."""
    from emorl_jax.rl.sampler import SamplingParams, make_sampler, rollout_keys

    model = AudioLM(TINY, rngs=nnx.Rngs(6))
    rng = np.random.default_rng(1)
    frames, n_audio, g = TINY.audio.num_frames, TINY.audio.num_embeddings, 2
    feats = rng.normal(size=(2, TINY.audio.num_mel_bins, frames)).astype(np.float32)
    fmask = np.ones((2, frames), np.int32)
    prompt = np.array([[11, *[TINY.audio_token_index] * n_audio, 12]] * 2, np.int32)
    pmask = np.ones_like(prompt)
    graphdef, state = nnx.split(model)
    roll = make_sampler(graphdef, group_size=g, eos_ids=(1,), pad_id=0,
                        params=SamplingParams(max_new_tokens=6, temperature=0.6))(
        (state,), prompt, pmask, feats, fmask, rollout_keys(jax.random.key(3), 2, g))
    mask = np.asarray(roll.mask)
    got = completion_logps(model, prompt, pmask, feats, fmask, roll.tokens, roll.mask, group_size=g,
                           temperature=0.6)
    np.testing.assert_allclose(np.asarray(got), np.asarray(roll.logps) * mask, rtol=1e-5, atol=1e-6)
    untempered = completion_logps(model, prompt, pmask, feats, fmask, roll.tokens, roll.mask, group_size=g)
    assert np.abs(np.asarray(untempered) - np.asarray(got)).max() > 1e-2


def test_prompt_once_gradients_equal_the_tiled_forward():
    """The grouped pass (prompt run once for its G completions) has the gradients of running every concatenated
    [prompt, completion] row through the model, left-padded prompts and early EOS included."""
    model = AudioLM(TINY, rngs=nnx.Rngs(7))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(3)
    frames, n_audio, g, n = TINY.audio.num_frames, TINY.audio.num_embeddings, 3, 4
    feats = rng.normal(size=(2, TINY.audio.num_mel_bins, frames)).astype(np.float32)
    fmask = np.ones((2, frames), np.int32)
    prompt = np.array([[0, 0, 11, *[TINY.audio_token_index] * n_audio, 12],
                       [13, 14, 15, *[TINY.audio_token_index] * n_audio, 16]], np.int32)
    pmask = (prompt != 0).astype(np.int32)
    comps = rng.integers(10, 500, (2 * g, n)).astype(np.int32)
    cmask = np.ones((2 * g, n), np.int32)
    cmask[2, 2:] = 0
    weights = jnp.asarray(rng.normal(size=(2 * g, n)), jnp.float32)

    def grouped(params):
        m = nnx.merge(graphdef, params)
        return jnp.sum(weights * completion_logps(m, prompt, pmask, feats, fmask, comps, cmask, group_size=g,
                                                  temperature=0.8))

    def tiled(params):
        m = nnx.merge(graphdef, params)
        seq = np.concatenate([np.repeat(prompt, g, 0), comps], 1)
        am = np.concatenate([np.repeat(pmask, g, 0), cmask], 1)
        pos = np.maximum(np.cumsum(am, -1) - 1, 0)
        logits = m(jnp.asarray(seq), np.repeat(feats, g, 0), np.repeat(fmask, g, 0), jnp.asarray(am),
                   jnp.asarray(pos))[:, prompt.shape[1] - 1:-1] / 0.8
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), comps[..., None], -1)[..., 0]
        return jnp.sum(weights * logp * cmask)

    value, grads = jax.value_and_grad(grouped)(params)
    want_value, want = jax.value_and_grad(tiled)(params)
    assert float(value) == pytest.approx(float(want_value), rel=1e-5)
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        scale = float(jnp.abs(ref).max()) + 1e-12
        np.testing.assert_allclose(got, ref, atol=1e-5 * scale, rtol=1e-4)
