"""Qwen2 decoder: RMSNorm, RoPE, GQA with q/k/v bias, SwiGLU MLP, and a preallocated KV cache."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from emorl_jax.config import AudioLMConfig
from emorl_jax.models.layers import Dense, Embed, RMSNorm, scan_layers, stack_layers
from emorl_jax.sharding import constrain

HIDDEN = ("batch", "length", "embed")  # logical axes of the hidden states [B, T, d]
KV = ("batch", "length", "kv_heads", None)  # of keys/values [B, T, kv_heads, head_dim]


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer for `length` slots, and which slots hold a real (non-pad) token.

    k, v:  [layers, B, length, kv_heads, head_dim] in the compute dtype.
    mask:  [B, length] int32, 1 where a real token was written.
    index: [] int32, the next slot to write.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, cfg: AudioLMConfig, batch: int, length: int) -> KVCache:
        t = cfg.text
        shape = (t.num_hidden_layers, batch, length, t.num_key_value_heads, t.head_dim)
        zeros = jnp.zeros(shape, cfg.compute_dtype)
        return cls.constrained(zeros, zeros, jnp.zeros((batch, length), jnp.int32), jnp.zeros((), jnp.int32))

    @classmethod
    def constrained(cls, k, v, mask, index) -> KVCache:
        """A cache whose k/v/mask carry the activation constraints (batch, and kv_heads for k/v)."""
        return cls(constrain(k, (None, *KV)), constrain(v, (None, *KV)), constrain(mask, ("batch", "length")), index)

    def tile(self, n: int) -> KVCache:
        """Repeats every row `n` times (row b -> rows b*n .. b*n+n-1): one prefill shared by n rollouts."""
        return KVCache.constrained(jnp.repeat(self.k, n, axis=1), jnp.repeat(self.v, n, axis=1),
                                   jnp.repeat(self.mask, n, axis=0), self.index)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding (rotate-half form) of x [B, T, H, D] at integer positions [B, T]; math in fp32."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    cos, sin = jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)
    rotated = jnp.concatenate([-x2, x1], -1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: AudioLMConfig, *, rngs: nnx.Rngs):
        t = cfg.text
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs, init_std=t.initializer_range)
        q_dim, kv_dim = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
        self.q_proj = Dense(t.hidden_size, q_dim, axes=("embed", "heads"), use_bias=True, **kw)
        self.k_proj = Dense(t.hidden_size, kv_dim, axes=("embed", "kv_heads"), use_bias=True, **kw)
        self.v_proj = Dense(t.hidden_size, kv_dim, axes=("embed", "kv_heads"), use_bias=True, **kw)
        self.o_proj = Dense(q_dim, t.hidden_size, axes=("heads", "embed"), use_bias=False, **kw)
        self.heads, self.kv_heads, self.head_dim, self.theta = (
            t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.rope_theta)

    def __call__(self, x, positions, mask, kv=None, index=None):
        """x [B, T, d]; mask [B, T, S] bool (query t may see key s). With `kv` = (k, v) cache slices
        [B, S, kv_heads, head_dim], the new keys/values are written at `index` and attention runs over all S
        slots; returns (out [B, T, d], (k, v))."""
        b, t, _ = x.shape
        heads = ("batch", "length", "heads", None)
        q = constrain(rope(self.q_proj(x).reshape(b, t, self.heads, self.head_dim), positions, self.theta), heads)
        k = constrain(rope(self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim), positions, self.theta), KV)
        v = constrain(self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim), KV)
        if kv is not None:
            k = constrain(jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), index, axis=1), KV)
            v = constrain(jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), index, axis=1), KV)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=self.head_dim**-0.5)
        out = constrain(out, heads)
        return self.o_proj(out.reshape(b, t, self.heads * self.head_dim)), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: AudioLMConfig, *, rngs: nnx.Rngs):
        t = cfg.text
        kw = dict(use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs,
                  init_std=t.initializer_range)
        self.gate_proj = Dense(t.hidden_size, t.intermediate_size, axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(t.hidden_size, t.intermediate_size, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(t.intermediate_size, t.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        """x [B, T, d] -> [B, T, d] (SwiGLU)."""
        h = constrain(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x), ("batch", "length", "mlp"))
        return self.down_proj(h)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: AudioLMConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.text.rms_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype)
        self.input_layernorm = RMSNorm(cfg.text.hidden_size, **norm)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.text.hidden_size, **norm)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, mask, kv=None, index=None):
        """x [B, T, d] -> (x [B, T, d], (k, v)); see `Attention`."""
        x = constrain(x, HIDDEN)
        h, kv = self.self_attn(self.input_layernorm(x), positions, mask, kv, index)
        x = x + h
        return constrain(x + self.mlp(self.post_attention_layernorm(x)), HIDDEN), kv


class Qwen2Model(nnx.Module):
    """Token embedding, the scanned decoder layers and the final norm (HF `Qwen2Model`)."""

    def __init__(self, cfg: AudioLMConfig, *, rngs: nnx.Rngs):
        t = cfg.text
        self.embed_tokens = Embed(t.vocab_size, t.hidden_size, dtype=cfg.compute_dtype,
                                  param_dtype=cfg.params_dtype, rngs=rngs, init_std=t.initializer_range)
        self.layers = stack_layers(lambda: DecoderLayer(cfg, rngs=rngs), t.num_hidden_layers)
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, dtype=cfg.compute_dtype,
                            param_dtype=cfg.params_dtype)
        self.remat = cfg.remat

    def __call__(self, embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """embeds [B, T, d], positions [B, T] int, attention_mask [B, T] (1 = real token).

        Without a cache: causal attention over the T tokens. With one: the T tokens are written at
        `cache.index` and attend to every earlier real slot. Returns (hidden [B, T, d], updated cache).
        """
        t = embeds.shape[1]
        if cache is None:
            causal = jnp.tril(jnp.ones((t, t), bool))
            mask = causal[None] & attention_mask.astype(bool)[:, None, :]
            x, _ = scan_layers(self.layers, lambda layer, h, _: (layer(h, positions, mask)[0], None), embeds,
                               remat=self.remat)
            return self.norm(x), None
        slots = cache.mask.shape[1]
        kv_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, attention_mask.astype(jnp.int32), cache.index, 1)
        query_slot = cache.index + jnp.arange(t)
        mask = (jnp.arange(slots)[None, :] <= query_slot[:, None])[None] & kv_mask.astype(bool)[:, None, :]

        step = lambda layer, h, kv: layer(h, positions, mask, kv, cache.index)
        x, (k, v) = scan_layers(self.layers, step, embeds, (cache.k, cache.v), remat=self.remat)
        return self.norm(x), KVCache.constrained(k, v, kv_mask, cache.index + t)
