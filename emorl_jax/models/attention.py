"""Dot-product attention over a (static pattern x segment ids) mask, by implementation (`model.attention`).

- `xla`: `jax.nn.dot_product_attention`'s XLA form (any backend; materialises fp32 [B, H, T, S] scores).
- `cudnn`: the same call with cuDNN's fused flash attention (NVIDIA GPUs; bf16/fp16 operands).
- `splash`: the Pallas TPU splash-attention kernel, which skips key blocks the pattern masks out and never
  materialises the scores; `splash_interpret` runs the same kernel in the Pallas interpreter (any backend: tests
  and debugging, slow). Under a mesh the kernel runs per shard (`jax.shard_map` over batch and heads).

A query sees a key iff the static `pattern` allows it and both carry the same segment id. Padding is segment 0,
real tokens 1: padding sees only padding, so no row is empty (every pattern here holds its diagonal) and
left-padded rows can never produce NaN in any implementation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec as P

from emorl_jax.config import ATTENTION_IMPLEMENTATIONS
from emorl_jax.sharding import BATCH_AXES

SPLASH_BLOCK = 128  # splash tiles are multiples of the TPU's 128 lanes; sequences are padded up to a multiple


@dataclasses.dataclass(frozen=True)
class Mask:
    """Query t of row b sees key s iff pattern[t, s] and segments_q[b, t] == segments_kv[b, s].

    pattern: a static splash mask [T, S] (`masks.CausalMask`, `masks.FullMask` or `masks.NumpyMask`);
    segments_q [B, T], segments_kv [B, S] int32: 0 = padding, 1 = a real token.
    """

    pattern: masks.Mask
    segments_q: jax.Array
    segments_kv: jax.Array

    @classmethod
    def causal(cls, real: jax.Array) -> Mask:
        """Causal over the T tokens of `real` [B, T] (1 = real token, 0 = padding)."""
        t = real.shape[1]
        return cls(masks.CausalMask((t, t)), real.astype(jnp.int32), real.astype(jnp.int32))

    @classmethod
    def full(cls, real: jax.Array) -> Mask:
        """Bidirectional over the T positions of `real` [B, T]."""
        t = real.shape[1]
        return cls(masks.FullMask((t, t)), real.astype(jnp.int32), real.astype(jnp.int32))

    def dense(self) -> jax.Array:
        """[B, T, S] bool."""
        pattern = jnp.asarray(self.pattern[:, :])
        return pattern[None] & (self.segments_q[:, :, None] == self.segments_kv[:, None, :])


def grouped_pattern(prompt: int, completion: int, group_size: int) -> masks.NumpyMask:
    """The packed layout [prompt, completion 1, ..., completion G] (prompt + G*completion positions): the prompt
    is causal, each completion sees the whole prompt and itself causally, never another completion."""
    n = prompt + group_size * completion
    pattern = np.tril(np.ones((n, n), bool))
    for g in range(group_size):
        start = prompt + g * completion
        pattern[start + completion:, start:start + completion] = False
    return masks.NumpyMask(pattern)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: Mask, *, scale: float, implementation: str) -> jax.Array:
    """q [B, T, H, D], k/v [B, S, KV, D] (H a multiple of KV) -> [B, T, H, D] in q's dtype."""
    if implementation in ("xla", "cudnn"):
        causal = isinstance(mask.pattern, masks.CausalMask) and implementation == "cudnn"  # cuDNN skips the upper half
        return jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[:, None], scale=scale, is_causal=causal,
                                            implementation=implementation)
    if implementation in ("splash", "splash_interpret"):
        return _splash(q, k, v, mask, scale=scale, interpret=implementation == "splash_interpret")
    raise ValueError(f"model.attention={implementation!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")


