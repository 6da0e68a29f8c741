"""The rollout sampler: greedy equals argmax decoding of the full forward; G rollouts equal separate runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emorl_jax.config import TINY
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.rl.policy import completion_logps
from emorl_jax.rl.sampler import SamplingParams, filter_logits, make_sampler, rollout_keys
from emorl_jax.sharding import batch_sharding, make_mesh, shard_model

PAD = 0


@pytest.fixture(scope="module")
def model():
    """A random tiny model with weights scaled up (std ~0.1), so greedy outputs are not one repeated token."""
    m = AudioLM(TINY, rngs=nnx.Rngs(4))
    nnx.update(m, jax.tree.map(lambda x: x * 5.0, nnx.state(m, nnx.Param)))
    return m


def _batch(cfg, seed=0):
    """Two left-padded prompts, each with one clip (400 and 250 valid frames)."""
    rng = np.random.default_rng(seed)
    frames = cfg.audio.num_frames
    valid = np.array([frames, 250])
    feats = rng.normal(size=(2, cfg.audio.num_mel_bins, frames)).astype(np.float32)
    fmask = (np.arange(frames)[None] < valid[:, None]).astype(np.int32)
    n_audio = ((valid - 1) // 2 + 1 - 2) // 2 + 1
    rows = [[*rng.integers(10, 500, 3), *[cfg.audio_token_index] * n, *rng.integers(10, 500, 4)] for n in n_audio]
    t = max(map(len, rows))
    ids = np.array([[PAD] * (t - len(r)) + r for r in rows], np.int32)
    mask = np.array([[0] * (t - len(r)) + [1] * len(r) for r in rows], np.int32)
    return ids, mask, feats, fmask


def _reference_greedy(model, ids, mask, feats, fmask, steps, eos):
    """Argmax decoding that re-runs the full (uncached) forward on the growing sequence (right-padded to a fixed
    length, so one compilation serves every step)."""
    forward = nnx.jit(lambda m, *args: m(*args))
    out = []
    for b in range(ids.shape[0]):
        seq = np.concatenate([ids[b], np.full(steps, PAD, np.int32)])[None]
        am = np.concatenate([mask[b], np.zeros(steps, np.int32)])[None]
        tokens, cur = [], ids.shape[1]
        for _ in range(steps):
            pos = np.maximum(np.cumsum(am, -1) - 1, 0)
            logits = forward(model, seq, feats[b:b + 1], fmask[b:b + 1], am, pos)
            tok = int(jnp.argmax(logits[0, cur - 1]))
            tokens.append(tok)
            seq[0, cur], am[0, cur] = tok, 1
            cur += 1
            if tok in eos:
                break
        out.append(tokens)
    return out


def test_greedy_equals_argmax_of_full_forward_and_stops_at_any_eos(model):
    ids, mask, feats, fmask = _batch(TINY)
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    free = _reference_greedy(model, ids, mask, feats, fmask, 8, eos=())
    # Make a token that first appears mid-sequence in each row an end-of-sequence id: both must be honoured.
    firsts = [[t for i, t in enumerate(row) if i >= 2 and t not in row[:i]] for row in free]
    eos = (firsts[0][0], next(t for t in firsts[1] if t not in free[0][:free[0].index(firsts[0][0])]))
    graphdef, state = nnx.split(model)
    sample = make_sampler(graphdef, group_size=1, eos_ids=eos, pad_id=PAD, params=params)
    out = sample((state,), ids, mask, feats, fmask, rollout_keys(jax.random.key(0), 2, 1))
    expected = _reference_greedy(model, ids, mask, feats, fmask, 8, eos=eos)
    for b in range(2):
        n = len(expected[b])
        assert list(np.asarray(out.tokens[b, :n])) == expected[b]
        assert np.asarray(out.mask[b]).tolist() == [1] * n + [0] * (8 - n)  # EOS included in the mask
        assert np.all(np.asarray(out.tokens[b, n:]) == PAD)
    assert not np.asarray(out.truncated).any()


def test_greedy_group_rows_share_the_prompt_and_equal_the_full_forward(model):
    """G greedy rows over one stored prompt (left-padded prompts, two EOS ids) each equal argmax decoding of the
    uncached full forward, with the model's own log-probs."""
    ids, mask, feats, fmask = _batch(TINY, seed=4)
    free = _reference_greedy(model, ids, mask, feats, fmask, 8, eos=())
    eos = (free[0][3], free[1][5])
    expected = _reference_greedy(model, ids, mask, feats, fmask, 8, eos=eos)
    graphdef, state = nnx.split(model)
    g = 3
    out = make_sampler(graphdef, group_size=g, eos_ids=eos, pad_id=PAD,
                       params=SamplingParams(max_new_tokens=8, temperature=0.0))(
        (state,), ids, mask, feats, fmask, rollout_keys(jax.random.key(0), 2, g))
    for row in range(2 * g):
        want = expected[row // g]
        assert list(np.asarray(out.tokens[row, :len(want)])) == want
        assert int(np.asarray(out.mask[row]).sum()) == len(want)
    np.testing.assert_allclose(np.asarray(out.logps[1:g]), np.broadcast_to(np.asarray(out.logps[0]), (g - 1, 8)),
                               rtol=1e-6, atol=1e-6)


def test_group_rollouts_equal_separate_runs_with_same_keys(model):
    ids, mask, feats, fmask = _batch(TINY, seed=1)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50)
    graphdef, state = nnx.split(model)
    g = 3
    keys = rollout_keys(jax.random.key(7), 2, g)
    group = make_sampler(graphdef, group_size=g, eos_ids=(1,), pad_id=PAD, params=params)(
        (state,), ids, mask, feats, fmask, keys)
    single = make_sampler(graphdef, group_size=1, eos_ids=(1,), pad_id=PAD, params=params)
    for b in range(2):
        for r in range(g):
            one = single((state,), ids[b:b + 1], mask[b:b + 1], feats[b:b + 1], fmask[b:b + 1],
                         keys[b * g + r][None])
            row = b * g + r
            assert np.array_equal(np.asarray(one.tokens[0]), np.asarray(group.tokens[row]))
            # batch 1 vs G rows: XLA:CPU sums in another order; with the weights x5 (logits ~10x larger) the
            # shared-prompt attention measured up to 1.3e-5 relative (4.5e-6 with a tiled cache)
            np.testing.assert_allclose(np.asarray(one.logps[0]), np.asarray(group.logps[row]), rtol=2e-5, atol=1e-6)
    assert len({tuple(np.asarray(group.tokens[r])) for r in range(g)}) > 1  # rollouts differ


