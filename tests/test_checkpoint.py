"""HF safetensors <-> AudioLM <-> orbax: round trips, sharded restore, bad checkpoints, the 7B shape."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from emorl_jax import checkpoint
from emorl_jax.config import QWEN2_AUDIO_7B, TINY, to_hf_config
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.sharding import make_mesh

TINY32 = TINY.replace(param_dtype="float32")


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny model exported to HF safetensors in 3 shards (with index)."""
    d = tmp_path_factory.mktemp("hf")
    model = AudioLM(TINY32.replace(text=TINY32.text.__class__(**{**TINY32.text.__dict__,
                                                                "tie_word_embeddings": False})), rngs=nnx.Rngs(3))
    checkpoint.to_hf(model, d, max_shard_bytes=100_000)
    return d


def test_export_is_sharded_and_loads_in_transformers(hf_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    hf = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(hf_dir).eval()
    ours = checkpoint.from_hf(hf_dir, dtype="float32")
    ids = np.array([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), expected, atol=1e-5, rtol=1e-5)


def test_hf_orbax_hf_round_trip_is_bit_identical(hf_dir, tmp_path):
    out = tmp_path / "orbax"
    subprocess.run([sys.executable, "-m", "emorl_jax.convert", f"--hf_dir={hf_dir}", f"--out={out}"], check=True)
    subprocess.run([sys.executable, "-m", "emorl_jax.convert", f"--orbax_dir={out}", f"--out={tmp_path / 'hf2'}"],
                   check=True)
    before, after = _tensors(hf_dir), _tensors(tmp_path / "hf2")
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype and np.array_equal(before[name], after[name]), name


def test_bf16_params_round_trip(hf_dir, tmp_path):
    model = checkpoint.from_hf(hf_dir, param_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.bfloat16)}
    checkpoint.to_hf(model, tmp_path / "bf16")
    again = checkpoint.from_hf(tmp_path / "bf16", param_dtype="bfloat16")
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(again))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_sharded_restore_gives_identical_logits(hf_dir, tmp_path):
    model = checkpoint.from_hf(hf_dir, dtype="float32")
    checkpoint.save(model, tmp_path / "ckpt")
    mesh = make_mesh((2, 2, 2))
    restored = checkpoint.restore(tmp_path / "ckpt", mesh=mesh)
    kernel = nnx.state(restored)["language_model"]["layers"]["mlp"]["up_proj"]["kernel"][...]
    assert kernel.sharding.mesh.shape == mesh.shape and not kernel.sharding.is_fully_replicated
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored))):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # params bit-identical
    ids = jnp.array([[7, 8, 9, 10, 11]])
    assert np.array_equal(np.asarray(model(ids)), np.asarray(checkpoint.restore(tmp_path / "ckpt")(ids)))
    # Sharded matmuls sum in another order: equal to fp32 rounding.
    sharded = np.asarray(jax.jit(lambda m, i: m(i))(restored, ids))
    np.testing.assert_allclose(sharded, np.asarray(model(ids)), rtol=1e-6, atol=1e-6)


def test_from_hf_places_params_on_mesh(hf_dir):
    mesh = make_mesh((1, 4, 2))
    model = checkpoint.from_hf(hf_dir, dtype="float32", mesh=mesh)
    emb = nnx.state(model)["language_model"]["embed_tokens"]["embedding"][...]
    assert tuple(emb.sharding.spec) == ("tensor", "fsdp")


def _copy(hf_dir, dst, edit):
    """A one-file copy of the checkpoint with `edit(tensors)` applied."""
    dst.mkdir()
    (dst / "config.json").write_text((hf_dir / "config.json").read_text())
    tensors = _tensors(hf_dir)
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_wrong_shape_names_tensor_and_both_shapes(hf_dir, tmp_path):
    name = "language_model.model.layers.1.mlp.up_proj.weight"
    d = _copy(hf_dir, tmp_path / "bad", lambda t: t.__setitem__(name, np.zeros((7, 64), np.float32)))
    with pytest.raises(checkpoint.CheckpointError, match=rf"{name} has shape \[7, 64\] but the config expects "
                                                         rf"\[{TINY.text.intermediate_size}, 64\]"):
        checkpoint.from_hf(d)