def attend_with_shared_prefix(q, prefix_k, prefix_v, prefix_mask, k, v, mask, *, scale: float) -> jax.Array:
    """G rows per prompt, each attending to its prompt's keys (stored once per prompt) and to its own keys, under
    one softmax: both parts' scores share one max, their exponentials one sum (XLA; decode steps and the grouped
    log-prob pass). Every einsum keeps dot_general's natural output order, so no cache-sized transpose.

    q [P, G, T, KV, R, D] (R query heads per KV head); prefix_k/v [P, KV, S_p, D], prefix_mask [P, S_p] bool;
    k/v [P, G, KV, S, D], mask [P, G, T, S] bool. Returns [P, G, T, KV, R, D] in fp32."""
    low = jnp.finfo(jnp.float32).min
    own = jnp.einsum("pgtkrd,pgksd->pgktrs", q, k, preferred_element_type=jnp.float32) * scale
    own = jnp.where(mask[:, :, None, :, None, :], own, low)
    shared = jnp.einsum("pgtkrd,pksd->pkgtrs", q, prefix_k, preferred_element_type=jnp.float32) * scale
    shared = jnp.where(prefix_mask[:, None, None, None, None, :], shared, low)
    top = jax.lax.stop_gradient(jnp.maximum(own.max(-1), shared.max(-1).transpose(0, 2, 1, 3, 4)))  # [P, G, KV, T, R]
    own = jnp.exp(own - top[..., None])
    shared = jnp.exp(shared - top.transpose(0, 2, 1, 3, 4)[..., None])
    total = own.sum(-1) + shared.sum(-1).transpose(0, 2, 1, 3, 4)
    out = jnp.einsum("pgktrs,pgksd->pgktrd", own.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out_shared = jnp.einsum("pkgtrs,pksd->pkgtrd", shared.astype(prefix_v.dtype), prefix_v,
                            preferred_element_type=jnp.float32)
    out = (out + out_shared.transpose(0, 2, 1, 3, 4, 5)) / total[..., None]
    return out.transpose(0, 1, 3, 2, 4, 5)


def _splash(q, k, v, mask: Mask, *, scale: float, interpret: bool):
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    tp, sp = -t % SPLASH_BLOCK, -s % SPLASH_BLOCK  # padded positions are segment 0: only padding sees them
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))
    q, k, v = pad(q * jnp.asarray(scale, q.dtype), tp), pad(k, sp), pad(v, sp)
    segments = splash.SegmentIds(pad(mask.segments_q, tp), pad(mask.segments_kv, sp))
    pattern = _padded_pattern(mask.pattern, t + tp, s + sp)

    mesh = jax.sharding.get_abstract_mesh()
    batch = BATCH_AXES if not mesh.empty and b % math.prod(mesh.shape[a] for a in BATCH_AXES) == 0 else None
    tensor = 1 if mesh.empty else mesh.shape["tensor"]
    heads = "tensor" if not mesh.empty and h % tensor == 0 and kv % tensor == 0 else None
    local_heads = h // tensor if heads else h
    kernel = _kernel(pattern, local_heads, min(_block(t + tp), _block(s + sp)), interpret)

    def run(q, k, v, segments):  # [b, T, H, D] -> heads-major for the kernel, one example per vmap lane
        heads_major = lambda x: x.transpose(0, 2, 1, 3)
        return heads_major(jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v), segment_ids=segments))

    if not mesh.empty:
        qkv, seg = P(batch, None, heads, None), P(batch, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(qkv, qkv, qkv, splash.SegmentIds(seg, seg)), out_specs=qkv,
                            check_vma=False)
    return run(q, k, v, segments)[:, :t]


def _block(n: int) -> int:
    """The largest of 512, 256, 128 that divides n (a multiple of 128)."""
    return next(size for size in (512, 256, SPLASH_BLOCK) if n % size == 0)


def _padded_pattern(pattern: masks.Mask, t: int, s: int) -> masks.Mask:
    if pattern.shape == (t, s):
        return pattern
    if isinstance(pattern, masks.CausalMask):
        return masks.CausalMask((t, s))
    if isinstance(pattern, masks.FullMask):
        return masks.FullMask((t, s))
    dense = np.ones((t, s), bool)  # padded rows/columns are segment 0: the pattern there never admits a real token
    dense[: pattern.shape[0], : pattern.shape[1]] = pattern[:, :]
    return masks.NumpyMask(dense)


def _kernel(pattern: masks.Mask, heads: int, block: int, interpret: bool):
    """A splash kernel for `heads` query heads sharing `pattern`. Built in each trace: its block-sparsity tables
    become arrays of the program being traced (a kernel kept across traces would leak the first one's tracers)."""
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mha(masks.MultiHeadMask([pattern] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)
