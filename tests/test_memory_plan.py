"""The 7B memory plan (benchmarks/memory_7b.py) compiles the trainer's own programs: the same
`build_grpo_programs` that `emorl_jax.train` calls, on the trainer's abstract train state."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import pytest

from emorl_jax.programs import Program
from emorl_jax.rl import stages

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_7b.py"


@pytest.fixture(scope="module")
def memory_7b():
    spec = importlib.util.spec_from_file_location("memory_7b", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_7b"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("memory_7b", None)


def test_trainer_and_plan_share_the_builder():
    import emorl_jax.train as train

    assert train.build_grpo_programs is stages.build_grpo_programs


def test_quick_plan_compiles_the_programs_build_grpo_programs_returns(memory_7b, monkeypatch):
    built = []

    def spy(*args, **kwargs):
        programs = original(*args, **kwargs)
        built.append(programs)
        return programs

    original = stages.build_grpo_programs
    monkeypatch.setattr(stages, "build_grpo_programs", spy)
    out = memory_7b.main(["--quick"])

    assert len(built) == 2  # one build per depth (1 and 2 layers), as the trainer builds one per run
    for programs in built:
        for phase in memory_7b.PHASES:
            program = getattr(programs, phase)
            assert isinstance(program, Program)
            assert program.compiles == 1 and program.memory and program.memory[0]["temp"] > 0
    compiled = {id(entry["program"]) for entry in out["cache"].values()}
    assert compiled == {id(getattr(p, phase)) for p in built for phase in memory_7b.PHASES}
    assert all(r["mode"] == "memory" and not r["reused"] for r in out["results"])

    # the plan: resident state of the 32-layer model per device (8 devices), and a need above it
    plan, f = out["plan"], out["figures"]
    assert plan["chips"] == len(jax.devices())
    assert plan["resident"]["optimizer"] == pytest.approx(2 * plan["resident"]["params"], rel=1e-3)
    assert plan["resident"]["reference"] > 0 and plan["resident"]["optimizer_host"] == 0
    assert f["peak"] > f["state"] > 0
    assert set(f["need"]) == set(memory_7b.PHASES)


def test_flop_counting_unrolls_the_loops(memory_7b):
    """Under `counted_loops`, jax.lax.scan/map run as Python loops (every iteration traced), the sampler's
    while_loop runs zero times with prefill_only, and everything is restored afterwards."""
    import jax.numpy as jnp

    saved = jax.lax.scan, jax.lax.map, jax.lax.while_loop
    xs = jnp.arange(4.0)
    with memory_7b.counted_loops(True, prefill_only=True):
        assert jax.lax.scan is not saved[0]
        carry, ys = jax.lax.scan(lambda c, x: (c + x, 2 * x), 0.0, xs)
        assert float(carry) == 6.0 and ys.tolist() == [0.0, 2.0, 4.0, 6.0]
        assert jax.lax.map(lambda x: x + 1, xs).tolist() == [1.0, 2.0, 3.0, 4.0]
        assert int(jax.lax.while_loop(lambda c: c < 10, lambda c: c + 1, 0)) == 0
        text = jax.jit(lambda x: jax.lax.scan(lambda c, v: (c * v, None), 1.0, x)[0]).lower(xs).as_text()
        assert "while" not in text
    assert (jax.lax.scan, jax.lax.map, jax.lax.while_loop) == saved
