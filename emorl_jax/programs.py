"""The compiled programs of a run: each jitted function is lowered and compiled ahead of time once per input
signature (shapes, dtypes, shardings), and every compile is recorded with XLA's memory analysis.

A 7B compile costs minutes, so a run must compile a small, fixed set of programs; `Program` makes that set
visible (`compiles`) and gives `memory.json` its per-step figures without compiling anything twice.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax


def _signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x))),
                           getattr(x, "sharding", None)) for x in leaves)


@dataclasses.dataclass
class Program:
    """A jitted function called through its AOT-compiled executables (one per input signature).

    `compiles` counts the signatures compiled so far; `memory` holds each one's
    {"argument", "output", "alias", "temp"} bytes per device from `compiled.memory_analysis()`.
    """

    name: str
    jitted: Callable
    compiled: dict = dataclasses.field(default_factory=dict)
    memory: list = dataclasses.field(default_factory=list)
    compile_seconds: list = dataclasses.field(default_factory=list)

    def __call__(self, *args):
        key = _signature(args)
        if key not in self.compiled:
            self.compiled[key] = self.compile(*args)
        return self.compiled[key](*args)

    def compile(self, *args):
        """Lowers and compiles for `args` (arrays or ShapeDtypeStructs with shardings) and records the memory."""
        start = time.perf_counter()
        compiled = self.jitted.lower(*args).compile()
        self.compile_seconds.append(time.perf_counter() - start)
        self.memory.append(memory_of(compiled))
        return compiled

    @property
    def compiles(self) -> int:
        return len(self.compile_seconds)


def memory_of(compiled) -> dict[str, int]:
    """Per-device bytes of a compiled program: arguments, outputs, donated (aliased) bytes and temporaries."""
    m = compiled.memory_analysis()
    if m is None:  # a backend without memory analysis
        return {}
    return {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
            "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}


def step_memory(programs: dict[str, Program]) -> dict[str, dict[str, int]]:
    """{name: the largest figures over that program's compiles} for the programs compiled so far."""
    out = {}
    for name, program in programs.items():
        if program.memory:
            out[name] = {k: max(m.get(k, 0) for m in program.memory) for k in program.memory[0]}
    return out
