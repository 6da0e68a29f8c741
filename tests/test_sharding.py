"""The forward under jax.jit with NamedShardings on fake 8-device CPU meshes equals the single-device forward."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emorl_jax.config import TINY
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.sharding import jit_forward, make_mesh, partition_spec, shard_model


def _inputs(cfg, batch=8, text=6, seed=0):
    rng = np.random.default_rng(seed)
    frames = cfg.audio.num_frames
    valid = rng.integers(frames // 4, frames + 1, batch)
    feats = rng.normal(size=(batch, cfg.audio.num_mel_bins, frames)).astype(np.float32)
    fmask = (np.arange(frames)[None] < valid[:, None]).astype(np.int32)
    after = (valid - 1) // 2 + 1
    n_audio = (after - 2) // 2 + 1
    length = text + n_audio.max()
    ids = np.zeros((batch, length), np.int32)
    amask = np.zeros((batch, length), np.int32)
    for b in range(batch):  # left-padded: [pad] text/2, audio slots, text/2
        row = [*rng.integers(10, cfg.text.vocab_size, text // 2), *[cfg.audio_token_index] * n_audio[b],
               *rng.integers(10, cfg.text.vocab_size, text - text // 2)]
        ids[b, length - len(row):] = row
        amask[b, length - len(row):] = 1
    return ids, feats, fmask, amask


def test_mesh_shapes():
    assert dict(make_mesh((2, 2, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh((1, -1, 1)).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ValueError, match="does not divide"):
        make_mesh((3, -1, 1))


def test_partition_specs_follow_rules():
    mesh = make_mesh((1, 4, 2))
    spec = lambda path, shape: tuple(partition_spec(path.split("."), shape, mesh))
    assert spec("language_model.layers.mlp.up_proj.kernel", (2, 64, 160)) == (None, "fsdp", "tensor")
    assert spec("language_model.layers.self_attn.o_proj.kernel", (2, 64, 64)) == (None, "tensor", "fsdp")
    assert spec("language_model.embed_tokens.embedding", (512, 64)) == ("tensor", "fsdp")
    assert spec("language_model.norm.scale", (64,)) == (None,)
    # 3 kv heads * 16 = 48 is not divisible by... 48 % 2 == 0, so sharded; 30 is not divisible by 4 -> replicated
    assert spec("language_model.layers.self_attn.k_proj.kernel", (2, 30, 48)) == (None, None, "tensor")


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)])
def test_sharded_forward_matches_single_device(shape):
    cfg = TINY
    model = AudioLM(cfg, rngs=nnx.Rngs(0))
    ids, feats, fmask, amask = _inputs(cfg)
    expected = np.asarray(model(jnp.asarray(ids), jnp.asarray(feats), jnp.asarray(fmask), jnp.asarray(amask)))

    mesh = make_mesh(shape)
    graphdef, state, shardings = shard_model(model, mesh)
    kernel = state["language_model"]["layers"]["mlp"]["up_proj"]["kernel"][...]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    forward = jit_forward(graphdef, shardings, mesh)
    got = forward(state, ids, feats, fmask, amask)
    assert got.sharding.spec[0] == ("data", "fsdp")
    real = amask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], expected[real], rtol=1e-5, atol=1e-5)
