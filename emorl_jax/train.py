"""`python -m emorl_jax.train --config=configs/X.py --workdir=DIR [--config.key=value ...]`

Stages: (optional) SFT warm-up on ESR-format targets, then GRPO with ESWR + format rewards; greedy evaluations
on the held-out split after each stage, printed as a before/after table. Every `train.checkpoint_every` steps
(and on SIGTERM) the train state, the data-iterator state and the stage are saved; rerunning the same command
with the same workdir resumes exactly where it stopped (same next batch, same PRNG stream).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags
from tqdm import tqdm

from emorl_jax import checkpoint
from emorl_jax.data import emotions
from emorl_jax.evaluation import GreedyEvaluator, summary_table, write_outputs
from emorl_jax.models.lora import add_lora, merge_lora, split_trainable, zero_lora
from emorl_jax.rl import rewards
from emorl_jax.rl.grpo import group_advantages, metric_means
from emorl_jax.rl.sampler import SamplingParams, make_sampler, rollout_keys
from emorl_jax.rl.steps import (PROMPT_KEYS, TrainState, init_train_state, make_grpo_update, make_logps_fn,
                                make_optimizer, make_sft_update, split_micro_batches)
from emorl_jax.run_log import RunLog
from emorl_jax.run_setup import RunData, build_model, prepare_data, prepare_tokenizer
from emorl_jax.sharding import make_mesh, param_shardings

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py run config", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics, evaluations", required=True)
flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() (TPU pod slices, multi-node GPU)")
FLAGS = flags.FLAGS


class Preempted(Exception):
    """SIGTERM arrived; the loop saved a checkpoint and stops."""


class Trainer:
    """Holds the model split (trainable, frozen), the jitted steps and the loops of both stages."""

    def __init__(self, config, workdir: str | Path):
        self.config, self.workdir = config, Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mesh = make_mesh(tuple(config.mesh.shape))
        self.data: RunData = prepare_data(config, self.workdir)
        self.tokenizer = prepare_tokenizer(config, self.workdir, self.data)
        model = build_model(config, self.tokenizer, self.mesh)
        if config.lora.rank > 0:
            model = add_lora(model, rank=config.lora.rank, alpha=config.lora.alpha,
                             targets=tuple(config.lora.targets), rngs=nnx.Rngs(config.init.seed + 1))
        self.graphdef, params, self.frozen = split_trainable(model, lora=config.lora.rank > 0)
        self.params = jax.device_put(params, param_shardings(params, self.mesh))
        self.frozen = jax.device_put(self.frozen, param_shardings(self.frozen, self.mesh))
        self.ckpt = checkpoint.TrainCheckpointer(self.workdir, keep=config.train.keep_checkpoints)
        self.log = RunLog(self.workdir, enabled=jax.process_index() == 0)
        self.labels = self.data.labels
        self.evaluator = GreedyEvaluator(self.graphdef, self.tokenizer, labels=self.labels, mode=config.prompt_mode,
                                         max_new_tokens=config.rl.max_new_tokens,
                                         batch_size=config.train.eval_batch_size)
        self.key = jax.random.key(config.train.seed)
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
        write_outputs(out_dir, predictions, metrics, self.labels, title=name)
        self.log.log(0, {k: metrics[k] for k in ("wa", "ua", "weighted_f1", "macro_f1", "invalid_rate")},
                     stage=f"eval_{name}")
        return metrics

    # ----------------------------------------------------------------------------------------- stages
    def _resume(self, stage: str, tx) -> tuple[TrainState, TrainState, dict]:
        """(state, its shardings, meta) from the latest checkpoint of `stage`, or a fresh state."""
        fresh, shardings = init_train_state(tx, self.params, self.mesh)
        step = self.ckpt.latest_step()
        if step is None:
            return fresh, shardings, {}
        state, meta = self.ckpt.restore(fresh, step)
        if meta["stage"] != stage:
            return fresh, shardings, {}
        return TrainState(*state), shardings, meta

    def _checkpoint(self, stage: str, state: TrainState, iterator, force: bool = False) -> None:
        step = self._global_step(stage, int(state.step))
        meta = {"stage": stage, "stage_step": int(state.step), "data": iterator.get_state_json()}
        self.ckpt.save(step, state, meta, force=force)

    def _global_step(self, stage: str, stage_step: int) -> int:
        return stage_step if stage == "sft" else self.config.sft.steps + stage_step

    def _save_tree(self, name: str, tree) -> None:
        import orbax.checkpoint as ocp

        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save((self.workdir / name).absolute(), tree)

    def _load_tree(self, path: Path, like):
        import orbax.checkpoint as ocp

        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(path.absolute(), abstract)

    def sft(self) -> None:
        """Runs (or resumes) SFT; leaves `self.params` = the policy GRPO starts from, saved as `grpo_start`.
        With `sft.from_run`, that run's `grpo_start` is the start instead (no SFT here)."""
        c = self.config.sft
        if c.from_run:
            start = Path(c.from_run) / "grpo_start"
            if not start.exists():
                raise FileNotFoundError(f"sft.from_run={c.from_run}: no grpo_start there (has its SFT finished?)")
            self.params = self._load_tree(start, self.params)
            return
        if (self.workdir / "grpo_start").exists():
            self.params = self._load_tree(self.workdir / "grpo_start", self.params)
            return
        if c.steps > 0:
            tx = make_optimizer(learning_rate=c.learning_rate, total_steps=c.steps, **self._optim_kwargs())
            state, shardings, meta = self._resume("sft", tx)
            update = make_sft_update(self.graphdef, tx, shardings)
            iterator = self.data.train_iterator(self.tokenizer, c.batch_size, seed=self.config.train.seed,
                                                with_targets=True, state=meta.get("data"))
            for _ in tqdm(range(int(state.step), c.steps), desc="SFT", initial=int(state.step), total=c.steps,
                          disable=jax.process_index() != 0):
                batch = next(iterator)
                arrays = {k: batch[k] for k in (*PROMPT_KEYS, "target_ids", "target_mask")}
                state, metrics = update(state, self.frozen, split_micro_batches(arrays, c.micro_batches))
                self._after_step("sft", state, iterator, {"nll": metrics["loss"], "grad_norm": metrics["grad_norm"]})
            self.ckpt.wait()
            self.params = state.params
        self._save_tree("grpo_start", self.params)

    def grpo(self) -> None:
        c, r = self.config.rl, self.config.reward
        if (self.workdir / "params_final").exists():
            self.params = self._load_tree(self.workdir / "params_final", self.params)
            return
        # The reference policy is the one GRPO starts from: the frozen base under LoRA, else a copy.
        reference = (zero_lora(self.params) if self.config.lora.rank > 0 else jax.tree.map(jnp.copy, self.params),
                     self.frozen)
        tx = make_optimizer(learning_rate=c.learning_rate, total_steps=c.steps, **self._optim_kwargs())
        state, shardings, meta = self._resume("grpo", tx)
        update = make_grpo_update(self.graphdef, tx, group_size=c.group_size, clip_eps=c.clip_eps, beta=c.beta,
                                  normalization=c.loss_normalization, temperature=c.temperature,
                                  state_shardings=shardings)
        logps_fn = make_logps_fn(self.graphdef, group_size=c.group_size, temperature=c.temperature)
        sample = make_sampler(self.graphdef, group_size=c.group_size, eos_ids=self.tokenizer.eos_ids,
                              pad_id=self.tokenizer.pad_id,
                              params=SamplingParams(c.max_new_tokens, c.temperature, c.top_p, c.top_k))
        similarity = emotions.similarity_matrix(self.labels, r.similarity)
        iterator = self.data.train_iterator(self.tokenizer, c.batch_size, seed=self.config.train.seed + 1,
                                            with_targets=False,
                                            state=meta.get("data"))
        for _ in tqdm(range(int(state.step), c.steps), desc="GRPO", initial=int(state.step), total=c.steps,
                      disable=jax.process_index() != 0):
            start = time.perf_counter()
            step = int(state.step)
            batch = next(iterator)
            prompts = {k: batch[k] for k in PROMPT_KEYS}
            keys = rollout_keys(jax.random.fold_in(self.key, self._global_step("grpo", step)), c.batch_size,
                                c.group_size)
            roll = sample((state.params, self.frozen), *prompts.values(), keys)
            tokens, mask = np.asarray(roll.tokens), np.asarray(roll.mask)
            texts = [self.tokenizer.decode(t[m.astype(bool)], skip_special_tokens=True)
                     for t, m in zip(tokens, mask)]
            golds = [self.labels[int(i)] for i in np.repeat(batch["label"], c.group_size)]
            alpha = rewards.alpha_schedule(step, c.steps, kind=r.alpha_schedule, value=r.alpha)
            scored = rewards.compute_rewards(
                texts, golds, labels=self.labels, similarity=similarity, mode=self.config.prompt_mode,
                weights={"format": r.format_weight, "accuracy": r.accuracy_weight}, accuracy=r.accuracy,
                alpha=alpha, gamma=r.gamma)
            advantages, uniform = group_advantages(jnp.asarray(scored["total"]), c.group_size, std_ddof=c.std_ddof)
            weights = np.ones(len(texts), np.float32)
            if c.skip_uniform_groups:
                weights *= ~np.asarray(uniform)
            if c.mask_truncated:
                weights *= ~np.asarray(roll.truncated)
            train_batch = {**prompts, "completions": tokens, "completion_mask": mask,
                           "advantages": np.asarray(advantages, np.float32), "weights": weights}
            train_batch["old_logps"] = logps_fn(state.params, self.frozen, train_batch)
            train_batch["ref_logps"] = logps_fn(*reference, train_batch)
            for _ in range(c.iterations):
                state, metrics = update(state, self.frozen, split_micro_batches(train_batch, c.micro_batches))
            metrics = jax.device_get(metrics)  # waits for the update, so that tokens/s counts all of the step
            elapsed = time.perf_counter() - start
            self._after_step("grpo", state, iterator, {
                **{f"reward_{k}": float(np.mean(v)) for k, v in scored.items()},
                "reward_std": float(np.std(scored["total"])), "loss": metrics["loss"],
                "grad_norm": metrics["grad_norm"], **metric_means(metrics),
                "completion_length": float(mask.sum(1).mean()), "truncated": float(np.asarray(roll.truncated).mean()),
                "alpha": alpha, "tokens_per_s": float(mask.sum()) / elapsed})
        self.params = state.params
        self.ckpt.wait()
        self._save_tree("params_final", self.params)
        final = nnx.merge(self.graphdef, self.params, self.frozen)
        checkpoint.save(merge_lora(final) if self.config.lora.rank > 0 else final, self.workdir / "final")

    # ----------------------------------------------------------------------------------------- helpers
    def _after_step(self, stage: str, state: TrainState, iterator, values: dict) -> None:
        step = int(state.step)
        if step % self.config.train.log_every == 0:
            self.log.log(self._global_step(stage, step), values, stage=stage)
        if self._stop:
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
                    grad_clip=o.grad_clip)


def run(config, workdir: str | Path) -> dict:
    """SFT (optional) -> eval -> GRPO -> eval; returns {"sft": metrics, "grpo": metrics}."""
    trainer = Trainer(config, workdir)
    results = {}
    trainer.sft()
    results["after SFT" if config.sft.steps or config.sft.from_run else "before GRPO"] = trainer.evaluate("before_grpo")
    trainer.grpo()
    results["after GRPO"] = trainer.evaluate("after_grpo")
    table = summary_table(results)
    (Path(workdir) / "summary.txt").write_text(table + "\n")
    if jax.process_index() == 0:
        print(table)
    trainer.log.close()
    trainer.ckpt.close()
    return results


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if FLAGS.multihost:
        jax.distributed.initialize()
    try:
        run(_CONFIG.value, FLAGS.workdir)
    except Preempted as e:
        print(e)
        sys.exit(0)


if __name__ == "__main__":
    app.run(main)
