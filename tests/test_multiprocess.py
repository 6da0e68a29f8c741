"""Two local JAX processes (4 fake CPU devices each, gloo collectives) forming one 8-device mesh give the same
GRPO losses and params as one process with 8 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

WORKER = Path(__file__).with_name("multiprocess_worker.py")
TIMEOUT_S = 110


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(out: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}  # the worker sets them
    return subprocess.Popen([sys.executable, str(WORKER), "--out", str(out), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs: list[subprocess.Popen]) -> None:
    try:
        logs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"worker processes did not finish within {TIMEOUT_S} s")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"worker {p.args} failed:\n{log[-4000:]}"


def test_two_processes_match_one_process(tmp_path):
    port = str(_free_port())
    procs = [_start(tmp_path / "one"),
             _start(tmp_path / "two", "--port", port, "--process", "0"),
             _start(tmp_path / "two", "--port", port, "--process", "1")]
    _wait(procs)

    one = json.loads((tmp_path / "one" / "losses_0.json").read_text())
    two = [json.loads((tmp_path / "two" / f"losses_{i}.json").read_text()) for i in range(2)]
    assert (one["processes"], one["devices"], one["local_devices"]) == (1, 8, 8)
    for run in two:
        assert (run["processes"], run["devices"], run["local_devices"]) == (2, 8, 4)
        np.testing.assert_allclose(run["losses"], one["losses"], rtol=1e-5)
    assert len(one["losses"]) == 2 and one["losses"][0] != one["losses"][1]  # the first step changed the params

    single, multi = np.load(tmp_path / "one" / "params.npz"), np.load(tmp_path / "two" / "params.npz")
    assert sorted(single.files) == sorted(multi.files) and len(single.files) > 30
    for name in single.files:
        np.testing.assert_allclose(multi[name], single[name], atol=1e-5, rtol=0, err_msg=name)
