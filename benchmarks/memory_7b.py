"""Qwen2-Audio-7B GRPO memory and FLOP plan, compiled ahead of time from the trainer's own programs.

The programs are those `emorl_jax.train` runs: `rl.stages.build_grpo_programs` (sampler, log-prob pass, update)
on the abstract train state the trainer restores into (`rl.steps.abstract_train_state`, its optimizer and
`train_state_shardings`) and the reference copy it makes (`rl.steps.compute_dtype_copy`), for the run config
configs/qwen2_audio_7b_iemocap.py (16 prompts x G=6 in 2 micro-batches, 1024-token prompts, 30 s clips, 256
new tokens, bf16 compute, remat, fp32 params), traced inside `jax.set_mesh(mesh)` with the FSDP mesh (1, -1, 1).
Nothing is allocated: every input is a `jax.ShapeDtypeStruct` with its sharding.

Targets: a TPU slice through `jax.experimental.topologies` (the TPU compiler, no TPU needed; each slice in a
subprocess that has `--libtpu DIR` on its path, DIR from `pip install --no-deps --target DIR libtpu-*.whl`), or
`--quick`: a narrow 7B-shaped model on this process's CPU devices (seconds; the smoke test).

Memory. The layers are scanned, so a full-depth compile costs no more than a shallow one (measured on 2 busy
cores: 13-136 s per program at 32 layers vs 20-382 s at 1-2), and the plan compiles the 32-layer programs
(`--depths 32`, the default). `--depths 1 2` extrapolates each memory_analysis figure linearly instead,
f(32) = f(1) + 31 (f(2) - f(1)), and prints the line next to any full-depth compile: at L = 1 XLA plans the
update differently (its temporaries shrink from L = 1 to 2), so the line misses badly there. A slice that did not
compile a phase takes it from a slice with as many chips, else scales another slice's per-chip bytes by the
chips ratio (listed as "estimated"). A program the TPU compiler rejects for HBM is counted with the
temporaries its message states. Per-chip GiB needed = the resident state (trained params, optimizer state
unless offloaded to host, the reference copy, frozen params) + the worst phase's batch arguments + outputs -
aliased + temporaries.

FLOPs. XLA's cost_analysis counts a loop body once whatever its trip count (the scanned update has the same
FLOPs at L = 1 and L = 2), so FLOPs come from separate lowerings ("cpu8": 8 fake CPU devices, nothing compiled:
`Lowered.cost_analysis()` of the whole program) with every `lax.scan`/`lax.map` unrolled (`counted_loops`:
the layer scans and the micro-batch loops), at L = 1 and 2, extrapolated to 32; the sampler's decode
`while_loop` stays (its body counted once) and is also lowered with zero iterations (the prefill alone), so a
step's sampler FLOPs = M calls x (prefill + N x (counted - prefill)), N = max_new_tokens (no early EOS).
Per chip = global / chips (FSDP splits the batch evenly). Roofline: max(FLOPs / peak bf16, HBM bytes /
bandwidth) per phase (the sampler per prefill and per decode step), with a lower bound on HBM bytes: every
pass streams the weights it uses through each chip, decode steps also read the KV cache (`hbm_bytes`).

    python benchmarks/memory_7b.py --libtpu .whl/libtpu_pkg --json plan.jsonl [--slices v5e-8 ...] [--variants ...]
    python benchmarks/memory_7b.py --from-json plan.jsonl      # the tables again, nothing compiled
    python benchmarks/memory_7b.py --quick                      # narrow model, 8 CPU devices, ~30 s
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "qwen2_audio_7b_iemocap.py"


@dataclasses.dataclass(frozen=True)
class Slice:
    topology: str
    chip_config: str | None
    chips: int
    hbm_gib: float
    tflops: float        # peak bf16 TFLOP/s per chip
    hbm_tbs: float       # HBM bandwidth TB/s per chip
    rl: tuple = ()       # rl overrides: micro-batches must split over the chips


SLICES = {
    "v5p-8": Slice("v5p:2x2x1", None, 4, 95, 459, 2.76),
    "v4-8": Slice("v4:2x2x1", "megacore", 4, 32, 275, 1.2),
    "v5e-8": Slice("v5e:2x4", None, 8, 16, 197, 0.82),
    # multi-host (4 hosts x 4 chips); one pass over all 16 prompts so each of the 16 chips holds one prompt
    "v4-32": Slice("v4:2x2x4", "megacore", 16, 32, 275, 1.2, rl=(("micro_batches", 1),)),
    # v4-8 with 4 micro-batches of 4 prompts (one per chip): half the update's activations of the default 2
    "v4-8-m4": Slice("v4:2x2x1", "megacore", 4, 32, 275, 1.2, rl=(("micro_batches", 4),)),
}
VARIANTS = {  # name: (param dtype, Adam mu dtype, optimizer offloaded to host, LoRA rank)
    "full_fp32": ("float32", None, False, 0),
    "full_mu_bf16": ("float32", "bfloat16", False, 0),
    "full_offload": ("float32", None, True, 0),
    "full_mu_bf16_offload": ("float32", "bfloat16", True, 0),
    "full_bf16": ("bfloat16", None, False, 0),
    "lora16": ("float32", None, False, 16),
    "lora16_bf16": ("bfloat16", None, False, 16),  # the frozen base (and adapters) stored in bf16
}
PHASES = ("sample", "logps", "update")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", nargs="*", default=list(SLICES), choices=list(SLICES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES,
                   help="programs to compile (a phase not compiled on a slice is estimated from another slice)")
    p.add_argument("--depths", type=int, nargs="+", default=(32,),
                   help="layer counts to compile on the TPU slices: 32 (full depth), or two to extrapolate from")
    p.add_argument("--attention", default="xla", choices=("xla", "splash"),
                   help="model.attention of the compiled programs (splash: the Pallas TPU kernel; TPU slices only)")
    p.add_argument("--libtpu", type=Path, help="directory holding the libtpu package (pip install --target)")
    p.add_argument("--json", type=Path, help="append every compile's RESULT as a JSON line here")
    p.add_argument("--from-json", type=Path, nargs="+", help="print the tables from --json files, compile nothing")
    p.add_argument("--quick", action="store_true", help="narrow 7B-shaped model on the CPU devices, in-process")
    p.add_argument("--no-flops", action="store_true", help="no FLOP-counting compiles (the cpu8 worker)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # a slice name or "cpu8"
    p.add_argument("--resume", type=Path, help=argparse.SUPPRESS)  # a slice name: compile in this process
    p.add_argument("--worker-depths", type=int, nargs="+", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- one compile


def run_config(quick: bool):
    """The 7B run config; `quick`: a narrow model with the 7B's structure, short prompts, 2 s clips, 4 new tokens."""
    from emorl_jax.config import load_run_config

    config = load_run_config(CONFIG)
    if quick:
        config.model.text.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                 num_key_value_heads=2)
        config.model.audio.update(d_model=32, encoder_attention_heads=2, encoder_ffn_dim=64,
                                  max_source_positions=100)
        config.data.length_buckets = (64,)
        config.rl.max_new_tokens = 4
    return config


