"""The GRPO step as named stages (DESIGN.md §4): `rollout` -> `score` -> `advantages` -> `logprobs` -> `update`.

`build_grpo_programs` builds the jitted programs a GRPO run compiles (the trainer and the 7B memory plan,
benchmarks/memory_7b.py, both call it); `GRPOStages` runs one stage per method on host batches (numpy, the
same full global batch on every process), feeding devices with global arrays (`distributed.global_batch`).
Every stage can be driven alone by a test; `train.py` orchestrates them, logs and checkpoints.

Micro-batching (`rl.micro_batches` = M): rollouts run M calls of B/M prompts each (one compiled program), the
log-prob passes and the update scan over M micro-batches inside their jit, so no stage holds more than B/M
prompts' activations at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from emorl_jax import distributed
from emorl_jax.programs import Program
from emorl_jax.rl import rewards
from emorl_jax.rl.grpo import group_advantages
from emorl_jax.rl.sampler import Rollouts, SamplingParams, make_sampler
from emorl_jax.rl.steps import PROMPT_KEYS, cast_to_compute_dtype, make_grpo_update, make_logps_fn
from emorl_jax.sharding import batch_sharding

LOGP_KEYS = (*PROMPT_KEYS, "completions", "completion_mask")


@dataclasses.dataclass
class GRPOPrograms:
    """The programs of a GRPO run, each a `Program` (compiled once per input signature)."""

    keys: Program     # (step, first_row) -> PRNG keys [B*G/M] of one rollout micro-batch
    rollout_weights: Program  # (params, frozen) -> the params in the compute dtype, sharded alike, for `sample`
    sample: Program   # (states, prompt_ids, prompt_mask, input_features, feature_mask, keys) -> Rollouts
    logps: Program    # (params, frozen, batch) -> log-probs [B*G, N] (reference and old policy)
    update: Program   # (state, frozen, batch) -> (state, metrics)
    advantages: Program  # rewards [B*G] -> (advantages, uniform)

    def as_dict(self) -> dict[str, Program]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def build_grpo_programs(rl, graphdef, tx, mesh, state_shardings, *, eos_ids: Sequence[int], pad_id: int,
                        seed: int) -> GRPOPrograms:
    """The jitted GRPO programs for the `rl` config section on `mesh`."""
    rows = rl.batch_size * rl.group_size
    if rl.batch_size % rl.micro_batches:
        raise ValueError(f"rl.batch_size={rl.batch_size} does not split into rl.micro_batches={rl.micro_batches}")
    per_call = rows // rl.micro_batches

    def keys(step, first_row):
        every = jax.random.split(jax.random.fold_in(jax.random.key(seed), step), rows)
        return jax.lax.dynamic_slice_in_dim(every, first_row, per_call)

    def advantages(rewards):
        return group_advantages(rewards, rl.group_size, std_ddof=rl.std_ddof)

    def rollout_weights(params, frozen):
        return cast_to_compute_dtype(graphdef, params, frozen)

    sampling = SamplingParams(rl.max_new_tokens, rl.temperature, rl.top_p, rl.top_k, rl.top_p_candidates)
    return GRPOPrograms(
        keys=Program("keys", jax.jit(keys, out_shardings=batch_sharding(mesh, 1))),
        rollout_weights=Program("rollout_weights", jax.jit(rollout_weights)),
        sample=Program("sample", make_sampler(graphdef, group_size=rl.group_size, eos_ids=eos_ids, pad_id=pad_id,
                                              params=sampling)),
        logps=Program("logps", make_logps_fn(graphdef, group_size=rl.group_size, temperature=rl.temperature,
                                             vocab_chunk=rl.logps_chunk, micro_batches=rl.micro_batches)),
        update=Program("update", make_grpo_update(
            graphdef, tx, group_size=rl.group_size, clip_eps=rl.clip_eps, beta=rl.beta,
            normalization=rl.loss_normalization, temperature=rl.temperature, vocab_chunk=rl.logps_chunk,
            state_shardings=state_shardings,
            micro_batches=rl.micro_batches)),
        advantages=Program("advantages", jax.jit(advantages)),
    )


class GRPOStages:
    """The stages of one GRPO step. `batch` arguments are host batches (numpy, full global batch, B prompts)."""

    def __init__(self, config, programs: GRPOPrograms, mesh, tokenizer, labels: Sequence[str], similarity):
        self.config, self.rl, self.programs, self.mesh = config, config.rl, programs, mesh
        self.tokenizer, self.labels, self.similarity = tokenizer, tuple(labels), similarity

    def rollout(self, states: tuple, batch: dict, step: int) -> Rollouts:
        """G completions per prompt, sampled in `rl.micro_batches` calls; host numpy, rows b*G + r. The keys of
        rollout row i at global step `step` are split(fold_in(key(seed), step), B*G)[i], however the batch is
        split or spread over processes."""
        m, b, g = self.rl.micro_batches, len(batch["prompt_ids"]), self.rl.group_size
        if b != self.rl.batch_size:
            raise ValueError(f"rollout: the batch has {b} prompts, rl.batch_size is {self.rl.batch_size}")
        parts = []
        for i in range(m):
            chunk = {k: batch[k][i * b // m:(i + 1) * b // m] for k in PROMPT_KEYS}
            keys = self.programs.keys(np.int32(step), np.int32(i * b // m * g))
            prompts = distributed.global_batch(chunk, self.mesh)
            parts.append(distributed.to_host(self.programs.sample(states, *(prompts[k] for k in PROMPT_KEYS),
                                                                  keys)))
        return Rollouts(*(np.concatenate(x) for x in zip(*parts)))

    def score(self, rollouts: Rollouts, batch: dict, step: int) -> dict[str, np.ndarray]:
        """Rewards [B*G] of every part (host; identical on every process), and the step's alpha."""
        r = self.config.reward
        texts = [self.tokenizer.decode(t[mk.astype(bool)], skip_special_tokens=True)
                 for t, mk in zip(rollouts.tokens, rollouts.mask)]
        golds = [self.labels[int(i)] for i in np.repeat(batch["label"], self.rl.group_size)]
        alpha = rewards.alpha_schedule(step, self.rl.steps, kind=r.alpha_schedule, value=r.alpha)
        scored = rewards.compute_rewards(
            texts, golds, labels=self.labels, similarity=self.similarity, mode=self.config.prompt_mode,
            weights={"format": r.format_weight, "accuracy": r.accuracy_weight}, accuracy=r.accuracy,
            alpha=alpha, gamma=r.gamma)
        return {**scored, "alpha": np.float64(alpha)}

    def advantages(self, total: np.ndarray, truncated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(advantages [B*G] float32, weights [B*G] float32): weight 0 drops a row from the loss (a group whose
        rewards all equal, with `rl.skip_uniform_groups`; a truncated completion, with `rl.mask_truncated`)."""
        advantages, uniform = distributed.to_host(self.programs.advantages(np.asarray(total, np.float32)))
        weights = np.ones(len(total), np.float32)
        if self.rl.skip_uniform_groups:
            weights *= ~uniform
        if self.rl.mask_truncated:
            weights *= ~np.asarray(truncated)
        return advantages.astype(np.float32), weights

    def train_batch(self, batch: dict, rollouts: Rollouts, advantages: np.ndarray, weights: np.ndarray) -> dict:
        """The global arrays the log-prob passes and the update read (one pytree structure every step)."""
        host = {**{k: batch[k] for k in PROMPT_KEYS}, "completions": rollouts.tokens,
                "completion_mask": rollouts.mask, "advantages": advantages, "weights": weights}
        return distributed.global_batch(host, self.mesh)

    def logprobs(self, reference: tuple, policy: tuple, train_batch: dict) -> dict:
        """{"ref_logps"} under the reference, plus {"old_logps"} under the sampling policy when `rl.iterations`
        > 1 (at mu = 1 the update uses the policy's own log-probs, and this pass is skipped)."""
        inputs = {k: train_batch[k] for k in LOGP_KEYS}
        out = {"ref_logps": self.programs.logps(*reference, inputs)}
        if self.rl.iterations > 1:
            out["old_logps"] = self.programs.logps(*policy, inputs)
        return out

    def update(self, state, frozen, train_batch: dict):
        """`rl.iterations` optimisation passes over the batch; (state, metrics of the last pass on the host)."""
        for _ in range(self.rl.iterations):
            state, metrics = self.programs.update(state, frozen, train_batch)
        return state, distributed.to_host(metrics)


def mean_reward_parts(scored: dict[str, np.ndarray]) -> dict[str, float]:
    """The logged reward figures: the mean of every part, and the std of the total."""
    out = {f"reward_{k}": float(np.mean(v)) for k, v in scored.items() if k != "alpha"}
    out["reward_std"] = float(np.std(scored["total"]))
    return out

