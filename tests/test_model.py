"""AudioLM internals: KV-cache decoding equals the full forward; scanned layers keep the program size flat."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emorl_jax.config import TINY
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.models.qwen2 import KVCache


def test_cached_decoding_equals_full_forward():
    model = AudioLM(TINY, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(10, TINY.text.vocab_size, (2, 12)))
    amask = jnp.asarray([[0, 0, 0] + [1] * 9, [1] * 12])  # row 0 left-padded
    positions = jnp.clip(jnp.cumsum(amask, -1) - 1, 0)
    full = model(ids, attention_mask=amask, positions=positions)

    cache = KVCache.init(TINY, 2, 16)
    logits, cache = model(ids[:, :7], attention_mask=amask[:, :7], positions=positions[:, :7], cache=cache)
    steps = [logits]
    for t in range(7, 12):  # one token at a time, as the sampler decodes
        logits, cache = model(ids[:, t:t + 1], attention_mask=amask[:, t:t + 1], positions=positions[:, t:t + 1],
                              cache=cache)
        steps.append(logits)
    cached = jnp.concatenate(steps, axis=1)
    real = np.asarray(amask).astype(bool)
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], rtol=1e-5, atol=1e-5)
    assert int(cache.index) == 12 and np.array_equal(np.asarray(cache.mask[:, :12]), np.asarray(amask))


def test_group_cache_over_a_shared_prompt_continues_each_row_identically():
    """Cascade attention: rows b*G + r of a cache whose `prefix` is prompt b's cache (stored once) continue that
    prompt exactly as a cache holding the prompt in its own slots does."""
    model = AudioLM(TINY, rngs=nnx.Rngs(2))
    ids = jnp.array([[0, 12, 13, 14], [21, 22, 23, 24]])
    amask = jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]])  # row 0 left-padded
    positions = jnp.clip(jnp.cumsum(amask, -1) - 1, 0)
    _, prompt = model(ids, attention_mask=amask, positions=positions, cache=KVCache.init(TINY, 2, 4))
    group = KVCache.init(TINY, 6, 3, prefix=prompt)
    steps = [jnp.array([[30], [31], [32], [40], [41], [42]]), jnp.array([[50], [51], [52], [60], [61], [62]])]
    got = []
    for k, nxt in enumerate(steps):
        pos = jnp.repeat(positions[:, -1:] + 1 + k, 3, axis=0)
        logits, group = model(nxt, positions=pos, cache=group)
        got.append(logits)
    for row in range(6):
        b = row // 3
        _, single = model(ids[b:b + 1], attention_mask=amask[b:b + 1], positions=positions[b:b + 1],
                          cache=KVCache.init(TINY, 1, 6))
        for k, nxt in enumerate(steps):
            ref, single = model(nxt[row:row + 1], positions=positions[b:b + 1, -1:] + 1 + k, cache=single)
            np.testing.assert_allclose(np.asarray(got[k][row]), np.asarray(ref[0]), rtol=1e-5, atol=1e-6)
    assert group.k.shape[1:] == (6, TINY.text.num_key_value_heads, 3, TINY.text.head_dim)  # own slots only


def _hlo_size(layers: int) -> int:
    cfg = TINY.replace(text=dataclasses.replace(TINY.text, num_hidden_layers=layers),
                       audio=dataclasses.replace(TINY.audio, encoder_layers=layers))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: AudioLM(cfg, rngs=nnx.Rngs(0))))
    frames = cfg.audio.num_frames
    fn = jax.jit(lambda s, i, f, m: nnx.merge(graphdef, s)(i, f, m))
    lowered = fn.lower(state, jax.ShapeDtypeStruct((1, 120), jnp.int32),
                       jax.ShapeDtypeStruct((1, cfg.audio.num_mel_bins, frames), jnp.float32),
                       jax.ShapeDtypeStruct((1, frames), jnp.int32))
    return len(lowered.as_text())


def test_program_size_does_not_grow_with_depth():
    assert _hlo_size(8) <= 1.02 * _hlo_size(2)


def test_params_carry_logical_axes_from_creation():
    params = nnx.state(nnx.eval_shape(lambda: AudioLM(TINY, rngs=nnx.Rngs(0))), nnx.Param)
    axes = {".".join(str(k) for k in path): v.get_metadata("out_sharding")
            for path, v in nnx.to_flat_state(params)}
    assert axes["language_model.layers.self_attn.q_proj.kernel"] == ("layers", "embed", "heads")
    assert axes["language_model.layers.self_attn.k_proj.bias"] == ("layers", "kv_heads")
    assert axes["language_model.layers.self_attn.o_proj.kernel"] == ("layers", "heads", "embed")
    assert axes["language_model.layers.mlp.down_proj.kernel"] == ("layers", "mlp", "embed")
    assert axes["language_model.layers.input_layernorm.scale"] == ("layers", None)
    assert axes["language_model.embed_tokens.embedding"] == ("vocab", "embed")
    assert axes["language_model.norm.scale"] == (None,)
    assert axes["audio_tower.conv1.kernel"] == (None, None, "embed")
    assert axes["audio_tower.embed_positions"] == (None, "embed")
    assert axes["audio_tower.layers.fc1.bias"] == ("layers", "mlp")
    assert axes["audio_tower.layers.fc2.bias"] == ("layers", None)  # vectors along the width are replicated
    assert axes["multi_modal_projector.linear.kernel"] == (None, "embed")
    for path, param in nnx.to_flat_state(params):
        assert len(param.get_metadata("out_sharding")) == param.get_value().ndim, path