def _unrolled_scan(f, init, xs=None, length=None, reverse=False, unroll=1, _split_transpose=False):
    """`jax.lax.scan` as a Python loop: cost_analysis then counts every iteration."""
    import jax
    import jax.numpy as jnp

    n = length if xs is None or not jax.tree.leaves(xs) else jax.tree.leaves(xs)[0].shape[0]
    carry, ys = init, []
    for i in (reversed(range(n)) if reverse else range(n)):
        carry, y = f(carry, jax.tree.map(lambda a, i=i: a[i], xs))
        ys.append(y)
    ys = ys[::-1] if reverse else ys
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def _no_iterations(cond, body, init):
    """A while loop that runs zero times, its outputs still depending on `init` (else the computation that made
    `init`, the sampler's prefill, would be dead code)."""
    import jax
    import jax.numpy as jnp

    init = jax.tree.map(jnp.asarray, init)
    leaves = [x for x in jax.tree.leaves(init) if jnp.issubdtype(x.dtype, jnp.floating)]
    zero = sum((jnp.sum(x.astype(jnp.float32)) for x in leaves), jnp.zeros((), jnp.float32)) * 0.0
    return jax.tree.map(lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.number) else x, init)


@contextlib.contextmanager
def counted_loops(on: bool, prefill_only: bool = False):
    """FLOP counting (XLA's cost_analysis counts a loop body once): with `on`, every `jax.lax.scan`/`map` the
    programs trace (the layer scans, the micro-batch loops) runs unrolled; with `prefill_only`, the sampler's
    decode `while_loop` runs zero times, so the sampler's count is its prefill alone."""
    import jax

    saved = jax.lax.scan, jax.lax.map, jax.lax.while_loop
    if on:
        jax.lax.scan = _unrolled_scan
        jax.lax.map = lambda f, xs, **_: _unrolled_scan(lambda c, x: (c, f(x)), None, xs)[1]
    if prefill_only:
        jax.lax.while_loop = _no_iterations
    try:
        yield
    finally:
        jax.lax.scan, jax.lax.map, jax.lax.while_loop = saved


