"""The decode loop updates the KV cache in place: the compiled sampler's while-loop body (nested layer loop
included) moves under 5% of the cache's bytes per step through copies and transposes (issue 12; the cache of
the code before it, [layers, rows, slots, kv_heads, head_dim] returned by the layer scan, moved 426%)."""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx

from emorl_jax.config import TINY
from emorl_jax.models.audio_lm import AudioLM
from emorl_jax.rl.sampler import SamplingParams, make_sampler, rollout_keys

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def _computations(hlo: str) -> dict[str, list[str]]:
    """HLO module text -> {computation name: its instruction lines}."""
    out, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"^(?:ENTRY )?(%?[\w.\-]+) .*\{$", line)
        if header:
            name = header.group(1).lstrip("%")
            out[name] = []
        elif name is not None and line.strip() and line.strip() != "}":
            out[name].append(line.strip())
    return out


def _shape_bytes(shape: str) -> int:
    """Bytes of the array shapes in an HLO result type, e.g. 'f32[2,8,4]{2,1,0}' or a tuple of them."""
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def moved_bytes_per_step(hlo: str) -> tuple[int, list[str]]:
    """Bytes written per decode step by copy/transpose instructions (and fusions whose root is one) in the
    outermost while loop's body and every loop it runs (the layer scan: times its trip count)."""
    comps = _computations(hlo)

    def root_op(comp: str) -> str:
        root = next((line for line in comps[comp] if line.startswith("ROOT")), "")
        m = re.search(r"= \S+ (\w[\w-]*)\(", root)
        return m.group(1) if m else ""

    def visit(comp: str, repeat: int, found: list) -> int:
        moved = 0
        for line in comps.get(comp, []):
            m = re.match(r"(?:ROOT )?%?[\w.\-]+ = (\(.*?\)|\S+) ([\w-]+)\(", line)
            if not m:
                continue
            shape, op = m.groups()
            if op in ("copy", "transpose") or (op == "fusion" and root_op(
                    re.search(r"calls=%?([\w.\-]+)", line).group(1)) in ("copy", "transpose")):
                moved += repeat * _shape_bytes(shape)
                found.append(f"{op} {shape} x{repeat}")
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                moved += visit(body, repeat * (int(trips.group(1)) if trips else 1), found)
            for called in re.findall(r"(?:to_apply|calls|true_computation|false_computation|branch_computations)="
                                     r"\{?%?([\w.\-]+)", line):
                if op in ("call", "conditional"):
                    moved += visit(called, repeat, found)
        return moved

    # The decode loop: the entry's while loop without a known trip count (it stops when every row is done).
    entry = next(n for n in comps if n.startswith("main"))
    outer = next(line for line in comps[entry] if " while(" in line and "known_trip_count" not in line)
    found: list[str] = []
    return visit(re.search(r"body=%?([\w.\-]+)", outer).group(1), 1, found), found


def test_decode_step_moves_under_5_percent_of_the_cache():
    model = AudioLM(TINY, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    # Greedy: sampling's random bits [rows, vocab] are copied inside the PRNG loop, a cost of the vocabulary
    # (1 % of the cache at 7B, more next to this tiny cache), not of the cache.
    # 200 + 3 x 56 slots per prompt: the logits carry [rows, vocab] (0.3 % of the cache at 7B) stays small
    b, g, t, n = 2, 3, 200, 56
    sample = make_sampler(graphdef, group_size=g, eos_ids=(1,), pad_id=0,
                          params=SamplingParams(max_new_tokens=n, temperature=0.0))
    ids = np.full((b, t), 7, np.int32)
    hlo = sample.lower((state,), ids, np.ones_like(ids), None, None,
                       rollout_keys(jax.random.key(0), b, g)).compile().as_text()
    text = TINY.text
    slots = b * t + b * g * n  # the prompt's KV once per prompt, each rollout's own KV once per row
    cache_bytes = 2 * text.num_hidden_layers * slots * text.num_key_value_heads * text.head_dim * 4
    moved, found = moved_bytes_per_step(hlo)
    print(f"copy/transpose bytes per decode step: {moved} = {moved / cache_bytes:.1%} of the cache; {found}")
    assert moved < 0.05 * cache_bytes, found
