"""`python -m emorl_jax.train` and `python -m emorl_jax.eval` as two local processes (4 fake CPU devices each,
gloo collectives, `--coordinator_address/--num_processes/--process_id`) equal the same commands as one process
with 8 devices: same GRPO rewards at every step, same final params, same held-out predictions; and a two-process
run stopped with SIGTERM after its first GRPO step resumes to the same params.

Every run reads one synthetic corpus generated once (`--config.data.data_dir`), and shares the session's
persistent compilation cache (tests/conftest.py), so the resumed run and the second process compile little.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from cpu_devices import xla_flags

from emorl_jax.data.corpora import synthetic

ROOT = Path(__file__).resolve().parents[1]
# 12 SFT steps on the short "ir" targets (<answer>label</answer>) make many sampled answers well-formed, so GRPO
# rewards differ within groups and the GRPO steps change the params (3 steps of random "esr" text score 0).
# Checkpoints only at the end of each stage and on SIGTERM: saving every step cost ~0.5 s a step.
FAST = ["--config.prompt_mode=ir", "--config.sft.steps=12", "--config.sft.learning_rate=1e-2",
        "--config.sft.batch_size=8", "--config.rl.steps=3", "--config.rl.batch_size=8", "--config.rl.group_size=2",
        "--config.rl.max_new_tokens=8", "--config.rl.temperature=1.0", "--config.train.eval_batch_size=8",
        "--config.mesh.activation_constraints=false",
        "--config.train.checkpoint_every=50", "--config.data.synthetic_per_class=10",
        "--config.data.synthetic_speakers=10", "--config.data.eval_split=dev", "--config.tokenizer.vocab_size=400",
        "--config.mesh.shape=(1,-1,1)"]
TIMEOUT_S = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    # JAX_COMPILATION_CACHE_DIR (and its thresholds) come from conftest through os.environ.
    return {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu"}


def _train_command(workdir: Path, data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "emorl_jax.train", f"--config={ROOT / 'configs/tiny_synthetic.py'}",
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *FAST, *extra]


def _eval_command(checkpoint: Path, data_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "emorl_jax.eval", f"--config={ROOT / 'configs/tiny_synthetic.py'}",
            f"--checkpoint={checkpoint}", "--dataset=synthetic", f"--data_dir={data_dir}", "--split=dev",
            f"--out={out}", *FAST]


def _start(command: list[str], processes: int, log_dir: Path, name: str) -> list[subprocess.Popen]:
    """`command` as one process with 8 devices, or as `processes` processes with 8 / processes devices each."""
    log_dir.mkdir(parents=True, exist_ok=True)
    if processes == 1:
        commands = [command]
    else:
        port = _free_port()
        commands = [[*command, f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                     f"--process_id={k}"] for k in range(processes)]
    procs = []
    for k, cmd in enumerate(commands):
        log = open(log_dir / f"{name}_{k}.log", "w")
        procs.append(subprocess.Popen(cmd, env=_env(8 // processes), stdout=log, stderr=subprocess.STDOUT,
                                      text=True, cwd=ROOT))
        log.close()
    return procs


def _log_tails(log_dir: Path, name: str) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob(f"{name}_*.log")))


def _wait(procs: list[subprocess.Popen], log_dir: Path, name: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{name} did not finish within {timeout} s\n{_log_tails(log_dir, name)}")
    codes = [p.returncode for p in procs]
    assert codes == [0] * len(procs), f"{name} exit codes {codes}\n{_log_tails(log_dir, name)}"


def _metric_rows(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return rows


def _grpo_rewards(workdir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["reward_total"]) for r in _metric_rows(workdir) if r["stage"] == "grpo"]


def _params(workdir: Path, name: str) -> list[np.ndarray]:
    """An orbax params tree of the run (params_final, grpo_start), restored onto one device whatever the
    topology it was saved from."""
    path = (workdir / name).absolute()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.StandardCheckpointer() as ckptr:
        saved = ckptr.metadata(path)
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              getattr(saved, "item_metadata", saved))
        return [np.asarray(x) for x in jax.tree.leaves(ckptr.restore(path, target))]


def _assert_params_close(a: Path, b: Path, name: str = "params_final") -> None:
    pa, pb = _params(a, name), _params(b, name)
    assert len(pa) == len(pb) > 10
    for x, y in zip(pa, pb, strict=True):
        np.testing.assert_allclose(y, x, atol=1e-5, rtol=0)


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_and_evaluate_like_one(tmp_path):
    data_dir = tmp_path / "data"
    synthetic.generate(data_dir, n_per_class=10, speakers=10, seed=0)
    logs = tmp_path / "logs"
    times = {}

    # (a) one process, 8 devices; (b) two processes, 4 devices each: same data, same global batches.
    start = time.perf_counter()
    _wait(_start(_train_command(tmp_path / "one", data_dir), 1, logs, "one"), logs, "one")
    times["one process"] = time.perf_counter() - start
    start = time.perf_counter()
    _wait(_start(_train_command(tmp_path / "two", data_dir), 2, logs, "two"), logs, "two")
    times["two processes"] = time.perf_counter() - start

    rewards = _grpo_rewards(tmp_path / "one")
    assert [s for s, _ in rewards] == [13, 14, 15]  # sft.steps + GRPO step
    assert any(r > 0 for _, r in rewards)  # informative rewards (some answers well-formed)
    assert _grpo_rewards(tmp_path / "two") == rewards
    grpo = lambda run: [r for r in _metric_rows(tmp_path / run) if r["stage"] == "grpo"]
    for a, b in zip(grpo("one"), grpo("two"), strict=True):
        assert a["grad_norm"] > 0
        np.testing.assert_allclose([b["loss"], b["grad_norm"]], [a["loss"], a["grad_norm"]], rtol=1e-4, atol=1e-6)
    _assert_params_close(tmp_path / "one", tmp_path / "two", "grpo_start")  # after SFT
    _assert_params_close(tmp_path / "one", tmp_path / "two")
    for name in ("before_grpo", "after_grpo"):
        one, two = (_predictions(tmp_path / run / "eval" / name / "predictions.jsonl") for run in ("one", "two"))
        assert two == one and len(one) > 0

    # (c) two processes, both stopped with SIGTERM once the first GRPO step is logged, then the same command
    # again: (a)'s params. GRPO starts from (b)'s SFT result (sft.from_run; equal to (a)'s, checked above).
    resumed = tmp_path / "resumed"
    command = _train_command(resumed, data_dir, f"--config.sft.from_run={tmp_path / 'two'}")
    start = time.perf_counter()
    procs = _start(command, 2, logs, "resumed")
    deadline = time.time() + TIMEOUT_S
    while not _grpo_rewards(resumed):
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            for p in procs:
                p.kill()
            pytest.fail(f"run ended or hung before its first GRPO step\n{_log_tails(logs, 'resumed')}")
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    _wait(procs, logs, "resumed")
    assert "SIGTERM: saved grpo step" in (logs / "resumed_0.log").read_text(), _log_tails(logs, "resumed")
    assert not (resumed / "params_final").exists()
    _wait(_start(command, 2, logs, "resumed_again"), logs, "resumed_again")
    times["two processes, SIGTERM + resume"] = time.perf_counter() - start
    _assert_params_close(tmp_path / "one", resumed)
    assert _grpo_rewards(resumed) == rewards  # each step logged once, with the uninterrupted run's rewards

    # (d) the eval CLI as two processes on (a)'s final model: the trainer's held-out predictions, written once.
    start = time.perf_counter()
    _wait(_start(_eval_command(tmp_path / "one" / "final", data_dir, tmp_path / "eval2"), 2, logs, "eval"),
          logs, "eval")
    times["eval, two processes"] = time.perf_counter() - start
    predictions = _predictions(tmp_path / "eval2" / "synthetic_dev" / "predictions.jsonl")
    expected = _predictions(tmp_path / "one" / "eval" / "after_grpo" / "predictions.jsonl")
    assert predictions == expected
    assert (tmp_path / "eval2" / "summary.txt").exists()
    print("wall times:", {k: round(v, 1) for k, v in times.items()})