def plan_programs(config, variant: str, mesh, layers: int | None):
    """(programs, {phase: abstract args}, resident state bytes) for `variant` at `layers` decoder and encoder
    layers (None: the config's), exactly as the trainer builds them (train.Trainer.grpo)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from emorl_jax.config import from_config_dict
    from emorl_jax.models.audio_lm import AudioLM
    from emorl_jax.models.lora import add_lora, split_trainable, zero_lora
    from emorl_jax.rl import stages
    from emorl_jax.rl.steps import (abstract_train_state, cast_to_compute_dtype, compute_dtype_copy, make_optimizer,
                                    train_state_shardings)
    from emorl_jax.sharding import batch_sharding, param_shardings, per_device_bytes

    param_dtype, mu_dtype, offload, rank = VARIANTS[variant]
    cfg = from_config_dict(config.model).replace(param_dtype=param_dtype)
    if layers is not None:
        cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=layers),
                          audio=dataclasses.replace(cfg.audio, encoder_layers=layers))

    def build():
        model = AudioLM(cfg, rngs=nnx.Rngs(0))
        if rank:
            model = add_lora(model, rank=rank, alpha=2.0 * rank, targets=tuple(config.lora.targets),
                             rngs=nnx.Rngs(1))
        return model

    graphdef, params, frozen = split_trainable(nnx.eval_shape(build), lora=rank > 0)
    place = lambda tree: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                                      param_shardings(tree, mesh))
    params, frozen = place(params), place(frozen)
    rl, o = config.rl, config.optim
    tx = make_optimizer(learning_rate=rl.learning_rate, total_steps=rl.steps, warmup_fraction=o.warmup_fraction,
                        weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, grad_clip=o.grad_clip, mu_dtype=mu_dtype)
    state = abstract_train_state(tx, params, mesh, offload=offload)
    shardings = train_state_shardings(tx, params, mesh, offload=offload)
    reference = place(jax.eval_shape(zero_lora, params) if rank else
                      jax.eval_shape(lambda p: compute_dtype_copy(graphdef, p, frozen), params))
    rollout = place(jax.eval_shape(lambda p: cast_to_compute_dtype(graphdef, p, frozen), params))
    programs = stages.build_grpo_programs(rl, graphdef, tx, mesh, shardings, eos_ids=(1,), pad_id=0, seed=0)

    a, b, g, m, n = cfg.audio, rl.batch_size, rl.group_size, rl.micro_batches, rl.max_new_tokens
    t = max(config.data.length_buckets)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
    prompts = lambda rows: (sds((rows, t), jnp.int32), sds((rows, t), jnp.int32),
                            sds((rows, a.num_mel_bins, a.num_frames), jnp.float32),
                            sds((rows, a.num_frames), jnp.int32))
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b * g // m))
    batch = dict(zip(stages.LOGP_KEYS, (*prompts(b), sds((b * g, n), jnp.int32), sds((b * g, n), jnp.int32))))
    train_batch = {**batch, "advantages": sds((b * g,), jnp.float32), "weights": sds((b * g,), jnp.float32),
                   "ref_logps": sds((b * g, n), jnp.float32)}
    args = {"sample": ((rollout, frozen), *prompts(b // m), sds(keys.shape, keys.dtype)),  # the step's bf16 copy
            "logps": (reference, frozen, batch),
            "update": (state, frozen, train_batch)}
    opt_device = 0 if offload else per_device_bytes(state.opt_state)
    resident = {"params": per_device_bytes(state.params), "optimizer": opt_device,
                "optimizer_host": per_device_bytes(state.opt_state) - opt_device,
                # full: the bf16 copy; LoRA: zeroed adapters (the reference is them + the frozen base)
                "reference": per_device_bytes(reference), "frozen": per_device_bytes(frozen)}
    # bytes of each phase's arguments that are resident state (the rest is the batch; the sampler's weights, a copy
    # made for the step's rollouts beside the resident state, count as its batch)
    state_args = {"sample": resident["frozen"],
                  "logps": resident["reference"] + resident["frozen"],
                  "update": resident["params"] + opt_device + resident["frozen"]}
    return programs, args, resident, state_args


def signature(args) -> str:
    import jax

    leaves, treedef = jax.tree.flatten(args)
    return str(treedef) + repr([(x.shape, str(x.dtype), x.sharding) for x in leaves])


def analyse(compiled) -> dict:
    from emorl_jax.programs import memory_of

    out = memory_of(compiled)
    m = compiled.memory_analysis()
    for k in ("argument", "output", "alias", "temp"):
        out["host_" + k] = int(getattr(m, f"host_{k}_size_in_bytes", 0) or 0)
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    out["flops"] = float(cost.get("flops", 0.0))
    out["bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    return out


def compile_variant(config, variant: str, mesh, layers: int | None, cache: dict, *, mode: str = "memory",
                    label: str = "", done: dict | None = None, phases=PHASES) -> list[dict]:
    """Compiles the sample, logps and update programs of `variant` (a program whose abstract inputs were
    compiled already, e.g. the sampler of two variants that differ only in the optimizer, is reused).
    mode "memory": the programs as the trainer runs them; "flops": loops unrolled (`counted_loops`), plus the
    sampler's prefill alone as phase "prefill"."""
    import jax

    programs, args, resident, state_args = plan_programs(config, variant, mesh, layers)
    out = []
    for phase in tuple(phases) + (("prefill",) if mode == "flops" else ()):
        program = getattr(programs, "sample" if phase == "prefill" else phase)
        key = (phase, mode, signature(args["sample" if phase == "prefill" else phase]))
        if key not in cache and (variant, phase, layers, mode) in (done or {}):
            cache[key] = {**done[(variant, phase, layers, mode)], "program": None, "resumed": True}
            for k in ("slice", "variant", "phase", "layers", "mode", "chips", "resident", "state_args", "reused"):
                cache[key].pop(k, None)
        if key not in cache:
            start = time.perf_counter()
            jax.clear_caches()  # jit caches traces by function and arguments: a patched loop needs a fresh trace
            try:
                with jax.set_mesh(mesh), counted_loops(mode == "flops", prefill_only=phase == "prefill"):
                    if mode == "flops":  # the whole program's FLOPs, from the lowered HLO (nothing compiled)
                        cost = program.jitted.lower(*args["sample" if phase == "prefill" else phase]).cost_analysis()
                        cache[key] = {"flops": float(cost["flops"]), "bytes_accessed": float(cost["bytes accessed"])}
                    else:
                        cache[key] = analyse(program.compile(*args[phase]))
                cache[key]["compile_s"] = round(time.perf_counter() - start, 1)
            except jax.errors.JaxRuntimeError as e:
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                cache[key] = {"oom": str(e)[:2000], "compile_s": round(time.perf_counter() - start, 1)}
            cache[key]["program"] = program
        r = {k: v for k, v in cache[key].items() if k != "program"}
        out.append({"slice": label, "variant": variant, "phase": phase, "layers": layers, "mode": mode,
                    "chips": mesh.devices.size, **r, "resident": resident,
                    "state_args": state_args["sample" if phase == "prefill" else phase],
                    "reused": cache[key]["program"] is not program})
    return out


