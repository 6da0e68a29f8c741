"""Building blocks shared by the encoder and the decoder, and the scanned layer stack.

Parameter names follow the HF checkpoint (`q_proj`, `fc1`, ...), with JAX leaf names: `kernel` [in, out] for
linear layers, `embedding` [vocab, d] for embeddings, `scale`/`bias` for norms.

Every param carries its logical axes (`param`; `emorl_jax.sharding.RULES` maps them to mesh axes): `embed` (the
model width), `heads`, `kv_heads`, `mlp`, `vocab`, `layers` (the stacked layer axis) or None. Vectors along the
model width (norm scales, biases of layers that output `embed`) are replicated: their axis is None.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    """An nnx.Param carrying its logical axes as `out_sharding` metadata, not placed eagerly on any mesh."""
    if len(axes) != value.ndim:
        raise ValueError(f"{len(axes)} logical axes {axes} for a {value.ndim}-d param")
    return nnx.Param(value, eager_sharding=False, out_sharding=tuple(axes))


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); x [..., in] -> [..., out] in the compute dtype. Kernel init N(0, init_std).

    `axes` are the kernel's logical axes (in, out); the bias follows the out axis (None when it is `embed`).
    """

    def __init__(self, din: int, dout: int, *, axes: Axes, use_bias: bool, dtype, param_dtype, rngs: nnx.Rngs,
                 init_std: float = 0.02):
        self.kernel = param(nnx.initializers.normal(init_std)(rngs.params(), (din, dout), param_dtype), axes)
        bias_axes = (None if axes[1] == "embed" else axes[1],)
        self.bias = param(jnp.zeros((dout,), param_dtype), bias_axes) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array, out_dtype=None) -> jax.Array:
        """Operands in the compute dtype; the result in `out_dtype` (e.g. fp32 logits from a bf16 model,
        accumulated and returned without rounding), default the compute dtype."""
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype), preferred_element_type=out_dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table [vocab, d], init N(0, init_std); `attend` gives tied-head logits."""

    def __init__(self, num: int, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs, init_std: float = 0.02):
        self.embedding = param(nnx.initializers.normal(init_std)(rngs.params(), (num, dim), param_dtype),
                               ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array, out_dtype=None) -> jax.Array:
        """x [..., d] -> x @ embedding.T [..., vocab]: operands in the compute dtype, the result in `out_dtype`
        (default the compute dtype)."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T, preferred_element_type=out_dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm, computed in fp32 and cast back to the compute dtype."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.scale = param(jnp.ones((dim,), param_dtype), (None,))
        self.bias = param(jnp.zeros((dim,), param_dtype), (None,))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class RMSNorm(nnx.Module):
    """Qwen2RMSNorm: normalise in fp32, cast to the compute dtype, then scale."""

    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.scale = param(jnp.ones((dim,), param_dtype), (None,))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def stack_layers(make: Callable[[], nnx.Module], n: int) -> nnx.Module:
    """Builds `n` layers and stacks their params on a new leading axis (logical axis `layers`), for `scan_layers`."""
    layers = [make() for _ in range(n)]
    graphdef, _ = nnx.split(layers[0])
    stack = lambda *vs: vs[0].replace(jnp.stack([v.get_value() for v in vs]),
                                      out_sharding=("layers", *vs[0].get_metadata("out_sharding")))
    is_param = lambda x: isinstance(x, nnx.Variable)
    stacked = jax.tree.map(stack, *[nnx.state(layer) for layer in layers], is_leaf=is_param)
    return nnx.merge(graphdef, stacked)


def scan_layers(stacked: nnx.Module, step: Callable[[nnx.Module, Any, Any], tuple[Any, Any]], carry, xs=None, *,
                remat: bool = False):
    """Runs `carry, y = step(layer, carry, x)` over the stacked layers with `jax.lax.scan`.

    Compile time does not grow with depth. `xs`/the returned ys have the layer axis first.
    """
    graphdef, params = nnx.split(stacked)

    def body(carry, inputs):
        layer_params, x = inputs
        return step(nnx.merge(graphdef, layer_params), carry, x)

    if remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    return jax.lax.scan(body, carry, (params, xs))
