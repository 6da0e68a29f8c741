"""Attention implementations (`model.attention`): the Pallas splash kernel (run by the Pallas interpreter on
CPU) equals the XLA form for every mask the model builds, in value and gradient, with left padding, sequence
lengths that are not multiples of its 128-wide tiles and grouped query heads; the model with it equals the model
with XLA (packed grouped log-probs, prefill + decoding, the audio encoder), also sharded under a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emorl_jax.config import TINY
from emorl_jax.errors import ConfigError
from emorl_jax.models.attention import Mask, attend, grouped_pattern
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.rl.policy import completion_logps
from emorl_jax.rl.sampler import SamplingParams, make_sampler, rollout_keys
from emorl_jax.sharding import batch_sharding, make_mesh, shard_model

KERNEL = "splash_interpret"


def _masks(b: int):
    """(name, Mask, T) for the three patterns the model builds, each with padding in row 0."""
    t = 200  # not a multiple of the 128-wide tiles: the kernel pads
    left = np.ones((b, t), np.int32)
    left[0, :37] = 0  # left padding
    right = np.ones((b, t), np.int32)
    right[0, 150:] = 0  # an encoder clip shorter than the window
    prompt, n, g = 40, 30, 4  # packed [prompt, 4 completions]: 160 positions
    packed = np.ones((b, prompt + g * n), np.int32)
    packed[0, :9] = 0
    return [("causal", Mask.causal(jnp.asarray(left))), ("full", Mask.full(jnp.asarray(right))),
            ("grouped", Mask(grouped_pattern(prompt, n, g), jnp.asarray(packed), jnp.asarray(packed)))]


@pytest.mark.parametrize("case", range(3))
def test_splash_matches_xla_in_value_and_gradient(case):
    b, heads, kv_heads, d = 2, 4, 2, 16
    name, mask = _masks(b)[case]
    t = mask.segments_q.shape[1]
    q, k, v, w = (jax.random.normal(key, shape) for key, shape in zip(
        jax.random.split(jax.random.key(case), 4), [(b, t, heads, d), (b, t, kv_heads, d), (b, t, kv_heads, d),
                                                   (b, t, heads, d)]))
    real = mask.segments_q[:, :, None, None]  # padded queries' outputs are never read

    def loss(impl, q, k, v):
        out = attend(q, k, v, mask, scale=d**-0.5, implementation=impl)
        return (out * w * real).sum(), out

    (_, want), want_grads = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, got), grads = jax.value_and_grad(lambda *a: loss(KERNEL, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert np.isfinite(np.asarray(got)).all(), name  # padded rows see padding: never an empty softmax
    np.testing.assert_allclose(np.asarray(got * real), np.asarray(want * real), atol=2e-6, err_msg=name)
    for g, w_ in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), atol=1e-5 * float(jnp.abs(w_).max()), err_msg=name)


def test_grouped_pattern():
    p = grouped_pattern(2, 2, 2)[:, :]
    expected = np.array([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],   # completion 1 sees the prompt and itself
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 0, 0, 1, 0],   # completion 2: the prompt, never completion 1
                         [1, 1, 0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(p, expected)


def test_unknown_or_unsupported_implementation_is_a_config_error():
    with pytest.raises(ConfigError, match="model.attention='flash'"):
        TINY.replace(attention="flash")
    with pytest.raises(ConfigError, match="cudnn .* needs model.dtype bfloat16 or float16, not float32"):
        TINY.replace(dtype="float32", attention="cudnn")
    assert TINY.replace(dtype="bfloat16", attention="cudnn").attention == "cudnn"


def _inputs(seed: int):
    rng = np.random.default_rng(seed)
    frames = TINY.audio.num_frames
    valid = [frames, 301]
    feats = rng.normal(size=(2, TINY.audio.num_mel_bins, frames)).astype(np.float32)
    fmask = (np.arange(frames)[None] < np.array(valid)[:, None]).astype(np.int32)
    counts = [(((n - 1) // 2 + 1) - 2) // 2 + 1 for n in valid]
    rows = [[11, 12, *[TINY.audio_token_index] * counts[0], 13], [14, *[TINY.audio_token_index] * counts[1], 15, 16]]
    t = max(map(len, rows)) + 3
    prompt = np.zeros((2, t), np.int32)
    pmask = np.zeros((2, t), np.int32)
    for i, r in enumerate(rows):  # left padding
        prompt[i, t - len(r):], pmask[i, t - len(r):] = r, 1
    return prompt, pmask, feats, fmask


def _models(seed: int):
    return AudioLM(TINY, rngs=nnx.Rngs(seed)), AudioLM(TINY.replace(attention=KERNEL), rngs=nnx.Rngs(seed))


def test_model_with_splash_matches_xla():
    xla, kernel = _models(7)
    prompt, pmask, feats, fmask = _inputs(0)
    g, n = 3, 6
    rng = np.random.default_rng(1)
    comps = rng.integers(10, 500, (2 * g, n)).astype(np.int32)
    cmask = np.ones((2 * g, n), np.int32)
    cmask[1, 4:] = 0
    args = (prompt, pmask, feats, fmask, comps, cmask)

    def logps(model):  # the packed grouped pass (prompt once + G completions), and its gradient
        graphdef, params = nnx.split(model)
        value = lambda p: completion_logps(nnx.merge(graphdef, p), *args, group_size=g)
        return value(params), jax.grad(lambda p: value(p).sum())(params)

    (want, want_grads), (got, grads) = logps(xla), logps(kernel)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    leaves = jax.tree_util.tree_leaves_with_path
    for (path, a), (_, b) in zip(leaves(grads), leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * float(jnp.abs(b).max()) + 1e-7,
                                   err_msg=jax.tree_util.keystr(path))
    # the audio encoder (bidirectional over each clip's valid positions)
    emb_x, counts = xla.encode_audio(jnp.asarray(feats), jnp.asarray(fmask))
    emb_k, _ = kernel.encode_audio(jnp.asarray(feats), jnp.asarray(fmask))
    for i, c in enumerate(np.asarray(counts)):
        np.testing.assert_allclose(np.asarray(emb_k[i, :c]), np.asarray(emb_x[i, :c]), atol=2e-5)
    # prefill through the kernel, then cached decoding: the same greedy tokens
    params = SamplingParams(max_new_tokens=5, temperature=0.0)
    keys = rollout_keys(jax.random.key(0), 2, 2)
    tokens = [make_sampler(nnx.split(m)[0], group_size=2, eos_ids=(1,), pad_id=0, params=params)(
        (nnx.split(m)[1],), prompt, pmask, feats, fmask, keys) for m in (xla, kernel)]
    np.testing.assert_array_equal(np.asarray(tokens[1].tokens), np.asarray(tokens[0].tokens))
    np.testing.assert_allclose(np.asarray(tokens[1].logps), np.asarray(tokens[0].logps), atol=2e-5)


def test_splash_sharded_over_a_mesh_matches_one_device():
    """Under a (data 2, fsdp 2, tensor 2) mesh the kernel runs per shard (shard_map over batch and heads)."""
    _, kernel = _models(8)
    prompt, pmask, feats, fmask = _inputs(2)
    prompt, pmask, feats, fmask = (np.concatenate([x, x]) for x in (prompt, pmask, feats, fmask))  # 4 prompts
    g, n = 2, 4
    comps = np.random.default_rng(3).integers(10, 500, (4 * g, n)).astype(np.int32)
    cmask = np.ones_like(comps)
    graphdef, state = nnx.split(kernel)

    def logps(state, *args):
        return completion_logps(nnx.merge(graphdef, state), *args, group_size=g)

    want = jax.jit(logps)(state, prompt, pmask, feats, fmask, comps, cmask)
    mesh = make_mesh((2, 2, 2))
    _, sharded, _ = shard_model(kernel, mesh)
    put = lambda x: jax.device_put(x, batch_sharding(mesh, x.ndim))

    def traced_under_mesh(state, *args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return logps(state, *args)

    lowered = jax.jit(traced_under_mesh).lower(sharded, *map(put, (prompt, pmask, feats, fmask, comps, cmask)))
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
    got = lowered.compile()(sharded, *map(put, (prompt, pmask, feats, fmask, comps, cmask)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