# ----------------------------------------------------------------------------------------------- worker


def slice_mesh(name: str):
    from jax.experimental import topologies

    from emorl_jax.sharding import make_mesh

    s = SLICES[name]
    kw = {"chip_config_name": s.chip_config} if s.chip_config else {}
    devices = topologies.get_topology_desc(topology_name=s.topology, platform="tpu", **kw).devices
    if len(devices) != s.chips:
        raise RuntimeError(f"topology {s.topology} gave {len(devices)} devices, expected {s.chips}")
    return make_mesh((1, -1, 1), devices=devices)


def worker(args) -> None:
    """Compiles the programs of one target and prints one RESULT line per program. A TPU slice: every variant at
    both depths, as the trainer runs them (memory mode), plus `--check-depth` at full depth. "cpu8" (8 fake CPU
    devices): the FLOP-counting programs of the two FLOP classes (full fine-tuning, LoRA) at both depths.
    Results already in `--resume` (a --json file) are read back, not compiled again."""
    from emorl_jax.sharding import make_mesh

    config = run_config(quick=False)
    config.model.attention = args.attention
    if args.worker == "cpu8":
        mesh = make_mesh((1, -1, 1))
        jobs = [(v, d, "flops") for v in ("full_fp32", "lora16") for d in (1, 2)]  # FLOPs are linear in depth
    else:
        config.rl.update(dict(SLICES[args.worker].rl))
        mesh = slice_mesh(args.worker)
        jobs = [(v, d, "memory") for v in args.variants for d in args.worker_depths]
    print(f"worker {args.worker}: {mesh.devices.size} x {mesh.devices.flat[0].device_kind}, mesh "
          f"{dict(mesh.shape)}, processes {len({d.process_index for d in mesh.devices.flat})}", flush=True)
    done = {}
    if args.resume and args.resume.exists():
        for r in map(json.loads, args.resume.read_text().splitlines()):
            if r["slice"] == args.worker and not r["reused"]:
                done[(r["variant"], r["phase"], r["layers"], r["mode"])] = r
    cache: dict = {}
    full = {v: plan_programs(config, v, mesh, None)[2] for v in {v for v, _, m in jobs if m == "memory"}}
    for variant, layers, mode in jobs:
        for r in compile_variant(config, variant, mesh, layers, cache, mode=mode, label=args.worker, done=done,
                                 phases=PHASES if mode == "flops" else args.phases):
            print("RESULT " + json.dumps({**r, "resident_full": full.get(variant), "attention": args.attention}),
                  flush=True)


