"""Jitted training steps: gradient accumulation over micro-batches equals one big batch; sharded = unsharded."""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx

from emorl_jax.config import TINY
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.models.lora import split_trainable
from emorl_jax.rl.steps import (init_train_state, make_grpo_update, make_logps_fn, make_sft_update,
                                split_micro_batches)
from emorl_jax.sharding import make_mesh, param_shardings

G = 2


def _batch(seed=0, prompts=8, n=6):
    rng = np.random.default_rng(seed)
    frames = TINY.audio.num_frames
    n_audio = TINY.audio.num_embeddings
    ids = np.array([[11 + i, *[TINY.audio_token_index] * n_audio, 20 + i] for i in range(prompts)], np.int32)
    batch = {
        "prompt_ids": ids, "prompt_mask": np.ones_like(ids),
        "input_features": rng.normal(size=(prompts, TINY.audio.num_mel_bins, frames)).astype(np.float32),
        "feature_mask": np.ones((prompts, frames), np.int32),
        "completions": rng.integers(10, 500, (prompts * G, n)).astype(np.int32),
        "completion_mask": (np.arange(n)[None] < rng.integers(1, n + 1, (prompts * G, 1))).astype(np.int32),
        "advantages": rng.normal(size=prompts * G).astype(np.float32),
        "weights": (rng.random(prompts * G) > 0.2).astype(np.float32),
    }
    return batch


def _setup():
    model = AudioLM(TINY, rngs=nnx.Rngs(0))
    graphdef, params, frozen = split_trainable(model, lora=False)
    return graphdef, params, frozen


def _grpo_run(micro, mesh=None, normalization="sequence"):
    graphdef, params, frozen = _setup()
    tx = optax.sgd(0.5)
    if mesh is not None:
        params = jax.device_put(params, param_shardings(params, mesh))
    state, state_shardings = init_train_state(tx, params, mesh)
    batch = _batch()
    logps = make_logps_fn(graphdef, group_size=G)
    batch["old_logps"] = logps(params, frozen, batch) - 0.05  # ratios != 1 so clipping matters
    batch["ref_logps"] = batch["old_logps"] + 0.1
    update = make_grpo_update(graphdef, tx, group_size=G, clip_eps=0.2, beta=0.04, normalization=normalization,
                              state_shardings=state_shardings)
    state, metrics = update(state, frozen, split_micro_batches(batch, micro))
    return state, metrics


def _assert_same(a, b, tol):
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol)


def test_grpo_accumulation_over_4_micro_batches_equals_one_batch():
    for normalization in ("sequence", "token"):
        one, m1 = _grpo_run(1, normalization=normalization)
        four, m4 = _grpo_run(4, normalization=normalization)
        np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-5)
        np.testing.assert_allclose(float(m1["tokens"]), float(m4["tokens"]))
        _assert_same(one, four, 1e-6)
        assert float(m1["grad_norm"]) > 0


def test_grpo_update_sharded_equals_single_device():
    single, _ = _grpo_run(2)
    sharded, _ = _grpo_run(2, mesh=make_mesh((2, 2, 2)))
    _assert_same(single, sharded, 1e-5)
    up = sharded.params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"][...]
    assert not up.sharding.is_fully_replicated


def test_sft_accumulation_and_loss_decreases():
    graphdef, params, frozen = _setup()
    b = _batch()
    batch = {k: b[k] for k in ("prompt_ids", "prompt_mask", "input_features", "feature_mask")}
    batch["target_ids"], batch["target_mask"] = b["completions"][::G], b["completion_mask"][::G]
    sgd = optax.sgd(0.5)  # plain SGD: the update is linear in the gradient, so accumulation must match it
    update = make_sft_update(graphdef, sgd)
    s1, m1 = update(init_train_state(sgd, params)[0], frozen, split_micro_batches(batch, 1))
    s4, m4 = update(init_train_state(sgd, _setup()[1])[0], frozen, split_micro_batches(batch, 4))
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-5)
    _assert_same(s1, s4, 1e-6)
    adam = optax.adam(1e-2)
    update = make_sft_update(graphdef, adam)
    state, first = update(init_train_state(adam, _setup()[1])[0], frozen, split_micro_batches(batch, 1))
    for _ in range(5):
        state, m = update(state, frozen, split_micro_batches(batch, 2))
    assert float(m["loss"]) < float(first["loss"]) and int(state.step) == 6
