"""The GRPO stages driven one at a time on a (2, 2, 2) mesh of 8 CPU devices, with the trainer's own programs
(`build_grpo_programs`): rollout (micro-batched, keys independent of the split), score, advantages, logprobs
(no old-policy pass at mu = 1) and update."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from emorl_jax.config import TINY, base_run_config
from emorl_jax.data import emotions
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.models.lora import split_trainable
from emorl_jax.rl.grpo import group_advantages
from emorl_jax.rl.sampler import Rollouts, SamplingParams, make_sampler, rollout_keys
from emorl_jax.rl.stages import GRPOStages, build_grpo_programs
from emorl_jax.rl.steps import init_train_state
from emorl_jax.sharding import make_mesh, param_shardings
from emorl_jax.text.prompts import build_prompt, encode_prompt, format_target, instruction
from emorl_jax.text.tokenizer import train_sentencepiece

B, G, SEED = 8, 2, 3
LABELS = emotions.label_set("meld")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    texts = [build_prompt(instruction("esr", LABELS), num_audio_tokens=[1])] + [
        format_target(label, "esr", content="words", acoustics="pitch high", summary=f"sounds {label}")
        for label in LABELS]
    tokenizer = train_sentencepiece(texts * 4, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=400)
    cfg = TINY.replace(text=dataclasses.replace(TINY.text, vocab_size=tokenizer.vocab_size, initializer_range=0.1),
                       audio_token_index=tokenizer.audio_token_id)
    mesh = make_mesh((2, 2, 2))
    graphdef, params, frozen = split_trainable(AudioLM(cfg, rngs=nnx.Rngs(0)), lora=False)
    params = jax.device_put(params, param_shardings(params, mesh))
    frozen = jax.device_put(frozen, param_shardings(frozen, mesh))
    rng = np.random.default_rng(0)
    frames, n_audio = cfg.audio.num_frames, cfg.audio.num_embeddings
    ids = np.asarray([encode_prompt(tokenizer, "esr", LABELS, [n_audio])] * B, np.int32)
    batch = {"prompt_ids": ids, "prompt_mask": np.ones_like(ids),
             "input_features": rng.normal(size=(B, cfg.audio.num_mel_bins, frames)).astype(np.float32),
             "feature_mask": np.ones((B, frames), np.int32), "label": np.arange(B, dtype=np.int32) % len(LABELS)}
    return tokenizer, mesh, graphdef, params, frozen, batch


def _stages(setup, **rl):
    tokenizer, mesh, graphdef, params, frozen, _ = setup
    config = base_run_config()
    config.rl.update(dict(batch_size=B, group_size=G, max_new_tokens=6, temperature=1.0, steps=10, **rl))
    tx = optax.sgd(0.1)
    state, shardings = init_train_state(tx, jax.tree.map(lambda x: x.copy(), params), mesh)
    programs = build_grpo_programs(config.rl, graphdef, tx, mesh, shardings, eos_ids=tokenizer.eos_ids,
                                   pad_id=tokenizer.pad_id, seed=SEED)
    similarity = emotions.similarity_matrix(LABELS, "plutchik")
    return GRPOStages(config, programs, mesh, tokenizer, LABELS, similarity), state


def test_rollout_micro_batches_draw_the_same_rollouts(setup):
    tokenizer, mesh, graphdef, params, frozen, batch = setup
    step = 5
    one, _ = _stages(setup, micro_batches=1)
    two, _ = _stages(setup, micro_batches=2)
    with jax.set_mesh(mesh):
        a = one.rollout((params, frozen), batch, step)
        b = two.rollout((params, frozen), batch, step)
    assert a.tokens.shape == (B * G, 6) and isinstance(a.tokens, np.ndarray)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.logps, b.logps, rtol=1e-5, atol=1e-6)
    assert len({tuple(t) for t in a.tokens}) > B  # sampled, not one repeated answer
    # The keys are the trainer's rollout keys: split(fold_in(key(seed), step), B*G), row b*G + r.
    direct = make_sampler(graphdef, group_size=G, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
                          params=SamplingParams(6, 1.0))(
        (params, frozen), *(batch[k] for k in ("prompt_ids", "prompt_mask", "input_features", "feature_mask")),
        rollout_keys(jax.random.fold_in(jax.random.key(SEED), step), B, G))
    np.testing.assert_array_equal(a.tokens, np.asarray(direct.tokens))


def test_score_and_advantages(setup):
    tokenizer, _, _, _, _, batch = setup
    stages, _ = _stages(setup)
    golds = [LABELS[int(i)] for i in np.repeat(batch["label"], G)]
    texts = []
    for row, gold in enumerate(golds):  # rollout 0 right and well-formed, rollout 1 malformed (no think block)
        texts.append(format_target(gold, "esr", content="w", acoustics="a", summary="s") if row % 2 == 0
                     else f"<answer>{gold}</answer>")
    n = 12
    tokens = np.zeros((B * G, n), np.int32)
    mask = np.zeros((B * G, n), np.int32)
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text)[:n]
        tokens[row, :len(ids)], mask[row, :len(ids)] = ids, 1
    scored = stages.score(Rollouts(tokens, np.zeros((B * G, n), np.float32), mask, np.zeros(B * G, bool)), batch, 0)
    decoded = [tokenizer.decode(t[m.astype(bool)], skip_special_tokens=True) for t, m in zip(tokens, mask)]
    assert scored["total"].shape == (B * G,) and float(scored["alpha"]) == 1.0
    for row, text in enumerate(decoded):
        if text == texts[row].removesuffix("<|im_end|>") and row % 2 == 0:
            assert scored["total"][row] == 2.0  # format + exact match

    total = np.asarray([1.0, 0.0] * (B * G // 4) + [0.5, 0.5] * (B * G // 4))
    truncated = np.zeros(B * G, bool)
    truncated[0] = True
    advantages, weights = stages.advantages(total, truncated)
    expected, uniform = group_advantages(total.astype(np.float32), G)
    np.testing.assert_allclose(advantages, np.asarray(expected), rtol=1e-6)
    assert weights[0] == 0 and weights[1] == 1  # truncated
    assert np.all(weights[B * G // 2:] == 0) and np.asarray(uniform)[B * G // 2:].all()  # uniform groups


def test_logprobs_skip_the_old_policy_at_mu_1_and_update(setup):
    """Without activation constraints (no jax.set_mesh): XLA:CPU can deadlock running a constrained update on a
    fake multi-device mesh (README, Tests)."""
    _, _, _, params, frozen, batch = setup
    for iterations in (1, 2):
        stages, state = _stages(setup, iterations=iterations)
        policy = (state.params, frozen)
        rollouts = stages.rollout(policy, batch, 0)
        advantages, weights = stages.advantages(np.arange(B * G, dtype=np.float32) % 3, rollouts.truncated)
        train_batch = stages.train_batch(batch, rollouts, advantages, weights)
        logps = stages.logprobs((params, frozen), policy, train_batch)
        assert sorted(logps) == (["ref_logps"] if iterations == 1 else ["old_logps", "ref_logps"])
        assert logps["ref_logps"].sharding.spec[0] == ("data", "fsdp")
        # the policy has not moved yet: its log-probs are the reference's and the sampler's
        np.testing.assert_allclose(np.asarray(logps["ref_logps"]), rollouts.logps, atol=2e-5)
        train_batch.update(logps)
        before = np.asarray(jax.tree.leaves(state.params)[-1])
        state, metrics = stages.update(state, frozen, train_batch)
        assert int(state.step) == iterations and np.isfinite(metrics["loss"])
        assert not np.array_equal(before, np.asarray(jax.tree.leaves(state.params)[-1]))