def run_worker(args, name: str) -> list[dict]:
    tpu = name != "cpu8"
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([str(args.libtpu.resolve())] if args.libtpu and tpu else [])
        + [os.environ.get("PYTHONPATH", "")]))
    env["XLA_FLAGS"] = "" if tpu else "--xla_force_host_platform_device_count=8"
    cmd = [sys.executable, __file__, "--worker", name, "--worker-depths", *map(str, args.depths),
           "--variants", *args.variants, "--phases", *args.phases, "--attention", args.attention] + \
        (["--resume", str(args.json)] if args.json else [])
    results = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            if line.startswith("RESULT "):
                results.append(r := json.loads(line[7:]))
                print(f"  {name} {r['variant']} {r['phase']} L={r['layers']} {r['mode']}: "
                      f"{'reused' if r['reused'] else str(r['compile_s']) + ' s'}", flush=True)
                if args.json and not r.get("resumed"):
                    with args.json.open("a") as f:
                        f.write(line[7:])
            else:
                print("  " + line.rstrip(), flush=True)
    if proc.returncode:
        print(f"worker {name} exited with {proc.returncode}", file=sys.stderr)
    return results


# ----------------------------------------------------------------------------------------------- the plan


def step_flops(results: list[dict], depth: int, rl: dict) -> dict:
    """{FLOP class: {phase: global FLOPs per GRPO step}} at `depth` layers from the FLOP-mode lowerings (every
    loop unrolled but the sampler's decode loop, whose body is the sampler's count minus its prefill's):
    sampler = M calls x (prefill + N decode steps), log-prob pass and update once; the sampler's prefills and
    decode steps also apart (a slice that samples in fewer, larger calls does the same work)."""
    by = {(r["variant"], r["phase"], r["layers"]): r["flops"] for r in results if r["mode"] == "flops"}
    out = {}
    for cls in ("full_fp32", "lora16"):
        depths = sorted({k[2] for k in by if k[0] == cls})
        if len(depths) != 2 or any((cls, p, d) not in by for p in (*PHASES, "prefill") for d in depths):
            continue
        lo, hi = depths
        f = {p: by[cls, p, lo] + (depth - lo) * (by[cls, p, hi] - by[cls, p, lo]) / (hi - lo)
             for p in (*PHASES, "prefill")}
        m, n = rl["micro_batches"], rl["max_new_tokens"]
        out[cls] = {"sample": m * (f["prefill"] + n * (f["sample"] - f["prefill"])), "logps": f["logps"],
                    "update": f["update"], "prefills": m * f["prefill"], "decode": m * n * (f["sample"] - f["prefill"])}
    return out


MEMORY_KEYS = ("argument", "output", "alias", "temp", "host_temp", "state_args")


