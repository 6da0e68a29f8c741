"""Jitted training steps: gradient accumulation over micro-batches equals one big batch; sharded = unsharded."""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx

from emorl_jax.config import TINY
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.models.lora import split_trainable
from emorl_jax.rl.steps import init_train_state, make_grpo_update, make_logps_fn, make_sft_update
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
    batch["old_logps"] = logps(state.params, frozen, batch) - 0.05  # ratios != 1 so clipping matters
    batch["ref_logps"] = batch["old_logps"] + 0.1
    update = make_grpo_update(graphdef, tx, group_size=G, clip_eps=0.2, beta=0.04, normalization=normalization,
                              state_shardings=state_shardings, micro_batches=micro)
    state, metrics = update(state, frozen, batch)
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
    s1, m1 = make_sft_update(graphdef, sgd)(init_train_state(sgd, params)[0], frozen, batch)
    s4, m4 = make_sft_update(graphdef, sgd, micro_batches=4)(init_train_state(sgd, _setup()[1])[0], frozen, batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-5)
    _assert_same(s1, s4, 1e-6)
    adam = optax.adam(1e-2)
    state, first = make_sft_update(graphdef, adam)(init_train_state(adam, _setup()[1])[0], frozen, batch)
    update = make_sft_update(graphdef, adam, micro_batches=2)
    for _ in range(5):
        state, m = update(state, frozen, batch)
    assert float(m["loss"]) < float(first["loss"]) and int(state.step) == 6


# ---------------------------------------------------------------------------------------------- the 7B program
def _wide_setup(dtype="float32"):
    """A 128-wide model whose big leaves all divide 8 devices."""
    import dataclasses

    cfg = TINY.replace(text=dataclasses.replace(TINY.text, hidden_size=128, intermediate_size=256),
                       audio=dataclasses.replace(TINY.audio, d_model=128, encoder_ffn_dim=256), dtype=dtype)
    return split_trainable(AudioLM(cfg, rngs=nnx.Rngs(0)), lora=False)


def test_optimizer_state_is_sharded_like_the_params():
    from emorl_jax.rl.steps import make_optimizer
    from emorl_jax.sharding import per_device_bytes, replicated_leaves

    mesh = make_mesh((1, 8, 1))
    _, params, _ = _wide_setup()
    params = jax.device_put(params, param_shardings(params, mesh))
    tx = make_optimizer(learning_rate=1e-3, total_steps=10, mu_dtype="bfloat16")
    state, shardings = init_train_state(tx, params, mesh)
    adam = state.opt_state[1][0]
    mu, nu = jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)
    for p, m, v in zip(jax.tree.leaves(state.params), mu, nu, strict=True):
        assert m.sharding == p.sharding and v.sharding == p.sharding
        assert m.dtype == np.dtype("bfloat16") and v.dtype == p.dtype
    # Replicated: only what the rules replicate in the params themselves (biases and norms along axes that map to
    # the size-1 'tensor' axis) and their moments, a few KiB each; today's trainer replicated all of mu and nu.
    replicated = replicated_leaves(state, min_bytes=1024)
    assert replicated and all(path.split(".")[-1] in ("bias", "scale") and size <= 4096 for path, size in replicated)
    replicated_bytes = sum(size for _, size in replicated_leaves(state, min_bytes=0))
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    assert replicated_bytes < 0.03 * total
    assert per_device_bytes(state) < total / 7  # ~1/8 of everything on each device
    assert jax.tree.leaves(shardings.opt_state[1][0].nu) == jax.tree.leaves(shardings.params)


