"""`python -m emorl_jax.train --config=configs/X.py --workdir=DIR [--config.key=value ...]`

Stages: (optional) SFT warm-up on ESR-format targets, then GRPO with ESWR + format rewards; greedy evaluations
on the held-out split after each stage, printed as a before/after table (`rl.steps=0` stops after SFT). Every
`train.checkpoint_every` steps (and on SIGTERM) the train state, the data-iterator state and the stage are saved;
rerunning the same command with the same workdir resumes exactly where it stopped (same next batch, same PRNG
stream). The workdir records its config (`config.json`): a rerun with a different config refuses to start unless
`--resume_with_changes`. Bad input (a corpus, clip, checkpoint, config or tokenizer) prints `error: <what>:
<problem>` and exits with status 2 (`--verbose` shows the traceback).
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

from emorl_jax import checkpoint, cli, distributed, run_guard
from emorl_jax.data import emotions
from emorl_jax.errors import ConfigError
from emorl_jax.evaluation import GreedyEvaluator, summary_table, write_outputs
from emorl_jax.models.lora import add_lora, merge_lora, split_trainable, zero_lora
from emorl_jax.paths import as_path
from emorl_jax.programs import Program, step_memory
from emorl_jax.rl import hubs, rewards
from emorl_jax.rl.grpo import metric_means
from emorl_jax.rl.stages import GRPOStages, build_grpo_programs, mean_reward_parts
from emorl_jax.rl.steps import (PROMPT_KEYS, TrainState, abstract_train_state, compute_dtype_copy, init_train_state,
                                make_optimizer, make_sft_update, train_state_shardings)
from emorl_jax.run_log import RunLog
from emorl_jax.run_setup import RunData, build_model, prepare_data, prepare_tokenizer
from emorl_jax.sharding import (check_sharding, make_mesh, param_shardings, per_device_bytes,
                                replicated_leaves)

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py run config", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, evaluations", required=True)
flags.DEFINE_bool("resume_with_changes", False, "resume a run whose recorded config.json differs from this config "
                  "(the changed keys are printed and recorded); without it such a rerun refuses to start")
distributed.define_flags()
FLAGS = flags.FLAGS


class Preempted(Exception):
    """SIGTERM arrived; the loop saved a checkpoint and stops."""


class Trainer:
    """Holds the model split (trainable, frozen) on the mesh, the compiled programs and the loops of both stages.

    Every process runs the same global input pipeline and feeds its own rows (`distributed.global_batch`); host
    values (rollout tokens, rewards, metrics) are global on every process, so every process takes the same
    decisions. `<workdir>/memory.json` records the per-device bytes of each state and each compiled step.
    """

    def __init__(self, config, workdir: str | Path, *, resume_with_changes: bool = False):
        """resume_with_changes: accept a config that differs from the workdir's recorded one (`run_guard`)."""
        run_guard.check_or_record(config, workdir, resume_with_changes=resume_with_changes)
        self.config, self.workdir = config, as_path(workdir)  # local or remote (gs://...)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = make_mesh(tuple(config.mesh.shape))
        self.data: RunData = prepare_data(config, self.workdir)
        self.tokenizer = prepare_tokenizer(config, self.workdir, self.data)
        model = build_model(config, self.tokenizer, self.mesh)
        if config.lora.rank > 0:
            model = add_lora(model, rank=config.lora.rank, alpha=config.lora.alpha,
                             targets=tuple(config.lora.targets), rngs=nnx.Rngs(config.init.seed + 1))
        self.graphdef, params, frozen = split_trainable(model, lora=config.lora.rank > 0)
        del model
        self.params = jax.device_put(params, param_shardings(params, self.mesh))
        self.frozen = jax.device_put(frozen, param_shardings(frozen, self.mesh))
        del params, frozen
        self.ckpt = checkpoint.TrainCheckpointer(self.workdir, keep=config.train.keep_checkpoints)
        self.log = RunLog(self.workdir, enabled=jax.process_index() == 0)
        self.labels = self.data.labels
        self.evaluator = GreedyEvaluator(self.graphdef, self.tokenizer, labels=self.labels, mode=config.prompt_mode,
                                         max_new_tokens=config.rl.max_new_tokens,
                                         batch_size=config.train.eval_batch_size, mesh=self.mesh)
        self.programs: dict[str, Program] = {}  # every compiled program of the run, by stage and name
        self._stop = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        del signum, frame
        self._stop = True

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate(self, name: str) -> dict:
        out_dir = self.workdir / "eval" / name
        if (out_dir / "metrics.json").exists():
            return json.loads((out_dir / "metrics.json").read_text())
        batches = self.data.eval_batches(self.tokenizer, self.config.train.eval_batch_size)
        predictions, metrics = self.evaluator.evaluate((self.params, self.frozen), batches)
        if jax.process_index() == 0:
            write_outputs(out_dir, predictions, metrics, self.labels, title=name)
        self.log.log(0, {k: metrics[k] for k in ("wa", "ua", "weighted_f1", "macro_f1", "invalid_rate")},
                     stage=f"eval_{name}")
        return metrics

    # ----------------------------------------------------------------------------------------- state
    def _train_state(self, stage: str, tx) -> tuple[TrainState, TrainState, dict]:
        """(state, its shardings, meta): restored from the latest checkpoint of `stage` straight into its sharded
        target (no fresh state beside it), or fresh. `self.params` is consumed either way (the state holds the
        params from here on)."""
        offload = self.config.optim.offload
        shardings = train_state_shardings(tx, self.params, self.mesh, offload=offload)
        step = self.ckpt.latest_step()
        meta = self.ckpt.restore_meta(step) if step is not None else None
        if meta is not None and meta["stage"] == stage:
            target = abstract_train_state(tx, self.params, self.mesh, offload=offload)
            self.params = None
            state, meta = self.ckpt.restore(target, step)
            return TrainState(*state), shardings, meta
        state, shardings = init_train_state(tx, self.params, self.mesh, offload=offload)
        self.params = None
        return state, shardings, {}

    def _check_sharding(self, trees: dict) -> None:
        """Warns about (or, with mesh.strict_sharding, refuses) any leaf over 1 MiB replicated on every device."""
        check_sharding(trees, strict=self.config.mesh.strict_sharding)

    def _write_memory(self, trees: dict, programs: dict[str, Program]) -> None:
        """<workdir>/memory.json: per-device bytes (max over devices) of each state and each compiled step."""
        per_device = {name: per_device_bytes(tree) for name, tree in trees.items()}
        replicated = sum(b for tree in trees.values() for _, b in replicated_leaves(tree, min_bytes=0))
        steps = step_memory(programs)
        report = {"devices": self.mesh.devices.size, "per_device_bytes": per_device, "replicated_bytes": replicated,
                  "steps": steps,
                  "compiles": {name: p.compiles for name, p in programs.items()},
                  "compile_seconds": {name: round(sum(p.compile_seconds), 2) for name, p in programs.items()}}
        if jax.process_index() == 0:
            (self.workdir / "memory.json").write_text(json.dumps(report, indent=2) + "\n")
            size = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
            peak = max((sum(m.get(k, 0) for k in ("argument", "output", "temp")) - m.get("alias", 0)
                        for m in steps.values()), default=0)
            print(f"memory per device: {', '.join(f'{k} {size(v)}' for k, v in per_device.items())}; "
                  f"replicated {size(replicated)}; largest step {size(peak)} ({self.workdir / 'memory.json'})")

    def _checkpoint(self, stage: str, state: TrainState, iterator, force: bool = False) -> None:
        step = self._global_step(stage, int(state.step))
        data = distributed.gather_strings(iterator.get_state_json())  # every process's iterator state
        meta = {"stage": stage, "stage_step": int(state.step), "data": data}
        self.ckpt.save(step, state, meta, force=force)

    @staticmethod
    def _data_state(meta: dict) -> str | None:
        """This process's data-iterator state from a checkpoint's meta. Every process runs the same global
        pipeline, so the states agree; a run resumed on another process count takes the first."""
        data = meta.get("data")
        if data is None or isinstance(data, str):
            return data
        return data[jax.process_index()] if len(data) == jax.process_count() else data[0]

    def _global_step(self, stage: str, stage_step: int) -> int:
        return stage_step if stage == "sft" else self.config.sft.steps + stage_step

    def _save_tree(self, name: str, tree) -> None:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(self.workdir / name, tree)

    def _load_tree(self, path, like):
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(as_path(path), abstract)

    # ----------------------------------------------------------------------------------------- stages
    def sft(self) -> None:
        """Runs (or resumes) SFT; leaves `self.params` = the policy GRPO starts from, saved as `grpo_start`.
        With `sft.from_run`, that run's `grpo_start` is the start instead (no SFT here)."""
        c = self.config.sft
        if c.from_run:
            start = as_path(c.from_run) / "grpo_start"
            if not start.exists():
                raise ConfigError(f"sft.from_run={c.from_run}: no grpo_start there (has its SFT finished?)")
            self.params = self._load_tree(start, self.params)
            return
        if (self.workdir / "grpo_start").exists():
            self.params = self._load_tree(self.workdir / "grpo_start", self.params)
            return
        if c.steps > 0:
            tx = make_optimizer(learning_rate=c.learning_rate, total_steps=c.steps, **self._optim_kwargs())
            state, shardings, meta = self._train_state("sft", tx)
            self._check_sharding({"params": state.params, "optimizer": state.opt_state, "frozen": self.frozen})
            update = Program("sft_update", make_sft_update(self.graphdef, tx, shardings, micro_batches=c.micro_batches))
            self.programs["sft_update"] = update
            iterator = self.data.train_iterator(self.tokenizer, c.batch_size, seed=self.config.train.seed,
                                                with_targets=True, state=self._data_state(meta))
            for _ in tqdm(range(int(state.step), c.steps), desc="SFT", initial=int(state.step), total=c.steps,
                          disable=jax.process_index() != 0):
                batch = next(iterator)
                arrays = distributed.global_batch({k: batch[k] for k in (*PROMPT_KEYS, "target_ids", "target_mask")},
                                                  self.mesh)
                first = update.compiles == 0
                state, metrics = update(state, self.frozen, arrays)
                metrics = distributed.to_host(metrics)
                if first:
                    self._write_memory({"params": state.params, "optimizer": state.opt_state, "frozen": self.frozen},
                                       {"sft_update": update})
                self._after_step("sft", state, iterator, {"nll": metrics["loss"], "grad_norm": metrics["grad_norm"]})
            self.ckpt.wait()
            self.params = state.params
        self._save_tree("grpo_start", self.params)

    def grpo(self) -> None:
        c = self.config.rl
        if (self.workdir / "params_final").exists():
            self.params = self._load_tree(self.workdir / "params_final", self.params)
            return
        # The reference policy is the one GRPO starts from: the frozen base under LoRA, else a copy in the compute
        # dtype (the model casts every large weight to it anyway, so its log-probs are those of the original).
        lora = self.config.lora.rank > 0
        reference = ((zero_lora(self.params) if lora else compute_dtype_copy(self.graphdef, self.params, self.frozen)),
                     self.frozen)
        tx = make_optimizer(learning_rate=c.learning_rate, total_steps=c.steps, **self._optim_kwargs())
        state, shardings, meta = self._train_state("grpo", tx)
        trees = {"params": state.params, "optimizer": state.opt_state, "frozen": self.frozen}
        if not lora:
            trees["reference"] = reference[0]
        self._check_sharding(trees)
        programs = build_grpo_programs(c, self.graphdef, tx, self.mesh, shardings, eos_ids=self.tokenizer.eos_ids,
                                       pad_id=self.tokenizer.pad_id, seed=self.config.train.seed)
        self.programs.update(programs.as_dict())
        similarity = emotions.similarity_matrix(self.labels, self.config.reward.similarity)
        stages = GRPOStages(self.config, programs, self.mesh, self.tokenizer, self.labels, similarity)
        hub_rewards = self._hub_report(similarity) if int(state.step) == 0 else None
        iterator = self.data.train_iterator(self.tokenizer, c.batch_size, seed=self.config.train.seed + 1,
                                            with_targets=False, state=self._data_state(meta))
        for _ in tqdm(range(int(state.step), c.steps), desc="GRPO", initial=int(state.step), total=c.steps,
                      disable=jax.process_index() != 0):
            start = time.perf_counter()
            step = int(state.step)
            first = programs.update.compiles == 0
            batch = next(iterator)
            policy = (state.params, self.frozen)
            # The sampler reads a copy in the compute dtype (bf16 at 7B: half the bytes per decode step).
            rollout_policy = (programs.rollout_weights(state.params, self.frozen), self.frozen)
            rollouts = stages.rollout(rollout_policy, batch, self._global_step("grpo", step))
            del rollout_policy
            scored = stages.score(rollouts, batch, step)
            advantages, weights = stages.advantages(scored["total"], rollouts.truncated)
            train_batch = stages.train_batch(batch, rollouts, advantages, weights)
            train_batch.update(stages.logprobs(reference, policy, train_batch))
            state, metrics = stages.update(state, self.frozen, train_batch)
            elapsed = time.perf_counter() - start
            if first:
                self._write_memory({**trees, "params": state.params, "optimizer": state.opt_state},
                                   programs.as_dict())
            if step == 0 and hub_rewards is not None and jax.process_index() == 0:
                accuracy = scored["eswr" if self.config.reward.accuracy == "eswr" else "accuracy"]
                for warning in hubs.hub_warnings(self.labels, hub_rewards, float(accuracy.mean())):
                    print(f"warning: {warning}")
            self._after_step("grpo", state, iterator, {
                **mean_reward_parts(scored), "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                **metric_means(metrics), "completion_length": float(rollouts.mask.sum(1).mean()),
                "truncated": float(rollouts.truncated.mean()), "alpha": float(scored["alpha"]),
                "tokens_per_s": float(rollouts.mask.sum()) / elapsed})
        self.params = state.params
        self.ckpt.wait()
        self._save_tree("params_final", self.params)
        final = nnx.merge(self.graphdef, self.params, self.frozen)
        checkpoint.save(merge_lora(final) if lora else final, self.workdir / "final")

    # ----------------------------------------------------------------------------------------- helpers
    def _hub_report(self, similarity) -> np.ndarray:
        """Prints the expected accuracy reward of every constant answer under the training priors (at step 0's
        alpha) and returns it [L], for the warning after the first rollouts (`rl.hubs`)."""
        r = self.config.reward
        priors = hubs.label_priors([u.label for u in self.data.train], self.labels)
        alpha = rewards.alpha_schedule(0, self.config.rl.steps, kind=r.alpha_schedule, value=r.alpha)
        expected = hubs.constant_answer_rewards(priors, similarity, self.labels, accuracy=r.accuracy, alpha=alpha,
                                                gamma=r.gamma)
        if jax.process_index() == 0:
            print(f"constant answers under the training priors ({r.accuracy}"
                  + (f", alpha {alpha:g}, gamma {r.gamma:g}" if r.accuracy == "eswr" else "") + "):\n"
                  + hubs.hub_table(self.labels, priors, expected))
        return expected

    def _after_step(self, stage: str, state: TrainState, iterator, values: dict) -> None:
        step = int(state.step)
        if step % self.config.train.log_every == 0:
            self.log.log(self._global_step(stage, step), values, stage=stage)
        if distributed.any_process(self._stop):  # every process stops after the same step
            self._checkpoint(stage, state, iterator, force=True)
            self.ckpt.wait()
            raise Preempted(f"SIGTERM: saved {stage} step {step} in {self.workdir}")
        if step % self.config.train.checkpoint_every == 0 or step == self._stage_steps(stage):
            self._checkpoint(stage, state, iterator)

    def _stage_steps(self, stage: str) -> int:
        return self.config.sft.steps if stage == "sft" else self.config.rl.steps

    def _optim_kwargs(self) -> dict:
        o = self.config.optim
        return dict(warmup_fraction=o.warmup_fraction, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                    grad_clip=o.grad_clip, mu_dtype=o.mu_dtype or None)