def extrapolate(results: list[dict], depth: int) -> dict:
    """{(slice, variant): plan} at `depth` layers from the memory-mode compiles: per phase, the line through
    the slice's two depths. Where a slice has one depth, the per-layer slope comes from another slice that has
    both (same variant, else full_fp32), scaled by its chips / this slice's chips (per-layer temporaries are
    per-chip shares of global activations and grads); a phase with no compile at all on a slice is taken from
    a slice with as many chips, else scaled the same way. Estimated phases are listed in plan["estimated"]."""
    rs = {}
    for r in results:
        if r["mode"] == "memory" and "oom" in r and oom_temps(r["oom"]):
            # rejected for HBM: its temporaries from the compiler's message, arguments = the state it reads
            r = {**r, "temp": oom_temps(r["oom"]), "argument": r["state_args"], "output": 0, "alias": 0,
                 "host_temp": 0}
        if r["mode"] == "memory" and ("oom" not in r or "temp" in r):
            rs[(r["slice"], r["variant"], r["phase"], r["layers"])] = r
    depths = sorted({k[3] for k in rs if k[3] is not None and k[3] != depth})
    chips = {k[0]: r["chips"] for k, r in rs.items()}
    if not depths:
        depths = [depth]
    lo, hi = depths[0], depths[-1]

    def exact(name, variant, phase):  # a full-depth compile, else the line through two depths
        full = rs.get((name, variant, phase, depth))
        if full:
            return {k: full[k] for k in MEMORY_KEYS}, rs.get((name, variant, phase, lo), full)
        a, b = rs.get((name, variant, phase, lo)), rs.get((name, variant, phase, hi))
        if a and b and lo != hi:
            return {k: a[k] + (depth - lo) * (b[k] - a[k]) / (hi - lo) for k in MEMORY_KEYS}, a

    def donors(name, variant, phase):  # (slice, variant) with the phase compiled: this slice first
        same_program = [v for v in VARIANTS if phase != "update" and VARIANTS[v][::3] == VARIANTS[variant][::3]]
        pairs = [(n, v) for n in chips for v in dict.fromkeys([variant, *same_program, "full_fp32"])
                 if (n, v) != (name, variant) and exact(n, v, phase)]
        yield from sorted(pairs, key=lambda p: (p[0] != name, chips[p[0]] != chips[name], p[1] != variant, p))

    plans = {}
    for name, variant in sorted({(k[0], k[1]) for k in rs}):
        phases, estimated = {}, []
        for phase in PHASES:
            got = exact(name, variant, phase)
            if got:
                phases[phase] = got[0]
                continue
            own = rs.get((name, variant, phase, lo))
            same = [v for v in VARIANTS if v != variant and own and exact(name, v, phase) and
                    all(own[k] == exact(name, v, phase)[1][k] for k in MEMORY_KEYS)]
            if same:  # the same program (same abstract inputs) as another variant's on this slice
                phases[phase] = exact(name, same[0], phase)[0]
                continue
            for donor, v in donors(name, variant, phase):
                line, base = exact(donor, v, phase)
                scale = chips[donor] / chips[name]
                if own:  # own depth-lo figures + the donor's slope per layer, scaled
                    phases[phase] = {k: own[k] + (line[k] - base[k]) * scale for k in MEMORY_KEYS}
                    estimated.append(f"{phase}: slope from {donor}" + (f" {v}" if v != variant else ""))
                elif v == variant or (phase != "update" and VARIANTS[v][::3] == VARIANTS[variant][::3]):
                    # the sampler and log-prob pass read only params: a variant that differs in the optimizer alone
                    # runs the same programs
                    phases[phase] = {k: line[k] * scale for k in MEMORY_KEYS}
                    if donor != name:  # else: this slice's compile of the same program
                        estimated.append(f"{phase}: from {donor}" + (f" {v}" if v != variant else "") +
                                         (f" x {scale:g}" if scale != 1 else ""))
                else:
                    continue
                break
        any_run = next((r for k, r in rs.items() if k[:2] == (name, variant)), None)
        if not phases or any_run is None:
            continue
        # resident state: exact per layer (abstract shapes), from whichever depths this slice has
        runs = sorted((r for k, r in rs.items() if k[:2] == (name, variant) and k[3] is not None),
                      key=lambda r: r["layers"])
        a, b = runs[0], runs[-1]
        if b["layers"] == depth:
            resident = dict(b["resident"])
        elif a["layers"] != b["layers"]:
            resident = {k: a["resident"][k] + (depth - a["layers"]) * (b["resident"][k] - a["resident"][k]) /
                        (b["layers"] - a["layers"]) for k in a["resident"]}
        elif "resident_full" in a:  # one depth: the worker's full-depth abstract state
            resident = dict(a["resident_full"])
        else:
            continue
        plan = {"slice": name, "variant": variant, "chips": chips[name], "phases": phases, "resident": resident,
                "estimated": estimated, "rejected": [k[2] for k, r in rs.items() if k[:2] == (name, variant)
                                                     and k[3] == depth and "oom" in r],
                "compile_s": sum(r["compile_s"] for k, r in rs.items() if k[:2] == (name, variant)
                                 and not r["reused"] and k[3] == (depth if runs[-1]["layers"] == depth else k[3]))}
        for phase in PHASES:
            a, b, full = (rs.get((name, variant, phase, d)) for d in (lo, hi, depth))
            if a and b and full and lo != hi:
                plan.setdefault("check", {})[phase] = {
                    "compiled": {k: full[k] for k in MEMORY_KEYS}, "compile_s": full["compile_s"],
                    "line": {k: a[k] + (depth - lo) * (b[k] - a[k]) / (hi - lo) for k in MEMORY_KEYS}}
        plans[(name, variant)] = plan
    return plans


def weight_counts(config) -> dict:
    """Parameter counts of the full model: the audio tower (+ projector), decoder layers, embedding, lm_head."""
    import jax
    import numpy as np
    from flax import nnx

    from emorl_jax.config import from_config_dict
    from emorl_jax.models.audio_lm import AudioLM

    state = nnx.state(nnx.eval_shape(lambda: AudioLM(from_config_dict(config.model), rngs=nnx.Rngs(0))), nnx.Param)
    out = {"audio": 0, "decoder": 0, "embed": 0, "lm_head": 0}
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        part = ("embed" if "embed_tokens" in name else "lm_head" if name.startswith("lm_head") else
                "decoder" if name.startswith("language_model") else "audio")
        out[part] += int(np.prod(x.shape))
    return out


