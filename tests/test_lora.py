"""LoRA adapters: exact no-op at init, numpy oracle W + scale·A·B, merge, split, gradients, one scan trace."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from emorl_jax import checkpoint, sharding
from emorl_jax.config import TINY
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.models.layers import Dense
from emorl_jax.models.lora import (DEFAULT_TARGETS, LoRADense, add_lora, count_lora_params, merge_lora,
                                   split_trainable, zero_lora)

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK


def _module(model, name):
    layers = model.language_model.layers
    return getattr(layers.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layers.mlp, name)


def _inputs():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(10, TINY.text.vocab_size, (2, 12)))
    mask = jnp.asarray([[0, 0, 0] + [1] * 9, [1] * 12])  # row 0 left-padded
    return ids, mask


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
    return nnx.merge(graphdef, state)(ids, attention_mask=mask)


def _logits(model):
    """Logits [real tokens, vocab] of `_inputs()`; one compile per model structure."""
    ids, mask = _inputs()
    return np.asarray(_forward(*nnx.split(model), ids, mask))[np.asarray(mask).astype(bool)]


def _randomise_b(model, seed=1):
    rng = np.random.default_rng(seed)
    for name in DEFAULT_TARGETS:
        b = _module(model, name).lora_b
        b[...] = jnp.asarray(rng.normal(0.0, 0.05, b.shape), jnp.float32)


def test_fresh_adapter_is_exact_noop_and_input_untouched():
    base = AudioLM(TINY, rngs=nnx.Rngs(0))
    lora = add_lora(base, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(_logits(lora), _logits(base))
    assert all(type(_module(base, n)) is Dense for n in DEFAULT_TARGETS)  # add_lora copies, never mutates
    assert all(isinstance(_module(lora, n), LoRADense) for n in DEFAULT_TARGETS)
    assert type(lora.audio_tower.layers.self_attn.q_proj) is Dense  # the audio encoder is not adapted


def test_a_init_is_kaiming_uniform_per_layer():
    lora = add_lora(AudioLM(TINY, rngs=nnx.Rngs(0)), rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
    for name in DEFAULT_TARGETS:
        a = np.asarray(_module(lora, name).lora_a[...])
        din = a.shape[1]
        assert np.abs(a).max() <= 1 / np.sqrt(din)  # PEFT: U(-1/sqrt(in), 1/sqrt(in))
        assert abs(a.std() - 1 / np.sqrt(3 * din)) < 0.25 / np.sqrt(3 * din)
        assert not np.array_equal(a[0], a[1])  # each stacked layer draws its own adapter
        assert not np.any(np.asarray(_module(lora, name).lora_b[...]))


def test_adapter_matches_numpy_merged_kernels_and_merge_lora():
    lora = add_lora(AudioLM(TINY, rngs=nnx.Rngs(0)), rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
    _randomise_b(lora)
    oracle = AudioLM(TINY, rngs=nnx.Rngs(0))  # the same base weights
    merged_kernels = {}
    for name in DEFAULT_TARGETS:
        m = _module(lora, name)
        a, b, w = (np.asarray(x[...], np.float64) for x in (m.lora_a, m.lora_b, m.kernel))
        merged_kernels[name] = (w + SCALE * np.matmul(a, b)).astype(np.float32)  # [L, in, out]
        _module(oracle, name).kernel[...] = jnp.asarray(merged_kernels[name])
    got, want = _logits(lora), _logits(oracle)
    assert np.abs(want - _logits(AudioLM(TINY, rngs=nnx.Rngs(0)))).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    merged = merge_lora(lora)
    assert count_lora_params(merged) == 0 and not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    assert all(type(_module(merged, n)) is Dense for n in DEFAULT_TARGETS)
    assert all(isinstance(_module(lora, n), LoRADense) for n in DEFAULT_TARGETS)  # merge copies too
    for name in DEFAULT_TARGETS:
        np.testing.assert_allclose(np.asarray(_module(merged, name).kernel[...]), merged_kernels[name],
                                   rtol=0, atol=1e-6)
    np.testing.assert_allclose(_logits(merged), got, rtol=0, atol=1e-5)
    graphdef, params, frozen = split_trainable(lora, lora=True)  # merging inside jit (before sampling)
    ids, mask = _inputs()
    jitted = jax.jit(lambda p: merge_lora(nnx.merge(graphdef, p, frozen))(ids, attention_mask=mask))(params)
    np.testing.assert_allclose(np.asarray(jitted)[np.asarray(mask).astype(bool)], got, rtol=0, atol=1e-5)

    # A merged model exports to the HF names of the base model, kernels transposed to [out, in].
    tensors = dict(checkpoint.hf_tensors(merged))
    assert set(tensors) == {n for n, _ in checkpoint.hf_tensors(oracle)}
    np.testing.assert_allclose(tensors["language_model.model.layers.1.self_attn.q_proj.weight"],
                               merged_kernels["q_proj"][1].T, rtol=0, atol=1e-6)


def test_split_separates_lora_params_with_predicted_count():
    targets = ("q_proj", "v_proj", "down_proj")
    lora = add_lora(AudioLM(TINY, rngs=nnx.Rngs(0)), rank=RANK, alpha=ALPHA, targets=targets, rngs=nnx.Rngs(1))
    t = TINY.text
    dims = {"q_proj": (t.hidden_size, t.num_attention_heads * t.head_dim),
            "v_proj": (t.hidden_size, t.num_key_value_heads * t.head_dim),
            "down_proj": (t.intermediate_size, t.hidden_size)}
    predicted = sum(RANK * (din + dout) * t.num_hidden_layers for din, dout in dims.values())

    graphdef, params, frozen = split_trainable(lora, lora=True)
    leaves = jax.tree.leaves(params)
    assert sum(x.size for x in leaves) == predicted == count_lora_params(lora) == 2 * 4 * (64 + 64 + 64 + 32 + 160 + 64)
    assert len(leaves) == 2 * len(targets)
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(frozen))
    assert count_lora_params(nnx.merge(graphdef, params, frozen)) == predicted
    base_count = sum(x.size for x in jax.tree.leaves(nnx.state(AudioLM(TINY, rngs=nnx.Rngs(0)))))
    assert sum(x.size for x in jax.tree.leaves(frozen)) == base_count

    _, all_params, rest = split_trainable(lora, lora=False)
    assert sum(x.size for x in jax.tree.leaves(all_params)) == base_count + predicted
    assert not jax.tree.leaves(rest)


def test_grad_reaches_only_adapters_b_first_then_a():
    lora = add_lora(AudioLM(TINY, rngs=nnx.Rngs(0)), rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
    graphdef, params, frozen = split_trainable(lora, lora=True)
    frozen_before = [np.asarray(x) for x in jax.tree.leaves(frozen)]
    ids, mask = _inputs()
    targets = jnp.roll(ids, -1, axis=1)

    @jax.jit
    def loss_and_grad(params):
        def loss(params):
            logits = nnx.merge(graphdef, params, frozen)(ids, attention_mask=mask)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
            return -(logp * mask).sum() / mask.sum()
        return jax.value_and_grad(loss)(params)

    def per_layer_norms(grads, leaf):
        return [np.linalg.norm(np.asarray(g[...]).reshape(TINY.text.num_hidden_layers, -1), axis=1)
                for path, g in nnx.to_flat_state(grads) if path[-1] == leaf]

    loss0, grads = loss_and_grad(params)
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(grads))
    assert all(np.all(n > 0) for n in per_layer_norms(grads, "lora_b"))
    assert all(np.all(n == 0) for n in per_layer_norms(grads, "lora_a"))  # B = 0 blocks A's gradient

    sgd = lambda p, g: jax.tree.map(lambda x, d: x - 0.05 * d, p, g)
    params = sgd(params, grads)
    loss1, grads = loss_and_grad(params)
    assert all(np.all(n > 0) for n in per_layer_norms(grads, "lora_a"))
    assert loss1 < loss0
    for before, after in zip(frozen_before, jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(before, np.asarray(after))
    assert loss_and_grad._cache_size() == 1


def test_zero_lora_gives_the_base_model_exactly():
    base = AudioLM(TINY, rngs=nnx.Rngs(0))
    lora = add_lora(base, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
    _randomise_b(lora)
    graphdef, params, frozen = split_trainable(lora, lora=True)
    reference = nnx.merge(graphdef, zero_lora(params), frozen)
    np.testing.assert_array_equal(_logits(reference), _logits(base))
    assert np.abs(_logits(lora) - _logits(base)).max() > 1e-2
    _, all_params, _ = split_trainable(lora, lora=False)  # non-LoRA leaves pass through unchanged
    pairs = zip(nnx.to_flat_state(all_params), nnx.to_flat_state(zero_lora(all_params)))
    for (path, before), (_, after) in pairs:
        expected = 0 * np.asarray(before[...]) if isinstance(before, nnx.LoRAParam) else np.asarray(before[...])
        np.testing.assert_array_equal(np.asarray(after[...]), expected, err_msg=str(path))


def test_scan_traces_each_adapter_once_whatever_the_depth(monkeypatch):
    cfg = TINY.replace(text=dataclasses.replace(TINY.text, num_hidden_layers=5))
    lora = add_lora(AudioLM(cfg, rngs=nnx.Rngs(0)), rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
    graphdef, params, frozen = split_trainable(lora, lora=True)
    calls = []
    original = LoRADense.__call__
    monkeypatch.setattr(LoRADense, "__call__", lambda self, x: calls.append(1) or original(self, x))
    ids, mask = _inputs()
    forward = jax.jit(lambda p: nnx.merge(graphdef, p, frozen)(ids, attention_mask=mask))
    first = forward(params)
    second = forward(zero_lora(params))
    assert len(calls) == len(DEFAULT_TARGETS)  # one trace of the scan body, not one per layer
    assert forward._cache_size() == 1
    assert first.shape == second.shape == (2, 12, cfg.text.vocab_size)


def test_lora_model_runs_sharded_on_the_mesh():
    lora = add_lora(AudioLM(TINY, rngs=nnx.Rngs(0)), rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
    _randomise_b(lora)
    mesh = sharding.make_mesh((1, 2, 4))
    graphdef, state, shardings = sharding.shard_model(lora, mesh)
    ids, mask = _inputs()
    batch = sharding.batch_sharding(mesh, 2)
    fn = jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, attention_mask=m), in_shardings=(shardings, batch, batch))
    got = np.asarray(fn(state, ids, mask))[np.asarray(mask).astype(bool)]
    np.testing.assert_allclose(got, _logits(lora), rtol=0, atol=1e-5)


def test_adapters_carry_their_kernels_logical_axes():
    lora = add_lora(AudioLM(TINY, rngs=nnx.Rngs(0)), rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
    axes = lambda v: v.get_metadata("out_sharding")
    q, down = _module(lora, "q_proj"), _module(lora, "down_proj")
    assert axes(q.lora_a) == ("layers", "embed", None) and axes(q.lora_b) == ("layers", None, "heads")
    assert axes(down.lora_a) == ("layers", "mlp", None) and axes(down.lora_b) == ("layers", None, "embed")
    assert axes(_module(merge_lora(lora), "q_proj").kernel) == ("layers", "embed", "heads")


def test_bad_arguments_raise_clear_errors():
    base = AudioLM(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        add_lora(base, rank=0, alpha=ALPHA, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"targets \['qkv'\] are not decoder projections; known: \['down_proj'"):
        add_lora(base, rank=RANK, alpha=ALPHA, targets=("q_proj", "qkv"), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="targets are empty"):
        add_lora(base, rank=RANK, alpha=ALPHA, targets=(), rngs=nnx.Rngs(1))
    lora = add_lora(base, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="already has adapters"):
        add_lora(lora, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"no LoRA adapters; call add_lora first"):
        split_trainable(base, lora=True)
    with pytest.raises(ValueError, match="has no `language_model.layers` decoder stack"):
        dense = Dense(2, 2, axes=(None, None), use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                      rngs=nnx.Rngs(0))
        add_lora(dense, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
