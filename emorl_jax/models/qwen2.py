"""Qwen2 decoder: RMSNorm, RoPE, GQA with q/k/v bias, SwiGLU MLP, and a preallocated KV cache."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from emorl_jax.config import AudioLMConfig
from emorl_jax.models.attention import Mask, attend, attend_with_shared_prefix, grouped_pattern
from emorl_jax.models.layers import Dense, Embed, RMSNorm, scan_layers, stack_layers
from emorl_jax.sharding import constrain

HIDDEN = ("batch", "length", "embed")  # logical axes of the hidden states [B, T, d]
KV = ("batch", "length", "kv_heads", None)  # of keys/values [B, T, kv_heads, head_dim]
CACHE_KV = ("layers", "batch", "kv_heads", "length", None)  # of the cache [layers, B, kv_heads, S, head_dim]
DECODE_CHUNK = 64  # a cascade decode step attends over the own slots in whole chunks of this many, up to the last
                   # written one (`Attention.cached`): a step's cost follows the filled length, not the cache's


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer for `length` slots, and which slots hold a real (non-pad) token.

    k, v:   [layers, B, kv_heads, length, head_dim] in the compute dtype: per (row, head) the slots are the rows
            of a [length, head_dim] matrix, as the decode dots read them (no transpose), and a step writes one
            slot of every layer in place (`Attention.cached`).
    mask:   [B, length] int32, 1 where a real token was written.
    index:  [] int32, the next slot to write.
    prefix: None, or the cache of a shared prompt that every group of B / prefix.B consecutive rows continues
            (row b*G + r continues prefix row b): stored once per prompt, attended to before the own slots.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array
    prefix: KVCache | None = None

    @classmethod
    def init(cls, cfg: AudioLMConfig, batch: int, length: int, prefix: KVCache | None = None) -> KVCache:
        t = cfg.text
        shape = (t.num_hidden_layers, batch, t.num_key_value_heads, length, t.head_dim)
        zeros = jnp.zeros(shape, cfg.compute_dtype)
        return cls.constrained(zeros, zeros, jnp.zeros((batch, length), jnp.int32), jnp.zeros((), jnp.int32), prefix)

    @classmethod
    def constrained(cls, k, v, mask, index, prefix=None) -> KVCache:
        """A cache whose k/v/mask carry the activation constraints (batch, and kv_heads for k/v)."""
        layout = (None, *CACHE_KV[1:])
        return cls(constrain(k, layout), constrain(v, layout), constrain(mask, ("batch", "length")), index, prefix)


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
        self.implementation = cfg.attention

    def _qkv(self, x, positions):
        """q [B, T, heads, head_dim], k and v [B, T, kv_heads, head_dim] of x [B, T, d] (RoPE applied)."""
        b, t, _ = x.shape
        q = rope(self.q_proj(x).reshape(b, t, self.heads, self.head_dim), positions, self.theta)
        k = rope(self.k_proj(x).reshape(b, t, self.kv_heads, self.head_dim), positions, self.theta)
        return q, k, self.v_proj(x).reshape(b, t, self.kv_heads, self.head_dim)

    def __call__(self, x, positions, mask: Mask):
        """x [B, T, d]; mask: which of the T keys each query sees (`attention.Mask` [B, T, T]), by
        `model.attention`. Returns (out [B, T, d], (k, v)) with k, v [B, T, kv_heads, head_dim]."""
        b, t, _ = x.shape
        heads = ("batch", "length", "heads", None)
        q, k, v = self._qkv(x, positions)
        q, k, v = constrain(q, heads), constrain(k, KV), constrain(v, KV)
        out = attend(q, k, v, mask, scale=self.head_dim**-0.5, implementation=self.implementation)
        out = constrain(out, heads)
        return self.o_proj(out.reshape(b, t, self.heads * self.head_dim)), (k, v)

    def cached(self, x, positions, mask, cache_k, cache_v, layer, index, prefix=None):
        """x [B, T, d] written at slot `index` of layer `layer` of the whole cache (k, v [layers, B, kv_heads, S,
        head_dim], updated in place), then attending over that layer's S slots; mask [B, T, S] bool.

        prefix: None, or (k, v [layers, P, kv_heads, T_p, head_dim], mask [P, T_p] bool) of a prompt shared by
        G = B / P consecutive rows (cascade attention): every query also attends to its prompt's slots, stored
        once, one softmax over both (`attention.attend_with_shared_prefix`). Returns (out [B, T, d], cache_k,
        cache_v)."""
        b, t, _ = x.shape
        rep = self.heads // self.kv_heads
        q, k, v = self._qkv(x, positions)
        start = (layer, 0, 0, index, 0)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3)[None].astype(cache_k.dtype), start)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3)[None].astype(cache_v.dtype), start)
        q = q.reshape(b, t, self.kv_heads, rep, self.head_dim).astype(cache_k.dtype)
        scale = self.head_dim**-0.5
        if prefix is None:  # einsums in dot_general's own output order (batch dims, then free dims): no transposes
            keys = jax.lax.dynamic_index_in_dim(cache_k, layer, keepdims=False)  # [B, kv_heads, S, head_dim]
            values = jax.lax.dynamic_index_in_dim(cache_v, layer, keepdims=False)
            scores = jnp.einsum("btkrd,bksd->bktrs", q, keys, preferred_element_type=jnp.float32) * scale
            scores = jnp.where(mask[:, None, :, None], scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
            out = jnp.einsum("bktrs,bksd->btkrd", probs, values).astype(x.dtype)
            return self.o_proj(out.reshape(b, t, self.heads * self.head_dim)), cache_k, cache_v
        prompt_k, prompt_v, prompt_mask = prefix
        p, slots = prompt_mask.shape[0], cache_k.shape[3]
        g = b // p
        qg = q.reshape(p, g, t, self.kv_heads, rep, self.head_dim)

        def first(width: int):  # attention over the first `width` own slots: the slots after them are still empty
            def run(cache_k, cache_v, prompt_k, prompt_v):  # whole buffers in, indexed here: no copy to pass them
                own = lambda c: jax.lax.dynamic_slice_in_dim(jax.lax.dynamic_index_in_dim(c, layer, keepdims=False),
                                                             0, width, axis=2).reshape(p, g, self.kv_heads, width, -1)
                shared = lambda c: jax.lax.dynamic_index_in_dim(c, layer, keepdims=False)  # [P, kv_heads, T_p, hd]
                return attend_with_shared_prefix(qg, shared(prompt_k), shared(prompt_v), prompt_mask, own(cache_k),
                                                 own(cache_v), mask[..., :width].reshape(p, g, t, width), scale=scale)
            return run

        widths = range(DECODE_CHUNK, slots + DECODE_CHUNK, DECODE_CHUNK)
        branches = [first(min(w, slots)) for w in widths]
        filled = jnp.clip((index + t - 1) // DECODE_CHUNK, 0, len(branches) - 1)  # chunks holding written slots
        out = jax.lax.switch(filled, branches, cache_k, cache_v, prompt_k, prompt_v)
        return self.o_proj(out.astype(x.dtype).reshape(b, t, self.heads * self.head_dim)), cache_k, cache_v

    def grouped(self, x, positions, prompt_kv, prompt_mask, mask, group_size: int):
        """Completions attending to their shared prompt's keys/values without tiling them (`Qwen2Model.grouped`).

        x [B*G, N, d] (row b*G + r continues prompt b); prompt_kv (k, v) [B, T, kv_heads, head_dim];
        prompt_mask [B, T] bool (real prompt tokens); mask [B*G, N, N] bool (completion query n may see
        completion key m). One softmax over the T prompt keys and the N completion keys. Returns [B*G, N, d]."""
        rows, n, _ = x.shape
        b, g, rep = rows // group_size, group_size, self.heads // self.kv_heads
        q, k, v = self._qkv(x, positions)
        heads_major = lambda a: a.transpose(0, 2, 1, 3)  # [rows, kv_heads, length, head_dim]
        own = lambda a: heads_major(a).reshape(b, g, self.kv_heads, n, self.head_dim)
        pk, pv = prompt_kv
        out = attend_with_shared_prefix(q.reshape(b, g, n, self.kv_heads, rep, self.head_dim), heads_major(pk),
                                        heads_major(pv), prompt_mask, own(k), own(v), mask.reshape(b, g, n, n),
                                        scale=self.head_dim**-0.5)
        return self.o_proj(out.astype(x.dtype).reshape(rows, n, self.heads * self.head_dim))


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

    def __call__(self, x, positions, mask):
        """x [B, T, d] -> (x [B, T, d], (k, v)); see `Attention`."""
        x = constrain(x, HIDDEN)
        h, kv = self.self_attn(self.input_layernorm(x), positions, mask)
        return self._mlp_block(x + h), kv

    def cached(self, x, positions, mask, cache_k, cache_v, layer, index, prefix=None):
        """x [B, T, d] -> (x, cache_k, cache_v); see `Attention.cached`."""
        x = constrain(x, HIDDEN)
        h, cache_k, cache_v = self.self_attn.cached(self.input_layernorm(x), positions, mask, cache_k, cache_v,
                                                    layer, index, prefix)
        return self._mlp_block(x + h), cache_k, cache_v

    def grouped(self, prompt, completion, prompt_positions, positions, prompt_mask: Mask, prompt_key_mask, mask,
                group_size: int):
        """The layer on a prompt [B, T, d] (causal, `prompt_mask`) and its G completions [B*G, N, d]
        (`Attention.grouped`): (prompt, completion) out."""
        prompt, kv = self(prompt, prompt_positions, prompt_mask)
        completion = constrain(completion, HIDDEN)
        h = self.self_attn.grouped(self.input_layernorm(completion), positions, kv, prompt_key_mask, mask, group_size)
        return prompt, self._mlp_block(completion + h)

    def _mlp_block(self, x):
        return constrain(x + self.mlp(self.post_attention_layernorm(x)), HIDDEN)


class Qwen2Model(nnx.Module):
    """Token embedding, the scanned decoder layers and the final norm (HF `Qwen2Model`)."""

    def __init__(self, cfg: AudioLMConfig, *, rngs: nnx.Rngs):
        t = cfg.text
        self.embed_tokens = Embed(t.vocab_size, t.hidden_size, dtype=cfg.compute_dtype,
                                  param_dtype=cfg.params_dtype, rngs=rngs, init_std=t.initializer_range)
        self.layers = stack_layers(lambda: DecoderLayer(cfg, rngs=rngs), t.num_hidden_layers)
        self.norm = RMSNorm(t.hidden_size, eps=t.rms_norm_eps, dtype=cfg.compute_dtype,
                            param_dtype=cfg.params_dtype)
        self.remat, self.attention = cfg.remat, cfg.attention

    def __call__(self, embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """embeds [B, T, d], positions [B, T] int, attention_mask [B, T] (1 = real token).

        Without a cache: causal attention over the T tokens (by `model.attention`). With one: the T tokens are
        written at `cache.index` and attend to every earlier real slot (after the real slots of `cache.prefix`,
        the shared prompt, if any). Returns (hidden [B, T, d], updated cache).
        """
        t = embeds.shape[1]
        if cache is None:
            mask = Mask.causal(attention_mask)
            x, _ = scan_layers(self.layers, lambda layer, h, _: (layer(h, positions, mask)[0], None), embeds,
                               remat=self.remat)
            return self.norm(x), None
        slots = cache.mask.shape[1]
        kv_mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, attention_mask.astype(jnp.int32), cache.index, 1)
        query_slot = cache.index + jnp.arange(t)
        mask = (jnp.arange(slots)[None, :] <= query_slot[:, None])[None] & kv_mask.astype(bool)[:, None, :]

        prefix = None if cache.prefix is None else (cache.prefix.k, cache.prefix.v, cache.prefix.mask.astype(bool))

        def step(layer, carry, number):  # the whole cache rides in the carry: each layer writes its slots in place
            return layer.cached(*carry[:1], positions, mask, *carry[1:], number, cache.index, prefix), None

        layers = cache.k.shape[0]
        (x, k, v), _ = scan_layers(self.layers, step, (embeds, cache.k, cache.v), jnp.arange(layers),
                                   remat=self.remat)
        return self.norm(x), KVCache.constrained(k, v, kv_mask, cache.index + t, cache.prefix)

    def prefill(self, embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array) -> tuple[jax.Array, KVCache]:
        """The causal pass of `__call__` (by `model.attention`) that also returns its keys/values as a cache of
        exactly T slots (index T), for decoding to continue: (hidden [B, T, d], KVCache)."""
        mask = Mask.causal(attention_mask)
        x, (k, v) = scan_layers(self.layers, lambda layer, h, _: layer(h, positions, mask), embeds, remat=self.remat)
        to_cache = lambda a: a.transpose(0, 1, 3, 2, 4).astype(embeds.dtype)  # [layers, B, kv_heads, T, head_dim]
        cache = KVCache.constrained(to_cache(k), to_cache(v), attention_mask.astype(jnp.int32),
                                    jnp.asarray(embeds.shape[1], jnp.int32))
        return self.norm(x), cache

    def grouped(self, prompt: jax.Array, prompt_mask: jax.Array, completion: jax.Array, completion_mask: jax.Array,
                group_size: int) -> tuple[jax.Array, jax.Array]:
        """A prompt run once for the G completions that continue it: prompt embeds [B, T, d] (left-padded,
        prompt_mask [B, T]) and completion embeds [B*G, N, d] (completion_mask [B*G, N], row b*G + r continues
        prompt b). Equal to running each concatenated row [prompt b, completion r] causally (positions count real
        tokens), at T + G*N instead of G*(T + N) tokens. With a fused attention kernel (`model.attention` not xla)
        each prompt and its completions run as one packed row under `attention.grouped_pattern`. Returns final-norm
        hidden states (prompt [B, T, d], completions [B*G, N, d])."""
        (b, t, d), n = prompt.shape, completion.shape[1]
        prompt_positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
        before = jnp.repeat(prompt_mask.sum(-1, keepdims=True), group_size, axis=0)  # real prompt tokens per row
        positions = before + jnp.maximum(jnp.cumsum(completion_mask, axis=-1) - 1, 0)
        if self.attention != "xla":  # a fused kernel: one packed row [prompt, completion 1..G] per prompt
            packed = jnp.concatenate([prompt, completion.reshape(b, group_size * n, d)], axis=1)
            packed_positions = jnp.concatenate([prompt_positions, positions.reshape(b, group_size * n)], axis=1)
            segments = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones((b, group_size * n), jnp.int32)], 1)
            mask = Mask(grouped_pattern(t, n, group_size), segments, segments)
            x, _ = scan_layers(self.layers, lambda layer, h, _: (layer(h, packed_positions, mask)[0], None), packed,
                               remat=self.remat)
            x = self.norm(x)
            return x[:, :t], x[:, t:].reshape(b * group_size, n, d)
        causal_prompt, real = Mask.causal(prompt_mask), prompt_mask.astype(bool)
        causal = jnp.tril(jnp.ones((n, n), bool))[None] & completion_mask.astype(bool)[:, None, :]

        def step(layer, carry, _):
            return layer.grouped(*carry, prompt_positions, positions, causal_prompt, real, causal, group_size), None

        (prompt, completion), _ = scan_layers(self.layers, step, (prompt, completion), remat=self.remat)
        return self.norm(prompt), self.norm(completion)
