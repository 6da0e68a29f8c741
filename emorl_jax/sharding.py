"""Device mesh, logical axis rules and partition specs for every AudioLM parameter.

Mesh axes are ('data', 'fsdp', 'tensor'). Params carry logical axes (from their path, see `logical_axes`);
`RULES` maps logical axes to mesh axes: FSDP shards `embed`, tensor parallelism shards `heads`, `kv_heads`,
`mlp` and `vocab`. A dimension that a mesh axis does not divide stays replicated. Batches are sharded over
('data', 'fsdp').
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
RULES: Mapping[str, str | None] = {
    "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor",
}

# (module name, leaf) -> logical axes of the unstacked param; stacked layers get a leading None.
_LEAF_AXES: Mapping[tuple[str, str], tuple[str | None, ...]] = {
    ("q_proj", "kernel"): ("embed", "heads"), ("q_proj", "bias"): ("heads",),
    ("k_proj", "kernel"): ("embed", "kv_heads"), ("k_proj", "bias"): ("kv_heads",),
    ("v_proj", "kernel"): ("embed", "kv_heads"), ("v_proj", "bias"): ("kv_heads",),
    ("o_proj", "kernel"): ("heads", "embed"), ("out_proj", "kernel"): ("heads", "embed"),
    ("out_proj", "bias"): (None,),
    ("gate_proj", "kernel"): ("embed", "mlp"), ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
    ("fc1", "kernel"): ("embed", "mlp"), ("fc1", "bias"): ("mlp",), ("fc2", "kernel"): ("mlp", "embed"),
    ("fc2", "bias"): (None,),
    ("embed_tokens", "embedding"): ("vocab", "embed"), ("lm_head", "kernel"): ("embed", "vocab"),
    ("linear", "kernel"): (None, "embed"), ("linear", "bias"): (None,),
    ("conv1", "kernel"): (None, None, "embed"), ("conv2", "kernel"): (None, None, "embed"),
    ("audio_tower", "embed_positions"): (None, "embed"),
}


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one -1 entry takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != 3 or shape.count(-1) > 1:
        raise ValueError(f"mesh shape must be 3 sizes for {MESH_AXES} with at most one -1, got {shape}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, have {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * 3  # GSPMD propagation (pjit style), not sharding-in-types
    return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices, axis_types=auto)


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def logical_axes(path: Sequence[str], ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the param at `path` (e.g. ['language_model', 'layers', 'mlp', 'up_proj', 'kernel'])."""
    names = [n for n in path if n != "value"]
    if names[-1] in ("lora_a", "lora_b"):  # LoRA A [in, r] / B [r, out] follow their kernel's in / out axis
        kernel = _LEAF_AXES.get((names[-2], "kernel"), (None, None))
        axes = (kernel[0], None) if names[-1] == "lora_a" else (None, kernel[1])
    else:
        axes = _LEAF_AXES.get((names[-2], names[-1]), ()) if len(names) >= 2 else ()
    axes = (None,) * (ndim - len(axes)) + tuple(axes)  # leading layer axis, norms, biases: replicated
    if len(axes) != ndim:
        raise ValueError(f"param {'.'.join(names)}: {len(axes)} logical axes for a {ndim}-d array")
    return axes


def partition_spec(path: Sequence[str], shape: Sequence[int], mesh: Mesh) -> P:
    """Mesh axes for a param, replicating any dimension the mesh axis does not divide."""
    spec = []
    for axis, size in zip(logical_axes(path, len(shape)), shape):
        mesh_axis = RULES.get(axis) if axis else None
        spec.append(mesh_axis if mesh_axis and size % mesh.shape[mesh_axis] == 0 else None)
    return P(*spec)


def param_shardings(state, mesh: Mesh):
    """A NamedSharding for every leaf of an nnx.State (or pytree of arrays/ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, partition_spec(_path_names(path), x.shape, mesh)), state)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_model(model, mesh: Mesh):
    """Splits an nnx model and places its params on `mesh`: returns (graphdef, sharded state, shardings)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    shardings = param_shardings(state, mesh)
    return graphdef, jax.device_put(state, shardings), shardings


def jit_forward(graphdef, shardings, mesh: Mesh):
    """`logits = f(state, input_ids, input_features, feature_attention_mask, attention_mask)` under jax.jit with
    NamedShardings: params as `shardings`, every batch input and the logits over ('data', 'fsdp')."""
    from flax import nnx

    def forward(state, input_ids, input_features, feature_attention_mask, attention_mask):
        model = nnx.merge(graphdef, state)
        return model(input_ids, input_features, feature_attention_mask, attention_mask)

    batch = lambda ndim: batch_sharding(mesh, ndim)
    return jax.jit(forward, in_shardings=(shardings, batch(2), batch(3), batch(2), batch(2)),
                   out_shardings=batch(3))