@pytest.mark.parametrize("new_tokens", [5, 150])
def test_logps_at_temperature_one_are_model_logprobs(new_tokens):
    """The sampler's log-probs equal the training pass's (`completion_logps`, itself equal to the full forward in
    tests/test_policy.py) on its own tokens. 150 tokens: decode steps attend over 1, 2, then 3 chunks of own
    slots (DECODE_CHUNK = 64); sampled completions may hold any id, <|AUDIO|> included, embedded as text.
    The model's own init (the fixture's weights x5 saturate: fp32 order noise reached 5e-5 relative there)."""
    model = AudioLM(TINY, rngs=nnx.Rngs(4))
    ids, mask, feats, fmask = _batch(TINY, seed=2)
    graphdef, state = nnx.split(model)
    params = SamplingParams(max_new_tokens=new_tokens)
    out = make_sampler(graphdef, group_size=2, eos_ids=(), pad_id=PAD, params=params)(
        (state,), ids, mask, feats, fmask, rollout_keys(jax.random.key(1), 2, 2))
    assert np.asarray(out.truncated).all() and np.asarray(out.mask).all()
    expected = completion_logps(model, ids, mask, feats, fmask, out.tokens, out.mask, group_size=2)
    np.testing.assert_allclose(np.asarray(out.logps), np.asarray(expected), rtol=1e-5, atol=1e-6)  # measured 1.6e-7


def test_filter_logits_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 30)).astype(np.float32)
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.8)
    got = np.asarray(filter_logits(jnp.asarray(logits), params))
    for row, out in zip(logits, got):
        scaled = row / 0.7
        keep = set(np.argsort(-scaled)[:10])
        order = [i for i in np.argsort(-scaled) if i in keep]
        probs = np.exp(scaled[order] - scaled[order].max())
        probs /= probs.sum()
        above = np.cumsum(probs) - probs
        keep = {i for i, a in zip(order, above) if a < 0.8}
        assert {i for i in range(30) if np.isfinite(out[i])} == keep
        assert np.allclose(out[sorted(keep)], scaled[sorted(keep)])


@pytest.mark.parametrize("new_tokens", [6, 70])  # 70: the decode switches to a second chunk of own slots
def test_sharded_greedy_matches_single_device(model, new_tokens):
    ids, mask, feats, fmask = _batch(TINY, seed=3)
    ids, mask, feats, fmask = (np.repeat(x, 4, axis=0) for x in (ids, mask, feats, fmask))  # 8 prompts
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    graphdef, state = nnx.split(model)
    keys = rollout_keys(jax.random.key(0), 8, 1)
    expected = make_sampler(graphdef, group_size=1, eos_ids=(1,), pad_id=PAD, params=params)(
        (state,), ids, mask, feats, fmask, keys)
    mesh = make_mesh((2, 2, 2))
    graphdef, sharded_state, _ = shard_model(model, mesh)
    put = lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim))
    got = make_sampler(graphdef, group_size=1, eos_ids=(1,), pad_id=PAD, params=params)(
        (sharded_state,), put(ids), put(mask), put(feats), put(fmask), keys)
    assert np.array_equal(np.asarray(got.tokens), np.asarray(expected.tokens))
