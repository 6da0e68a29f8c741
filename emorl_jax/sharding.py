"""Device mesh, logical axis rules, partition specs, activation sharding constraints and sharding reports.

Mesh axes are ('data', 'fsdp', 'tensor'). Every param carries its logical axes from creation, as the
`out_sharding` metadata of its `nnx.Param` (e.g. a stacked q_proj kernel [layers, d, heads*head_dim] has
('layers', 'embed', 'heads')). `RULES` maps logical axes to mesh axes: FSDP shards `embed`, tensor parallelism
shards `heads`, `kv_heads`, `mlp` and `vocab`; `layers` is never sharded. A dimension that its mesh axis does not
divide stays replicated. Batches are sharded over ('data', 'fsdp').

Activations carry logical axes too (`constrain`, mapped by `ACTIVATION_RULES`). Constraints apply to functions
traced inside `jax.set_mesh(mesh)` (`mesh_context(mesh)`); with no mesh in context `constrain` is a no-op, so a
single-device program is unchanged bit for bit.

`replicated_leaves`, `per_device_bytes` and `check_sharding` report placements: nothing large should end up
replicated on a multi-device mesh by accident.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from emorl_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LogicalAxes = tuple[str | None, ...]
RULES: Mapping[str, str | None] = {
    "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor", "layers": None,
}
ACTIVATION_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES, "length": None, "embed": None,
    "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor",
}


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one -1 entry takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != 3 or shape.count(-1) > 1:
        raise ConfigError(f"mesh shape must be 3 sizes for {MESH_AXES} with at most one -1, got {shape}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ConfigError(f"mesh shape {shape} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ConfigError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, have {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * 3  # GSPMD propagation (pjit style), not sharding-in-types
    return jax.make_mesh(tuple(shape), MESH_AXES, devices=devices, axis_types=auto)


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes(param: nnx.Variable) -> LogicalAxes:
    """The logical axes of a param (its `out_sharding` metadata); all None (replicated) when it has none.

    Works for a param holding an array, a `jax.ShapeDtypeStruct` (`nnx.eval_shape`) or a tracer.
    """
    ndim = len(param.get_value().shape)
    axes = tuple(param.get_metadata("out_sharding", None) or (None,) * ndim)
    if len(axes) != ndim:
        raise ValueError(f"param with logical axes {axes} holds a {ndim}-d array")
    return axes


def _mesh_spec(axes: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
               rules: Mapping[str, str | tuple[str, ...] | None], undivided) -> P:
    """Maps logical axes to mesh axes by `rules`; a dimension its mesh axes do not divide gets `undivided`."""
    spec = []
    for axis, size in zip(axes, shape, strict=True):
        if axis is not None and axis not in rules:
            raise ValueError(f"unknown logical axis {axis!r}; known: {sorted(rules)}")
        mesh_axes = rules[axis] if axis is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        n = math.prod(mesh_shape[a] for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes))
        spec.append(mesh_axes if size % n == 0 else undivided)
    return P(*spec)


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """Mesh axes for a param with logical `axes` and `shape` (`RULES`), replicating any dimension the mesh axis
    does not divide."""
    return _mesh_spec(axes, shape, mesh.shape, RULES, None)


def param_shardings(state, mesh: Mesh):
    """A NamedSharding for every leaf of `state`, in the same tree structure.

    `state` is an `nnx.State` of params (or any pytree holding `nnx.Variable`s: an optimizer state built by
    `tree_map` over params keeps them) whose values are arrays, `jax.ShapeDtypeStruct`s or anything with a
    `.shape`; each Variable's `out_sharding` metadata (`logical_axes`) gives its sharding. Leaves outside any
    Variable (optimizer counts, a plain dict of arrays) have no logical axes and are replicated.
    """
    def one(x):
        if not _is_variable(x):
            return NamedSharding(mesh, P())
        sharding = NamedSharding(mesh, partition_spec(logical_axes(x), x.get_value().shape, mesh))
        return jax.tree.map(lambda _: sharding, x)

    return jax.tree.map(one, state, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_model(model, mesh: Mesh):
    """Splits an nnx model and places its params on `mesh`: returns (graphdef, sharded state, shardings)."""
    graphdef, state = nnx.split(model)
    shardings = param_shardings(state, mesh)
    return graphdef, jax.device_put(state, shardings), shardings


def jit_forward(graphdef, shardings, mesh: Mesh):
    """`logits = f(state, input_ids, input_features, feature_attention_mask, attention_mask)` under jax.jit with
    NamedShardings: params as `shardings`, every batch input and the logits over ('data', 'fsdp'); the
    activation constraints apply (the model is traced under `mesh`)."""

    def forward(state, input_ids, input_features, feature_attention_mask, attention_mask):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            model = nnx.merge(graphdef, state)
            return model(input_ids, input_features, feature_attention_mask, attention_mask)

    batch = lambda ndim: batch_sharding(mesh, ndim)
    return jax.jit(forward, in_shardings=(shardings, batch(2), batch(3), batch(2), batch(2)),
                   out_shardings=batch(3))


def mesh_context(mesh: Mesh):
    """`jax.set_mesh(mesh)`: functions traced (jitted) inside it get the activation constraints of `constrain`."""
    return jax.set_mesh(mesh)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`x` with a sharding constraint from its logical activation `axes` (one per dimension, `ACTIVATION_RULES`).

    Applies only when a mesh is in context (`jax.set_mesh`); a no-op otherwise. A dimension its mesh axes do not
    divide is left unconstrained (XLA propagates a sharding); one mapped to None is replicated.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(axes) != x.ndim:
        raise ValueError(f"constrain: {len(axes)} logical axes {tuple(axes)} for a {x.ndim}-d array")
    return jax.lax.with_sharding_constraint(x, _mesh_spec(axes, x.shape, mesh.shape, ACTIVATION_RULES,
                                                          P.UNCONSTRAINED))


def _sharded_leaves(tree):
    """(dotted path, leaf, sharding) of every jax.Array, or ShapeDtypeStruct with a sharding, in `tree`."""
    found = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sharding = getattr(x, "sharding", None) if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) else None
        if sharding is not None:
            found.append((".".join(n for n in _path_names(path) if n != "value"), x, sharding))
    return found


def _shard_bytes(x, sharding) -> int:
    return math.prod(sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize


def per_device_bytes(tree) -> int:
    """The most bytes any one device holds of `tree`'s arrays (addressable shards only), counting jax.Arrays and
    ShapeDtypeStructs that carry a sharding (e.g. an AOT memory plan); other leaves are not on a device."""
    per_device: dict = {}
    for _, x, sharding in _sharded_leaves(tree):
        nbytes = _shard_bytes(x, sharding)
        for device in sharding.addressable_devices:
            per_device[device] = per_device.get(device, 0) + nbytes
    return max(per_device.values(), default=0)


def replicated_leaves(tree, min_bytes: int = 2**20) -> list[tuple[str, int]]:
    """(dotted path, bytes per device) of every leaf of `tree` larger than `min_bytes` that is fully replicated
    over a mesh of more than one device."""
    return [(path, _shard_bytes(x, s)) for path, x, s in _sharded_leaves(tree)
            if len(s.device_set) > 1 and s.is_fully_replicated and _shard_bytes(x, s) > min_bytes]


def check_sharding(trees: Mapping[str, object], *, strict: bool, min_bytes: int = 2**20) -> list[str]:
    """Warns (one line each) about every leaf over `min_bytes` (1 MiB) that is replicated on a multi-device mesh,
    for each named tree (e.g. {'params': ..., 'opt_state': ...}); returns the lines. strict: then raises a
    ValueError naming them."""
    problems = [f"{name}.{path}: {nbytes} bytes replicated on every device"
                for name, tree in trees.items() for path, nbytes in replicated_leaves(tree, min_bytes)]
    for line in problems:
        logging.warning("sharding: %s", line)
    if problems and strict:
        raise ValueError(f"{len(problems)} large leaves are replicated: " + "; ".join(problems))
    return problems