def test_mu_1_skips_the_old_policy_pass_with_identical_loss_and_gradient():
    graphdef, params, frozen = _setup()
    batch = _batch()
    logps = make_logps_fn(graphdef, group_size=G)(params, frozen, batch)
    batch["ref_logps"] = logps + 0.1
    sgd = optax.sgd(0.5)
    kw = dict(group_size=G, clip_eps=0.2, beta=0.04, normalization="sequence")
    with_old, m_old = make_grpo_update(graphdef, sgd, **kw)(init_train_state(sgd, params)[0], frozen,
                                                             {**batch, "old_logps": logps})
    without, m_new = make_grpo_update(graphdef, sgd, **kw)(init_train_state(sgd, _setup()[1])[0], frozen, batch)
    np.testing.assert_allclose(float(m_new["loss"]), float(m_old["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_new["grad_norm"]), float(m_old["grad_norm"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_new["ratio_sum"]), float(m_old["ratio_sum"]), rtol=1e-6)
    _assert_same(with_old, without, 1e-7)


def test_reference_in_the_compute_dtype_gives_identical_logps():
    from emorl_jax.rl.steps import compute_dtype_copy

    graphdef, params, frozen = _wide_setup(dtype="bfloat16")
    reference = compute_dtype_copy(graphdef, params, frozen)
    dtypes = {str(x.dtype) for x in jax.tree.leaves(reference)}
    assert dtypes == {"bfloat16", "float32"}  # only the audio LayerNorms stay fp32
    big = [x for x in jax.tree.leaves(reference) if x.size >= 128 * 128]
    assert big and all(x.dtype == np.dtype("bfloat16") for x in big)
    fn = make_logps_fn(graphdef, group_size=G)
    batch = _batch()
    np.testing.assert_array_equal(np.asarray(fn(reference, frozen, batch)), np.asarray(fn(params, frozen, batch)))


def test_micro_batched_logps_equal_one_pass():
    """The log-probs of the rollout batch shape (one pass over B prompts) equal the micro-batched training pass's
    (B/4 prompts at a time): within 1e-6 in fp32. Under bf16 compute the lm_head output and the log-softmax stay
    in fp32, so the same hidden states give bit-identical log-probs in any batch shape; the bf16 decoder itself
    is not shape-invariant on XLA:CPU (fusion choices round intermediates differently: up to 2.6e-3 nats)."""
    from emorl_jax.rl.policy import token_logps

    graphdef, params, frozen = _wide_setup(dtype="float32")
    batch = _batch()
    one = make_logps_fn(graphdef, group_size=G)(params, frozen, batch)
    four = make_logps_fn(graphdef, group_size=G, micro_batches=4)(params, frozen, batch)
    assert np.abs(np.asarray(one)).max() > 0
    np.testing.assert_allclose(np.asarray(four), np.asarray(one), atol=1e-6, rtol=0)

    graphdef, params, frozen = _wide_setup(dtype="bfloat16")
    model = nnx.merge(graphdef, params, frozen)
    rng = np.random.default_rng(0)
    hidden = jax.numpy.asarray(rng.normal(size=(16, 6, 128)), "bfloat16")
    tokens = rng.integers(0, TINY.text.vocab_size, (16, 6)).astype(np.int32)
    logps = jax.jit(lambda h, t: token_logps(model.logits(h), t))
    logits = jax.jit(model.logits)(hidden)
    assert logits.dtype == np.float32
    assert np.any(np.asarray(logits) != np.asarray(logits.astype("bfloat16").astype(np.float32)))  # not rounded
    np.testing.assert_array_equal(np.asarray(logps(hidden, tokens))[:4], np.asarray(logps(hidden[:4], tokens[:4])))


def test_compiled_steps_take_batches_sharded_over_data_and_fsdp():
    from emorl_jax import distributed

    mesh = make_mesh((2, 4, 1))
    graphdef, params, frozen = _setup()
    params = jax.device_put(params, param_shardings(params, mesh))
    frozen = jax.device_put(frozen, param_shardings(frozen, mesh))
    batch = _batch()
    batch["ref_logps"] = np.zeros_like(batch["completions"], np.float32)
    tx = optax.adam(1e-3)
    state, shardings = init_train_state(tx, params, mesh)
    update = make_grpo_update(graphdef, tx, group_size=G, clip_eps=0.2, beta=0.04, normalization="sequence",
                              state_shardings=shardings, micro_batches=2)
    with jax.set_mesh(mesh):
        compiled = update.lower(state, frozen, distributed.global_batch(batch, mesh)).compile()
    _, _, batch_shardings = compiled.input_shardings[0]
    for name, s in batch_shardings.items():
        assert s.spec[0] == ("data", "fsdp"), (name, s)
    state_in = jax.tree.leaves(compiled.input_shardings[0][0])
    assert any(not s.is_fully_replicated for s in state_in)


def test_optimizer_state_offloaded_to_host_memory_updates_like_device_memory():
    mesh = make_mesh((1, 8, 1))
    results = []
    for offload in (False, True):
        graphdef, params, frozen = _setup()
        params = jax.device_put(params, param_shardings(params, mesh))
        tx = optax.adam(1e-2)
        state, shardings = init_train_state(tx, params, mesh, offload=offload)
        kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)}
        assert kinds == ({"pinned_host"} if offload else {"device"})
        batch = _batch()
        batch["ref_logps"] = np.zeros_like(batch["completions"], np.float32)
        update = make_grpo_update(graphdef, tx, group_size=G, clip_eps=0.2, beta=0.04, normalization="sequence",
                                  state_shardings=shardings)
        for _ in range(2):
            state, _ = update(state, frozen, batch)
        assert {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)} == kinds
        results.append(state)
    _assert_same(results[0], results[1], 1e-6)


def test_logps_over_vocab_sharded_logits_never_gather_the_vocabulary():
    """With the vocabulary over 'tensor' (4 devices), the log-prob pass reduces each device's slice of the logits:
    no collective in the compiled program carries a vocab-sized dimension."""
    import re

    from emorl_jax import distributed

    mesh = make_mesh((1, 2, 4))
    graphdef, params, frozen = _setup()
    params = jax.device_put(params, param_shardings(params, mesh))
    frozen = jax.device_put(frozen, param_shardings(frozen, mesh))
    batch = distributed.global_batch({k: v for k, v in _batch().items() if k not in ("advantages", "weights")}, mesh)
    with jax.set_mesh(mesh):
        hlo = make_logps_fn(graphdef, group_size=G).lower(params, frozen, batch).compile().as_text()
    vocab = TINY.text.vocab_size
    collectives = [line for line in hlo.splitlines()
                   if re.search(r"= \S+ (all-gather|all-to-all|all-reduce|collective-permute)\(", line)]
    assert collectives  # FSDP weight gathers at least
    shapes = [re.search(r"= (\S+) ", line).group(1) for line in collectives]
    assert not [s for s in shapes if re.search(rf"[\[,]{vocab}[\],]", s)], shapes