def hbm_bytes(config, rl: dict, variant: str, chips: int, w: dict) -> dict:
    """Per-chip HBM bytes per GRPO step, a lower bound: every pass streams all the weights it uses through each
    chip (FSDP gathers them), each decode step also reads the KV cache of the chip's rows, the optimizer reads
    and writes its shard of params, grads and moments. Activations are left out."""
    param_dtype, mu_dtype, _, rank = VARIANTS[variant]
    sp, smu = (4 if param_dtype == "float32" else 2), (2 if mu_dtype else 4 if param_dtype == "float32" else 2)
    text = config.model.text
    m, n, g, t = rl["micro_batches"], rl["max_new_tokens"], rl["group_size"], max(config.data.length_buckets)
    # the sampler reads the step's copy in the compute dtype (bf16; LoRA: the base as stored)
    rollout = 4 if rank and param_dtype == "float32" else 2
    weights = w["audio"] + w["decoder"] + w["lm_head"]
    run, dec = weights * rollout, (w["decoder"] + w["lm_head"]) * rollout
    prompts = rl["batch_size"] // m / chips
    slots = prompts * t + prompts * g * n  # the prompt's KV once per prompt, each rollout's own slots per row
    kv = text.num_hidden_layers * 2 * slots * text.num_key_value_heads * (text.hidden_size //
                                                                          text.num_attention_heads) * 2
    ref = weights * (4 if rank else 2)  # LoRA: the fp32 frozen base
    trained = 0 if rank else sum(w.values()) / chips  # LoRA adapters: negligible
    return {"prefill": run, "decode_step": dec + kv, "logps": m * ref,
            "update": m * 3 * weights * sp + trained * (2 * sp + 2 * 4 + 2 * smu + 2 * 4)}


def step_figures(plan: dict, s: Slice, flops: dict | None, hbm: dict, rl: dict) -> dict:
    """Per-chip GiB need per phase; per-chip FLOPs per GRPO step (the global count / chips) and the roofline time
    max(FLOPs / peak bf16, HBM bytes / bandwidth), the sampler as M x (prefill + N decode steps)."""
    res, ph = plan["resident"], plan["phases"]
    state = res["params"] + res["optimizer"] + res["reference"] + res["frozen"]
    need = {k: state + (p["argument"] - p["state_args"]) + p["output"] - p["alias"] + p["temp"]
            for k, p in ph.items()}
    out = {"state": state, "need": need, "peak": max(need.values()), "worst": max(need, key=need.get),
           "temps": max(p["temp"] for p in ph.values())}
    if flops:
        per_chip = {k: v / s.chips for k, v in flops.items()}
        roof = lambda f, b: max(f / (s.tflops * 1e12), b / (s.hbm_tbs * 1e12))
        m, n = rl["micro_batches"], rl["max_new_tokens"]
        out["flops"] = per_chip
        out["roofline_s"] = {  # the step's prefills and decode steps, spread over its m sampler calls
            "sample": m * (roof(per_chip["prefills"] / m, hbm["prefill"]) + n * roof(per_chip["decode"] / (m * n),
                                                                                    hbm["decode_step"])),
            "logps": roof(per_chip["logps"], hbm["logps"]), "update": roof(per_chip["update"], hbm["update"])}
    return out


def lo_hi(results: list[dict], name: str) -> str:
    depths = sorted({r["layers"] for r in results if r["slice"] == name and r["layers"]})
    return f"{depths[0]} and {depths[1]}"


def oom_temps(message: str) -> float | None:
    """Bytes of HLO temporaries in the TPU compiler's out-of-HBM message."""
    import re

    found = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
    return float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024 if found else None


def oom_summary(message: str) -> str:
    import re

    found = re.search(r"(Used [\d.]+[KMGT]? of [\d.]+[KMGT]? hbm[^.\n]*)", message)
    return found.group(1) if found else message.splitlines()[0][:300]


