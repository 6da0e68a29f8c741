"""Optional LoRA adapters on the decoder's attention and MLP projections.

A targeted `Dense` with kernel W [..., in, out] becomes a `LoRADense` that keeps W (and the bias) and adds
`lora_a` [..., in, r] and `lora_b` [..., r, out] (`nnx.LoRAParam`, a subclass of `nnx.Param`; A is sharded like
the kernel's in axis, B like its out axis, r is replicated):
y = x W + b + (alpha / r) · (x A) B. The leading `...` is the layer axis of the stacked decoder, so
`scan_layers` runs adapted layers unchanged. A starts as PEFT's default (kaiming-uniform, a = sqrt(5):
U(-1/sqrt(in), 1/sqrt(in))) and B as zeros, so a fresh adapter leaves every output bit-identical.

Training under LoRA: `graphdef, params, frozen = split_trainable(model, lora=True)` gives the adapters as
`params` and the base weights as `frozen` (the `(state, frozen, micro_batches)` convention of `rl/steps.py`).
The reference policy is the frozen base: its log-probs are the policy's with `zero_lora(params)`, which is
exact because a zero adapter adds exactly 0. `merge_lora` folds the adapters into the kernels (HF export,
sampling without the extra matmuls).

`add_lora` and `merge_lora` return new module trees and leave their input untouched; untouched arrays are
shared with the input (`nnx.clone`), not copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from emorl_jax.errors import ConfigError
from emorl_jax.models.layers import Dense

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS = ATTENTION_TARGETS + MLP_TARGETS


class LoRADense(Dense):
    """A `Dense` plus a low-rank update: x [..., in] -> x W + b + scale · (x A) B [..., out]."""

    def __init__(self, base: Dense, *, rank: int, alpha: float, rngs: nnx.Rngs):
        self.kernel, self.bias, self.dtype = base.kernel, base.bias, base.dtype
        kernel = base.kernel[...]
        *lead, din, dout = kernel.shape
        init_a = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform",
                                                   batch_axis=tuple(range(len(lead))))
        *lead_axes, in_axis, out_axis = base.kernel.get_metadata("out_sharding")
        meta = lambda *axes: dict(eager_sharding=False, out_sharding=(*lead_axes, *axes))
        self.lora_a = nnx.LoRAParam(init_a(rngs.params(), (*lead, din, rank), kernel.dtype), **meta(in_axis, None))
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, dout), kernel.dtype), **meta(None, out_axis))
        self.scale = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.dot(x.astype(self.dtype), self.lora_a[...].astype(self.dtype)) * self.scale
        return super().__call__(x) + jnp.dot(h, self.lora_b[...].astype(self.dtype))

    def merged_kernel(self) -> jax.Array:
        """W + scale · A B [..., in, out], summed in fp32 and cast to the kernel's dtype."""
        f32 = jnp.float32
        delta = jnp.matmul(self.lora_a[...].astype(f32), self.lora_b[...].astype(f32)) * self.scale
        return (self.kernel[...].astype(f32) + delta).astype(self.kernel[...].dtype)


def _decoder_layers(model) -> nnx.Module:
    try:
        return model.language_model.layers
    except AttributeError:
        raise ValueError(f"LoRA: {type(model).__name__} has no `language_model.layers` decoder stack") from None


def _projections(model, cls=Dense) -> list[tuple[nnx.Module, str, Dense]]:
    """(parent module, attribute name, module) for every `cls` directly under a decoder-layer submodule."""
    found = []
    for _, parent in nnx.iter_modules(_decoder_layers(model)):
        for name, child in vars(parent).items():
            if isinstance(child, cls):
                found.append((parent, name, child))
    return found


def add_lora(model, *, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS, rngs: nnx.Rngs):
    """A copy of `model` whose decoder projections named in `targets` carry rank-`rank` adapters, scale alpha/rank.

    Raises ValueError for a non-positive rank, an empty or unknown target, or a model already adapted.
    """
    if rank < 1:
        raise ConfigError(f"lora.rank: rank must be a positive integer, got {rank}")
    targets = tuple(targets)
    if not targets:
        raise ConfigError("lora.targets: targets are empty; name at least one projection, e.g. 'q_proj'")
    if _projections(model, LoRADense):
        raise ValueError("LoRA: the model already has adapters; merge_lora it before adding new ones")
    known = {name for _, name, _ in _projections(model)}
    unknown = sorted(set(targets) - known)
    if unknown:
        raise ConfigError(f"lora.targets: targets {unknown} are not decoder projections; known: {sorted(known)}")
    model = nnx.clone(model)
    for parent, name, dense in _projections(model):
        if name in targets:
            setattr(parent, name, LoRADense(dense, rank=rank, alpha=alpha, rngs=rngs))
    return model


def _abstract_dense(**kw) -> Dense:
    """A Dense built without allocating (abstract params), to be given real ones."""
    return nnx.eval_shape(lambda: Dense(1, 1, axes=(None, None), rngs=nnx.Rngs(0), **kw))


def merge_lora(model):
    """A copy of `model` with every adapter folded into its kernel (W <- W + scale · A B) and no LoRA params left.

    Works on traced params too (e.g. inside jit before sampling).
    """
    model = nnx.clone(model)
    for parent, name, lora in _projections(model, LoRADense):
        kernel = lora.merged_kernel()
        dense = _abstract_dense(use_bias=lora.bias is not None, dtype=lora.dtype, param_dtype=kernel.dtype)
        dense.kernel, dense.bias = lora.kernel.replace(kernel), lora.bias
        setattr(parent, name, dense)
    return model


def split_trainable(model, lora: bool) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable params, frozen rest); `nnx.merge(graphdef, params, frozen)` rebuilds the model.

    lora=True: the LoRA params are trained, everything else is frozen. lora=False: every `nnx.Param` is trained.
    """
    if lora:
        if not _projections(model, LoRADense):
            raise ValueError("split_trainable(lora=True): the model has no LoRA adapters; call add_lora first")
        return nnx.split(model, nnx.LoRAParam, ...)
    return nnx.split(model, nnx.Param, ...)


def zero_lora(params: nnx.State) -> nnx.State:
    """`params` with every LoRA param zeroed (other leaves kept): the frozen base model, i.e. the reference policy."""
    return nnx.map_state(
        lambda _, v: v.replace(jnp.zeros_like(v[...])) if isinstance(v, nnx.LoRAParam) else v, params)


def count_lora_params(model) -> int:
    """Number of scalar LoRA parameters in `model`."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