def test_missing_tensor_is_named(hf_dir, tmp_path):
    name = "audio_tower.layers.0.fc2.bias"
    d = _copy(hf_dir, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(checkpoint.CheckpointError, match=f"missing tensor {name}"):
        checkpoint.from_hf(d)


def test_unexpected_tensor_is_named(hf_dir, tmp_path):
    d = _copy(hf_dir, tmp_path / "extra", lambda t: t.__setitem__("language_model.model.extra.weight",
                                                                  np.zeros(3, np.float32)))
    with pytest.raises(checkpoint.CheckpointError, match="unexpected tensor.*language_model.model.extra.weight"):
        checkpoint.from_hf(d)


def test_pickled_bin_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(TINY)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(checkpoint.CheckpointError, match=r"pytorch_model\.bin.*pickled .bin checkpoints are refused"):
        checkpoint.from_hf(tmp_path)


def test_shard_listed_in_index_but_missing(hf_dir, tmp_path):
    d = tmp_path / "partial"
    d.mkdir()
    for f in hf_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    victim = sorted(d.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(checkpoint.CheckpointError, match=f"{victim.name}: listed in model.safetensors.index.json"):
        checkpoint.from_hf(d)


def test_7b_abstract_param_count_matches_config_arithmetic():
    model = checkpoint.abstract_model(QWEN2_AUDIO_7B)
    leaves = jax.tree.leaves(nnx.state(model))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    a, t = QWEN2_AUDIO_7B.audio, QWEN2_AUDIO_7B.text
    d, f = a.d_model, a.encoder_ffn_dim
    encoder = (a.num_mel_bins * d * 3 + d) + (d * d * 3 + d) + a.max_source_positions * d + 2 * d + a.encoder_layers * (
        4 * d * d + 3 * d + 4 * d + 2 * d * f + f + d)
    projector = d * t.hidden_size + t.hidden_size
    h, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
    decoder = t.vocab_size * h + h + t.num_hidden_layers * (h * h + h + 2 * (h * kv + kv) + h * h
                                                           + 3 * h * t.intermediate_size + 2 * h)
    lm_head = h * t.vocab_size
    total = sum(int(np.prod(x.shape)) for x in leaves)
    assert total == encoder + projector + decoder + lm_head
    assert round(total / 1e9, 2) == 8.40 and round(encoder / 1e9, 2) == 0.64
    assert round((decoder + lm_head) / 1e9, 2) == 7.75


def test_run_settings_apply_to_loaded_checkpoints(hf_dir, tmp_path):
    """remat and model.attention are how a run computes, not part of a checkpoint: the run config's values apply
    to a model read from HF safetensors (the trainer's build_model, init.hf_dir) or restored from orbax."""
    from types import SimpleNamespace

    from emorl_jax.config import load_run_config
    from emorl_jax.models.qwen2 import Attention
    from emorl_jax.run_setup import build_model

    def settings(model):
        attention = {m.implementation for _, m in nnx.iter_graph(model) if isinstance(m, Attention)}
        return model.cfg.remat, model.cfg.attention, model.language_model.remat, attention

    config = load_run_config("tiny_synthetic")
    config.init.hf_dir = str(hf_dir)
    config.model.remat, config.model.attention = True, "splash_interpret"
    cfg = checkpoint.model_config(hf_dir)
    tokenizer = SimpleNamespace(vocab_size=cfg.text.vocab_size, audio_token_id=cfg.audio_token_index)
    model = build_model(config, tokenizer, make_mesh((1, -1, 1)))
    assert settings(model) == (True, "splash_interpret", True, {"splash_interpret"})
    checkpoint.save(model, tmp_path / "orbax")
    assert settings(checkpoint.restore(tmp_path / "orbax")) == (True, "splash_interpret", True, {"splash_interpret"})
    again = checkpoint.load(tmp_path / "orbax", remat=False, attention="xla")
    assert settings(again) == (False, "xla", False, {"xla"})
    assert settings(checkpoint.load(hf_dir, remat=True)) == (True, "xla", True, {"xla"})


def test_build_model_checks_the_tokenizer_before_reading_weights(hf_dir, monkeypatch):
    from types import SimpleNamespace

    from emorl_jax.config import load_run_config
    from emorl_jax.errors import TokenizerError
    from emorl_jax.run_setup import build_model

    config = load_run_config("tiny_synthetic")
    config.init.hf_dir = str(hf_dir)
    monkeypatch.setattr(checkpoint, "from_hf", lambda *a, **k: pytest.fail("read the weights before the check"))
    cfg = checkpoint.model_config(hf_dir)
    tokenizer = SimpleNamespace(vocab_size=cfg.text.vocab_size + 1, audio_token_id=cfg.audio_token_index,
                                path="tok.json")
    with pytest.raises(TokenizerError, match=f"tok.json: {cfg.text.vocab_size + 1} tokens, but the model has only"):
        build_model(config, tokenizer, make_mesh((1, -1, 1)))
