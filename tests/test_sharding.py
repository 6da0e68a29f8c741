"""Params' logical axes -> partition specs, activation constraints, sharding reports, and the forward under
jax.jit with NamedShardings on fake 8-device CPU meshes, which equals the single-device forward."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from emorl_jax import sharding
from emorl_jax.config import TINY
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.sharding import jit_forward, make_mesh, partition_spec, shard_model

# 128 wide, untied lm_head: every matrix is divisible by the 8-device meshes
WIDE = TINY.replace(text=dataclasses.replace(TINY.text, hidden_size=128, intermediate_size=256,
                                             tie_word_embeddings=False),
                    audio=dataclasses.replace(TINY.audio, d_model=128, encoder_ffn_dim=256))


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
    spec = lambda axes, shape: tuple(partition_spec(axes, shape, mesh))
    assert spec(("layers", "embed", "mlp"), (2, 64, 160)) == (None, "fsdp", "tensor")
    assert spec(("layers", "heads", "embed"), (2, 64, 64)) == (None, "tensor", "fsdp")
    assert spec(("vocab", "embed"), (512, 64)) == ("tensor", "fsdp")
    assert spec((None,), (64,)) == (None,)
    assert spec(("layers", "embed", "kv_heads"), (2, 30, 48)) == (None, None, "tensor")  # 4 does not divide 30
    with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
        spec(("hidden",), (64,))


# What the former path table gave (same on both meshes at 128 wide)
OLD_TABLE_SPECS = {
    "language_model.embed_tokens.embedding": ("tensor", "fsdp"),
    "language_model.layers.self_attn.q_proj.kernel": (None, "fsdp", "tensor"),
    "language_model.layers.self_attn.q_proj.bias": (None, "tensor"),
    "language_model.layers.self_attn.k_proj.bias": (None, "tensor"),
    "language_model.layers.self_attn.o_proj.kernel": (None, "tensor", "fsdp"),
    "language_model.layers.mlp.down_proj.kernel": (None, "tensor", "fsdp"),
    "language_model.layers.input_layernorm.scale": (None, None),
    "language_model.norm.scale": (None,),
    "lm_head.kernel": ("fsdp", "tensor"),
    "multi_modal_projector.linear.kernel": (None, "fsdp"),
    "multi_modal_projector.linear.bias": (None,),
    "audio_tower.conv1.kernel": (None, None, "fsdp"),
    "audio_tower.conv1.bias": (None,),
    "audio_tower.embed_positions": (None, "fsdp"),
    "audio_tower.layers.fc1.bias": (None, "tensor"),
    "audio_tower.layers.fc2.bias": (None, None),
    "audio_tower.layers.self_attn.out_proj.kernel": (None, "tensor", "fsdp"),
    "audio_tower.layers.self_attn.out_proj.bias": (None, None),
    "audio_tower.layers.self_attn_layer_norm.bias": (None, None),
}


def _by_path(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(n for n in sharding._path_names(p) if n != "value"): x for p, x in leaves}


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)])
def test_param_shardings_from_metadata_equal_the_former_path_table(shape):
    mesh = make_mesh(shape)
    abstract = nnx.state(nnx.eval_shape(lambda: AudioLM(WIDE, rngs=nnx.Rngs(0))))
    specs = {path: tuple(s.spec) for path, s in _by_path(sharding.param_shardings(abstract, mesh)).items()}
    assert {path: specs[path] for path in OLD_TABLE_SPECS} == OLD_TABLE_SPECS
    # the same from a tree of ShapeDtypeStructs and from real arrays; an optimizer state follows its params
    params = nnx.state(AudioLM(WIDE, rngs=nnx.Rngs(0)))
    sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    for tree in (params, sds):
        assert {p: tuple(s.spec) for p, s in _by_path(sharding.param_shardings(tree, mesh)).items()} == specs
    opt = _by_path(sharding.param_shardings(optax.adam(1e-3).init(params), mesh))
    assert tuple(opt["0.mu.lm_head.kernel"].spec) == specs["lm_head.kernel"]
    assert tuple(opt["0.count"].spec) == ()  # not a param: replicated


def test_constrain_is_a_noop_without_a_mesh():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    assert sharding.constrain(x, ("batch", "length", "embed")) is x
    hlo = jax.jit(lambda y: sharding.constrain(y * 2, ("batch", "length", "vocab"))).lower(x).as_text()
    assert "sharding" not in hlo


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1)])
def test_forward_traced_under_the_mesh_constrains_activations(shape):
    model = AudioLM(TINY, rngs=nnx.Rngs(0))
    ids, feats, fmask, amask = _inputs(TINY)
    expected = np.asarray(model(jnp.asarray(ids), jnp.asarray(feats), jnp.asarray(fmask), jnp.asarray(amask)))
    mesh = make_mesh(shape)
    graphdef, state, _ = shard_model(model, mesh)
    forward = jax.jit(lambda s, *xs: nnx.merge(graphdef, s)(*xs))  # no in/out shardings: only the constraints
    with sharding.mesh_context(mesh):
        lowered = forward.lower(state, ids, feats, fmask, amask)
        got = forward(state, ids, feats, fmask, amask)
    hlo = lowered.compile().as_text()
    vocab = TINY.text.vocab_size
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    logits_shard = f"f32[{len(ids) // batch_shards},{ids.shape[1]},{vocab // mesh.shape['tensor']}]"
    assert logits_shard in hlo  # the per-device logits block of the partitioned program
    assert got.sharding.shard_shape(got.shape)[0] == len(ids) // batch_shards  # batch-sharded logits
    real = amask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], expected[real], rtol=1e-5, atol=1e-5)


def test_logits_are_fp32_without_bf16_rounding():
    for tied in (True, False):
        cfg = TINY.replace(dtype="bfloat16", text=dataclasses.replace(TINY.text, tie_word_embeddings=tied))
        model = AudioLM(cfg, rngs=nnx.Rngs(0))
        hidden = jax.random.normal(jax.random.key(1), (2, 5, cfg.text.hidden_size)).astype(jnp.bfloat16)
        logits = model.logits(hidden)
        assert logits.dtype == jnp.float32 and logits.shape == (2, 5, cfg.text.vocab_size)
        rounded = logits.astype(jnp.bfloat16).astype(jnp.float32)
        assert np.mean(np.asarray(logits) != np.asarray(rounded)) > 0.5
        kernel = model.language_model.embed_tokens.embedding[...].T if tied else model.lm_head.kernel[...]
        ref = np.asarray(hidden, np.float32) @ np.asarray(kernel.astype(jnp.bfloat16), np.float32)
        np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-5, atol=1e-5)
        assert model.logits(hidden[:, 0]).shape == (2, cfg.text.vocab_size)  # 2-d hidden too


def test_sharding_reports_name_large_replicated_leaves():
    mesh = make_mesh((1, 8, 1))
    _, state, _ = shard_model(AudioLM(WIDE, rngs=nnx.Rngs(0)), mesh)
    assert sharding.replicated_leaves(state, min_bytes=4096) == []  # every param over 4 KiB is sharded
    big = jax.device_put(np.zeros((512, 1024), np.float32), sharding.replicated(mesh))  # 2 MiB on every device
    rows = jax.device_put(np.zeros((64, 1024), np.float32), NamedSharding(mesh, P("fsdp")))  # 32 KiB per device
    trees = {"params": state, "extra": {"big": big, "rows": rows}}
    assert sharding.replicated_leaves(trees["extra"]) == [("big", 2**21)]
    assert sharding.check_sharding(trees, strict=False) == ["extra.big: 2097152 bytes replicated on every device"]
    with pytest.raises(ValueError, match="extra.big"):
        sharding.check_sharding(trees, strict=True)
    assert sharding.check_sharding({"params": state}, strict=True) == []
    # per-device bytes: the largest per-device total, from arrays or from ShapeDtypeStructs with a sharding
    assert sharding.per_device_bytes(trees["extra"]) == 2**21 + 2**15
    sds = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trees["extra"])
    assert sharding.per_device_bytes(sds) == 2**21 + 2**15
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    assert total / 8 <= sharding.per_device_bytes(state) < total / 4
    assert sharding.replicated_leaves({"one": jnp.zeros((2**20,))}, min_bytes=0) == []  # one device: not reported


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