def run(config, workdir: str | Path, *, resume_with_changes: bool = False) -> dict:
    """SFT (optional) -> eval -> GRPO -> eval; returns {"sft": metrics, "grpo": metrics}. The jitted programs are
    traced with the run's mesh in context, so the models' activation sharding constraints apply (unless
    `mesh.activation_constraints` is False)."""
    trainer = Trainer(config, workdir, resume_with_changes=resume_with_changes)
    results = {}
    with jax.set_mesh(trainer.mesh) if config.mesh.activation_constraints else contextlib.nullcontext():
        trainer.sft()
        results["after SFT" if config.sft.steps or config.sft.from_run else "before GRPO"] = (
            trainer.evaluate("before_grpo"))
        if config.rl.steps > 0:  # rl.steps=0: SFT and its evaluation only (a shared start for GRPO branches)
            trainer.grpo()
            results["after GRPO"] = trainer.evaluate("after_grpo")
    table = summary_table(results)
    if jax.process_index() == 0:
        (trainer.workdir / "summary.txt").write_text(table + "\n")
        print(table)
    trainer.log.close()
    trainer.ckpt.close()
    return results


def main(argv):
    del argv
    distributed.initialize_from_flags()
    try:
        run(_CONFIG.value, FLAGS.workdir, resume_with_changes=FLAGS.resume_with_changes)
    except Preempted as e:
        print(e)
        sys.exit(0)


if __name__ == "__main__":
    cli.run(main)
