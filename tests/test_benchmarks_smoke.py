"""Every benchmark runs in its seconds-long `--quick` mode and prints parseable `name: ours X, reference Y,
ratio Z` lines (memory_7b: a narrow 7B-shaped model at 1 and 2 layers on 8 CPU devices)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
LINE = re.compile(rf"^(?P<name>[^:\n]+): ours (?P<ours>{NUMBER}), reference (?P<ref>{NUMBER}), "
                  rf"ratio (?P<ratio>{NUMBER})(?:  \[.*\])?$")


def run_quick(script: str) -> str:
    # One CPU device and no persistent compilation cache (compiles.py counts compilations), as when run by hand.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("JAX_PERSISTENT_CACHE")
           and k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.parametrize("script, expected", [
    ("rollouts.py", ["rollout tokens/s (CPU, steady state)"]),
    ("train_step.py", ["GRPO train step completion tokens/s (CPU)"]),
    ("scaling.py", ["decode ms/step at 64 vs 32 new tokens",
                    "rollout tokens/s, shared prompt vs prefill per rollout (G=4, 32 tokens)"]),
    ("compiles.py", ["compilations per jitted loop function over 2 steps (max)", "compilations in all 2 steps"]),
    ("memory_7b.py", ["memory_7b quick 8_CPU_devices full_fp32 need GiB/device"]),
    ("gpu.py", ["rollout tokens/s (xla / xla)", "decode ms/step 128 vs 64 new tokens (target <= 1.3)",
                "GRPO train step completion tokens/s (xla / xla)"]),  # on CPU: xla on both sides
])
def test_quick_run_prints_report_lines(script, expected):
    out = run_quick(script)
    assert out.startswith("machine: ") and re.search(r"\d+ CPUs", out.splitlines()[0]), out[:300]
    lines = {m["name"]: m for m in map(LINE.match, out.splitlines()) if m}
    assert sorted(lines) == sorted(expected), out
    for m in lines.values():
        ours, ref, ratio = float(m["ours"]), float(m["ref"]), float(m["ratio"])
        assert ours >= 0 and ref > 0
        assert ratio == pytest.approx(ours / ref, rel=2e-3, abs=1e-3)