def print_plan(results: list[dict]) -> dict:
    config = run_config(quick=False)
    depth = config.model.text.num_hidden_layers
    rl = {name: {**config.rl.to_dict(), **dict(s.rl)} for name, s in SLICES.items()}
    plans = extrapolate(results, depth)
    flops = step_flops(results, depth, config.rl.to_dict())  # counted with the config's micro-batches
    w = weight_counts(config)
    g = lambda b: f"{b / GiB:.1f}"
    print(f"\nParameters: {w}. Global FLOPs per GRPO step (TFLOP): " + "; ".join(
        f"{cls}: " + ", ".join(f"{k} {v / 1e12:.1f}" for k, v in f.items()) for cls, f in flops.items()))
    print(f"\nPer chip, GiB at {depth} + {depth} layers (compiled at that depth, else as listed below), FLOPs and "
          "roofline per GRPO step:\n")
    print("| slice (chips x HBM GiB) | variant | params | optimizer | reference | frozen | temps (worst phase) | "
          "need (phase) | fits? | TFLOP per chip: sample / logps / update | roofline s: sample / logps / "
          "update (total) | compile s (its new programs) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    out = {}
    for (name, variant), plan in sorted(plans.items(), key=lambda kv: (list(SLICES).index(kv[0][0]),
                                                                       list(VARIANTS).index(kv[0][1]))):
        s = SLICES[name]
        cls = "lora16" if VARIANTS[variant][3] else "full_fp32"
        f = out[(name, variant)] = step_figures(plan, s, flops.get(cls), hbm_bytes(config, rl[name], variant,
                                                                                     s.chips, w), rl[name])
        margin = s.hbm_gib - f["peak"] / GiB
        verdict = f"fits, {margin:.1f} free" if margin >= 0 else f"misses by {-margin:.1f}"
        if plan["rejected"]:
            verdict += f" ({', '.join(plan['rejected'])} rejected by the compiler)"
        res = plan["resident"]
        opt = g(res["optimizer"]) + (f" (+{g(res['optimizer_host'])} host)" if res["optimizer_host"] else "")
        tflop = " / ".join(f"{f['flops'][k] / 1e12:.0f}" for k in PHASES) if "flops" in f else "-"
        roof = (" / ".join(f"{f['roofline_s'][k]:.1f}" for k in PHASES) +
                f" ({sum(f['roofline_s'].values()):.1f})") if "flops" in f else "-"
        print(f"| {name} ({s.chips} x {s.hbm_gib:g}) | {variant} | {g(res['params'])} | {opt} | "
              f"{g(res['reference'])} | {g(res['frozen'])} | {g(f['temps'])} | {g(f['peak'])} ({f['worst']}) | "
              f"{verdict} | {tflop} | {roof} | {plan['compile_s']:.0f} |")
    for (name, variant), plan in plans.items():
        if plan["estimated"]:
            print(f"{name} {variant}: estimated " + "; ".join(plan["estimated"]))
        for phase, c in plan.get("check", {}).items():
            line, full = c["line"], c["compiled"]
            print(f"extrapolation check {name} {variant} {phase}: the line through L={lo_hi(results, name)} gives "
                  f"temp {g(line['temp'])} GiB, arguments {g(line['argument'])}; the full-depth compile "
                  f"{g(full['temp'])}, {g(full['argument'])} ({c['compile_s']:.0f} s)")
    for r in results:
        if "oom" in r:
            print(f"rejected by the compiler: {r['slice']} {r['variant']} {r['phase']} L={r['layers']} "
                  f"({r['compile_s']:.0f} s): {oom_summary(r['oom'])}")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    print(f"machine: {os.cpu_count()} CPUs, load {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.quick:
        return quick()
    if args.from_json:
        return print_plan([json.loads(line) for path in args.from_json for line in path.read_text().splitlines()
                           if line.strip()])
    results = []
    for name in args.slices + ([] if args.no_flops or args.attention != "xla" else ["cpu8"]):  # kernels: TPU only
        results += run_worker(args, name)
    if args.json and args.json.exists():  # everything compiled for this file so far, this run's and earlier runs'
        results = [json.loads(line) for line in args.json.read_text().splitlines() if line.strip()]
    return print_plan(results)


def quick() -> dict:
    """The narrow 7B-shaped model at 1 and 2 layers on this process's CPU devices, memory mode (the trainer's
    programs): its extrapolated need at 32 layers and the resident state alone."""
    from emorl_jax.sharding import make_mesh

    config = run_config(quick=True)
    mesh = make_mesh((1, -1, 1))
    cache, results = {}, []
    for layers in (1, 2):
        results += compile_variant(config, "full_fp32", mesh, layers, cache, label="v5e-8")
    plan = extrapolate(results, config.model.text.num_hidden_layers)[
        ("v5e-8", "full_fp32")]
    f = step_figures(plan, SLICES["v5e-8"], None, {}, config.rl.to_dict())
    ours, ref = f["peak"] / GiB, f["state"] / GiB
    print(f"memory_7b quick {mesh.devices.size}_CPU_devices full_fp32 need GiB/device: ours {ours:.6g}, "
          f"reference {ref:.6g}, ratio {ours / ref:.4f}  [reference = resident state alone]")
    return {"results": results, "cache": cache, "plan": plan, "figures": f}


if __name__ == "__main__":
    if "--quick" in sys.argv and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # 8 fake CPU devices (set before JAX starts), the FSDP mesh of a v5e-8
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    main()
