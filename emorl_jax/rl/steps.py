"""Jitted training steps: the optimizer, the train state placed on the mesh, the SFT and GRPO updates and the
log-prob pass (micro-batches accumulated inside one jit, NamedShardings on the params and optimizer state,
donated state).

A batch is a dict of global arrays (`distributed.global_batch`: rows over ('data', 'fsdp')). Prompt arrays have
B rows (`prompt_ids`, `prompt_mask` [B, T], `input_features` [B, mel, frames], `feature_mask` [B, frames]);
completion arrays have B*G rows (`completions`, `completion_mask` [B*G, N], `old_logps`, `ref_logps` [B*G, N],
`advantages`, `weights` [B*G]). Micro-batches split along prompts, each keeping all G completions of its
prompts; micro-batch m holds prompts m, m+M, m+2M, ... so that every micro-batch stays spread over the devices
that hold the batch (no resharding inside the jit).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from emorl_jax.rl.grpo import grpo_loss
from emorl_jax.rl.policy import completion_logps, sft_loss
from emorl_jax.sharding import _path_names, param_shardings

PROMPT_KEYS = ("prompt_ids", "prompt_mask", "input_features", "feature_mask")


class TrainState(NamedTuple):
    params: Any  # nnx.State of the trainable params (all Params, or only the LoRA params)
    opt_state: Any
    step: jax.Array


def train_state_shardings(tx, params, mesh: jax.sharding.Mesh, *, offload: bool = False) -> TrainState:
    """Shardings of the TrainState of `params` (arrays or ShapeDtypeStructs): every optimizer leaf that mirrors a
    param (Adam's mu and nu) is sharded exactly like that param; counts and the step are replicated.

    offload: optimizer state in host memory (`pinned_host`); the update brings it to the devices and back.
    """
    shardings = param_shardings(params, mesh)
    opt_shapes = jax.eval_shape(tx.init, params)
    kind = "pinned_host" if offload else None
    mirror = lambda _, s: s.with_memory_kind(kind) if kind else s
    replicated = NamedSharding(mesh, P(), memory_kind=kind) if kind else NamedSharding(mesh, P())
    opt = optax.tree_map_params(tx, mirror, opt_shapes, shardings, transform_non_params=lambda _: replicated)
    return TrainState(shardings, opt, NamedSharding(mesh, P()))


def abstract_train_state(tx, params, mesh: jax.sharding.Mesh, *, offload: bool = False) -> TrainState:
    """The TrainState of `params` as ShapeDtypeStructs with their shardings: a restore target, or AOT input."""
    shapes = jax.eval_shape(lambda p: TrainState(p, tx.init(p), jnp.zeros((), jnp.int32)), params)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        train_state_shardings(tx, params, mesh, offload=offload))


def init_train_state(tx, params, mesh: jax.sharding.Mesh | None = None, *,
                     offload: bool = False) -> tuple[TrainState, TrainState]:
    """A fresh TrainState (step 0) and its tree of shardings. On a mesh the optimizer state is created directly
    in its final sharding (`train_state_shardings`), never replicated. `params` is donated on a mesh: use the
    returned state's params from here on."""
    def fresh_train_state(p):
        return TrainState(p, tx.init(p), jnp.zeros((), jnp.int32))

    init = fresh_train_state
    if mesh is None:
        state = jax.jit(init)(params)
        return state, jax.tree.map(lambda x: x.sharding, state)
    shardings = train_state_shardings(tx, params, mesh, offload=offload)
    return jax.jit(init, out_shardings=shardings, donate_argnums=0)(params), shardings


def make_optimizer(*, learning_rate: float, total_steps: int, warmup_fraction: float = 0.03,
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, grad_clip: float = 1.0,
                   mu_dtype: str | None = None):
    """AdamW with linear warm-up then cosine decay to 0, after global-norm clipping. `mu_dtype` ("bfloat16")
    stores the first moment in that dtype (None: the param dtype)."""
    warmup = max(1, int(round(warmup_fraction * total_steps)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(total_steps, warmup + 1))
    return optax.chain(optax.clip_by_global_norm(grad_clip),
                       optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mu_dtype=mu_dtype or None))


def cast_to_compute_dtype(graphdef, params, *others):
    """`params` with every leaf that the model casts to its compute dtype anyway stored cast, so the model's outputs
    are identical; LayerNorm params, which the model reads in fp32, keep their dtype. `others` (e.g. the frozen
    params) complete the model (`nnx.merge(graphdef, params, *others)`). Traceable: elementwise, so the copy is
    sharded like `params`."""
    from emorl_jax.models.layers import LayerNorm

    model = nnx.merge(graphdef, params, *others)
    dtype = model.cfg.compute_dtype
    keep = [tuple(map(str, path)) for path, m in nnx.iter_graph(model) if isinstance(m, LayerNorm)]
    keep_leaf = lambda names: any(names[:len(k)] == k for k in keep)
    cast = lambda path, x: (x if keep_leaf(tuple(_path_names(path))) or not jnp.issubdtype(x.dtype, jnp.floating)
                            else x.astype(dtype))
    return jax.tree_util.tree_map_with_path(cast, params)


def compute_dtype_copy(graphdef, params, frozen):
    """The frozen reference policy: `cast_to_compute_dtype` once, jitted."""

    def cast_to_compute_dtype_copy(params, frozen):
        return cast_to_compute_dtype(graphdef, params, frozen)

    return jax.jit(cast_to_compute_dtype_copy)(params, frozen)


def split_micro_batches(batch: dict, num_micro: int) -> dict:
    """Reshapes every array to [num_micro, rows / num_micro, ...]: micro-batch m holds prompts m, m+M, ... and
    exactly their G completions each (completion rows b*G .. b*G+G-1 follow prompt b)."""
    prompts = batch["prompt_ids"].shape[0]
    if prompts % num_micro:
        raise ValueError(f"{prompts} prompts do not split into {num_micro} micro-batches")

    def split(x):
        group = x.shape[0] // prompts
        x = x.reshape(prompts // num_micro, num_micro, group, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape(num_micro, prompts // num_micro * group, *x.shape[3:])
    return {k: split(v) for k, v in batch.items()}


def _accumulate(loss_fn, params, micro_batches):
    """Sums loss numerators, denominators, metric sums and gradients over the leading micro-batch axis.

    One micro-batch skips the scan: on XLA:CPU a one-step scan made the tiny SFT update 1.6x slower (886 vs
    540 ms)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if jax.tree.leaves(micro_batches)[0].shape[0] == 1:
        (total, (count, metrics)), grads = grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches))
        return grads, total, count, metrics

    def body(carry, mb):
        grads, total, count, metrics = carry
        (loss_sum, (denom, m)), g = grad_fn(params, mb)
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        return (add(grads, g), total + loss_sum, count + denom, add(metrics, m)), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    metric_shapes = jax.eval_shape(lambda: loss_fn(params, first)[1][1])
    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes))
    (grads, total, count, metrics), _ = jax.lax.scan(body, init, micro_batches)
    return grads, total, count, metrics


def _apply(tx, state: TrainState, grads, total, count, metrics):
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    out = {"loss": total / count, "grad_norm": optax.tree.norm(grads), **metrics}
    return TrainState(params, opt_state, state.step + 1), out


def _to_memory(tree, shardings, kind: str):
    """Moves leaves whose sharding lives in host memory to `kind` ("device" or "pinned_host")."""
    def move(x, s):
        if s.memory_kind != "pinned_host":
            return x
        return jax.device_put(x, s.with_memory_kind(kind))
    return jax.tree.map(move, tree, shardings)


def _jit_update(name: str, loss_fn, tx, state_shardings, micro_batches: int):
    """jit(update(state, frozen, batch)) with the train state sharded and donated; the batch is split into
    `micro_batches` inside the jit. Host-offloaded optimizer state comes to the devices for the update only."""

    def update(state, frozen, batch):
        loss = lambda params, mb: loss_fn(params, frozen, mb)
        if state_shardings is not None:
            state = state._replace(opt_state=_to_memory(state.opt_state, state_shardings.opt_state, "device"))
        state, metrics = _apply(tx, state, *_accumulate(loss, state.params, split_micro_batches(batch, micro_batches)))
        if state_shardings is not None:
            state = state._replace(opt_state=_to_memory(state.opt_state, state_shardings.opt_state, "pinned_host"))
        return state, metrics

    update.__name__ = update.__qualname__ = name  # compile logs and profiles name it
    return jax.jit(update, in_shardings=(state_shardings, None, None), out_shardings=(state_shardings, None),
                   donate_argnums=0)


def make_sft_update(graphdef, tx, state_shardings=None, *, micro_batches: int = 1):
    """`state, metrics = update(state, frozen, batch)`: teacher-forced NLL of `target_ids`/`target_mask`.

    `frozen` is the non-trained part of the model state (the base weights under LoRA; empty otherwise).
    """

    def loss_fn(params, frozen, mb):
        model = nnx.merge(graphdef, params, frozen)
        total, count = sft_loss(model, *(mb[k] for k in PROMPT_KEYS), mb["target_ids"], mb["target_mask"])
        return total, (count, {"tokens": count})

    return _jit_update("sft_update", loss_fn, tx, state_shardings, micro_batches)


def make_grpo_update(graphdef, tx, *, group_size: int, clip_eps: float, beta: float, normalization: str,
                     temperature: float = 1.0, vocab_chunk: int = 0, state_shardings=None, micro_batches: int = 1):
    """`state, metrics = update(state, frozen, batch)`: one optax step on the exact global GRPO loss.

    The policy's log-probs are taken at the rollout `temperature` (see `completion_logps`); `ref_logps` in the
    batch must be too (`make_logps_fn` with the same temperature). Without `old_logps` in the batch (mu = 1: the
    policy that sampled is the one being updated) the ratio is exp(logp - stop_gradient(logp)): value 1, the
    policy's own gradient, and no old-policy pass. `vocab_chunk`: see `policy.head_logps`.
    """

    def loss_fn(params, frozen, mb):
        model = nnx.merge(graphdef, params, frozen)
        logps = completion_logps(model, *(mb[k] for k in PROMPT_KEYS), mb["completions"], mb["completion_mask"],
                                 group_size=group_size, temperature=temperature, vocab_chunk=vocab_chunk)
        old = mb["old_logps"] if "old_logps" in mb else jax.lax.stop_gradient(logps)
        loss_sum, denom, metrics = grpo_loss(logps, old, mb["ref_logps"], mb["advantages"],
                                             mb["completion_mask"], clip_eps=clip_eps, beta=beta,
                                             normalization=normalization, sequence_weights=mb["weights"])
        return loss_sum, (denom, metrics)

    return _jit_update("grpo_update", loss_fn, tx, state_shardings, micro_batches)


def make_logps_fn(graphdef, *, group_size: int, temperature: float = 1.0, vocab_chunk: int = 0,
                  micro_batches: int = 1):
    """Jitted `logps = f(params, frozen, batch)` [B*G, N] without gradients (old-policy and reference), at the
    rollout `temperature`, one micro-batch of prompts at a time (`lax.map`), as the update runs them.
    `vocab_chunk`: see `policy.head_logps`."""

    def one(params, frozen, mb):
        model = nnx.merge(graphdef, params, frozen)
        return completion_logps(model, *(mb[k] for k in PROMPT_KEYS), mb["completions"], mb["completion_mask"],
                                group_size=group_size, temperature=temperature, vocab_chunk=vocab_chunk)

    def logps(params, frozen, batch):
        batch = {k: batch[k] for k in (*PROMPT_KEYS, "completions", "completion_mask")}
        if micro_batches == 1:
            return one(params, frozen, batch)
        out = jax.lax.map(lambda mb: one(params, frozen, mb), split_micro_batches(batch, micro_batches))
        m, rows, n = out.shape  # [M, B/M*G, N], micro-batch m = prompts m, m+M, ... -> [B*G, N] in row order
        out = out.reshape(m, rows // group_size, group_size, n)
        return jnp.swapaxes(out, 0, 1).reshape(m * rows, n)

    return jax.jit(logps)
