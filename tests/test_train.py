"""`python -m emorl_jax.train` end to end on the synthetic corpus: a run killed with SIGTERM and restarted in the
same workdir reaches exactly the params of an uninterrupted run, and writes every output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from cpu_devices import xla_flags

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--config.sft.steps=4", "--config.rl.steps=4", "--config.sft.batch_size=4", "--config.rl.batch_size=2",
        "--config.rl.group_size=2", "--config.rl.max_new_tokens=12", "--config.train.eval_batch_size=8",
        "--config.mesh.activation_constraints=false",
        "--config.train.checkpoint_every=1", "--config.data.synthetic_per_class=10",
        "--config.data.synthetic_speakers=10", "--config.data.eval_split=dev", "--config.tokenizer.vocab_size=400"]


def _command(workdir: Path) -> list[str]:
    return [sys.executable, "-m", "emorl_jax.train", f"--config={ROOT / 'configs/tiny_synthetic.py'}",
            f"--workdir={workdir}", *FAST]


def _metric_rows(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _final_params(workdir: Path):
    with ocp.StandardCheckpointer() as ckptr:
        return jax.tree.leaves(ckptr.restore((workdir / "params_final").absolute()))


def test_sigterm_and_resume_reach_the_uninterrupted_params(tmp_path):
    # conftest's compilation cache: only the first of the three runs compiles. A 2-device mesh (fsdp=2) keeps
    # params, optimizer state and checkpoints sharded at a third less compile time than 8 devices.
    env = {**os.environ, "XLA_FLAGS": xla_flags(2)}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = subprocess.run(_command(straight), env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "after GRPO" in out.stdout and (straight / "summary.txt").exists()
    # The hub diagnostic before GRPO: one row per label, under the training priors (balanced: 1/7 each).
    table = out.stdout.split("constant answers under the training priors (eswr, alpha 0.5, gamma 0.7):")[1]
    assert all(f"\n{label} " in table for label in ("surprise", "neutral", "disgust")) and "0.1429" in table
    for name in ("before_grpo", "after_grpo"):
        assert (straight / "eval" / name / "confusion.png").exists()
    assert (straight / "final" / "model_config.json").exists() and (straight / "tb").is_dir()
    grpo_rows = [r for r in _metric_rows(straight) if r["stage"] == "grpo"]
    assert len(grpo_rows) == 4 and all("reward_total" in r and "kl" in r for r in grpo_rows)

    # A rerun with another config refuses in one line; --resume_with_changes accepts (and records) the change.
    changed = [*_command(straight), "--config.rl.learning_rate=0.5"]
    out = subprocess.run(changed, env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr[-3000:]
    assert out.stderr.startswith(f"error: {straight / 'config.json'}: the config differs") and "-> 0.5" in out.stderr
    out = subprocess.run([*changed, "--resume_with_changes"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "with config changes: rl.learning_rate" in out.stdout, out.stderr[-3000:]
    assert json.loads((straight / "config.json").read_text())["config"]["rl"]["learning_rate"] == 0.5

    # Preempt the second run once its first GRPO step is logged.
    proc = subprocess.Popen(_command(resumed), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    deadline = time.time() + 600
    while not any(r["stage"] == "grpo" for r in _metric_rows(resumed)):
        assert proc.poll() is None and time.time() < deadline, "run ended before its first GRPO step"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM: saved grpo step" in stdout
    assert not (resumed / "params_final").exists()

    out = subprocess.run(_command(resumed), env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    for a, b in zip(_final_params(straight), _final_params(resumed), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # The resumed run logged each GRPO step once, with the rewards of the uninterrupted run.
    steps = lambda rows: [(r["step"], r["reward_total"]) for r in rows if r["stage"] == "grpo"]
    assert steps(_metric_rows(resumed)) == steps(_metric_rows(straight))
