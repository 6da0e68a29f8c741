"""Qwen2-Audio-7B memory plan: ahead-of-time compilation of the GRPO update, the log-prob pass and the sampler,
per-device bytes from `compiled.memory_analysis()`, FLOPs from `cost_analysis()`, and which TPU slices fit full
fine-tuning (fp32 or bf16 params) vs LoRA (rank 16).

Nothing is allocated: params, optimizer state and batch are `jax.ShapeDtypeStruct`s with NamedShardings
(`nnx.eval_shape`, `jax.eval_shape`). Two targets, each mesh in its own subprocess:
  cpu  fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set before JAX starts);
       XLA:CPU widens bf16 to f32 (e.g. the bf16 KV cache gets an f32 copy), so its temps overstate a TPU's.
  tpu  the TPU compiler itself, for a slice topology without a TPU (`jax.experimental.topologies`); needs the
       `libtpu` package matching jax (`pip install "libtpu==0.0.42.*"` for jax 0.10.2, or `--libtpu DIR` with
       `pip install --target DIR`).
Batch: 8 prompts x G=6, one 30 s clip each (3000 mel frames -> 750 audio slots), 800-token prompts, 256
completion tokens; bf16 compute, remat on, AdamW (optax, moments in the param dtype). Meshes
('data', 'fsdp', 'tensor'): 4 -> (1, 4, 1), 8 -> (1, 8, 1), 32 -> (1, 8, 4).

Per-device need of a phase = its compiled arguments + outputs - aliased (donated) + temps, plus what stays
resident outside it: the optimizer state while sampling or scoring, and under full fine-tuning the frozen
reference copy of the params (LoRA's reference is the base model itself).

    python benchmarks/memory_7b.py [--target cpu tpu] [--devices 8 32] [--slices v4-8 v5e-8 v5p-8]
    python benchmarks/memory_7b.py --quick   # a 2-layer, narrow 7B-shaped model, 8 CPU devices: seconds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30
MESHES = {4: (1, 4, 1), 8: (1, 8, 1), 16: (1, 8, 2), 32: (1, 8, 4)}
# TPU slice: (topology name, chip config, chips, HBM GiB per chip).
SLICES = {"v4-8": ("v4:2x2x1", "megacore", 4, 32), "v5e-8": ("v5e:2x4", None, 8, 16),
          "v5p-8": ("v5p:2x2x1", None, 4, 95), "v5e-32": ("v5e:4x8", None, 32, 16)}
VARIANTS = ("full_fp32", "full_bf16", "lora16")
PHASES = ("update", "logps", "sampler")
PROMPTS, GROUP, PROMPT_LEN, NEW_TOKENS, LORA_RANK = 8, 6, 800, 256, 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", nargs="+", default=["cpu"], choices=["cpu", "tpu"])
    p.add_argument("--devices", type=int, nargs="+", default=[8, 32], help="fake CPU mesh sizes (cpu target)")
    p.add_argument("--slices", nargs="+", default=["v4-8", "v5e-8", "v5p-8"], choices=sorted(SLICES),
                   help="TPU slices (tpu target)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    p.add_argument("--micro", type=int, default=1, help="micro-batches per GRPO update")
    p.add_argument("--constrain-activations", action="store_true",
                   help="pin each layer's hidden states to batch sharding: emulates the library change proposed in "
                        "benchmarks/README.md (without it GSPMD may shard activations like the FSDP weights)")
    p.add_argument("--libtpu", type=Path, help="directory holding the libtpu package (pip install --target)")
    p.add_argument("--json", type=Path, help="also write the results as JSON lines here")
    p.add_argument("--quick", action="store_true", help="2-layer narrow model, 8 CPU devices, fp32 update only")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "cpu:N" or "tpu:SLICE"
    args = p.parse_args(argv)
    if args.quick:
        args.target, args.devices, args.variants, args.phases = ["cpu"], [8], ["full_fp32"], ["update"]
    return args


def model_config(quick: bool):
    import dataclasses

    from emorl_jax.config import QWEN2_AUDIO_7B

    cfg = QWEN2_AUDIO_7B.replace(dtype="bfloat16", param_dtype="float32", remat=True)
    if quick:  # the same structure and sequence lengths; 2 layers and narrow widths
        cfg = cfg.replace(audio=dataclasses.replace(cfg.audio, d_model=128, encoder_layers=2, encoder_attention_heads=2,
                                                    encoder_ffn_dim=256),
                          text=dataclasses.replace(cfg.text, vocab_size=4096, hidden_size=256, intermediate_size=512,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    return cfg


# ----------------------------------------------------------------------------------------------------- worker


def worker_devices(spec: str):
    """(devices, label) for "cpu:N" (the fake CPU devices) or "tpu:SLICE" (the slice's topology devices)."""
    import jax

    target, name = spec.split(":")
    if target == "cpu":
        return jax.devices(), f"{name} CPU devices"
    from jax.experimental import topologies

    topology, chip_config, chips, _ = SLICES[name]
    kw = {"chip_config_name": chip_config} if chip_config else {}
    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kw).devices
    if len(devices) != chips:
        raise RuntimeError(f"topology {topology} gave {len(devices)} devices, expected {chips}")
    return devices, f"{name} ({devices[0].device_kind})"


class Abstract:
    """Abstract (ShapeDtypeStruct) inputs on one mesh: the batch, and per variant the sharded train state."""

    def __init__(self, mesh, quick: bool):
        from jax.sharding import NamedSharding, PartitionSpec as P

        self.mesh, self.cfg = mesh, model_config(quick)
        self.replicated = NamedSharding(mesh, P())

    def sds(self, x, sharding):
        import jax
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    def rows(self, n: int, *shape, dtype, micro: int | None):
        """[n, *shape] over the batch axes, or [micro, n / micro, *shape] split into micro-batches."""
        import jax
        from jax.sharding import NamedSharding, PartitionSpec as P

        from emorl_jax.sharding import BATCH_AXES

        if micro is None:
            return jax.ShapeDtypeStruct((n, *shape), dtype, sharding=NamedSharding(self.mesh, P(BATCH_AXES)))
        return jax.ShapeDtypeStruct((micro, n // micro, *shape), dtype,
                                    sharding=NamedSharding(self.mesh, P(None, BATCH_AXES)))

    def batch(self, micro: int | None) -> dict:
        """The GRPO batch (`rl.steps` keys); without `micro`, only the prompt and completion arrays."""
        import jax.numpy as jnp

        a, n, i32, f32 = self.cfg.audio, PROMPTS * GROUP, jnp.int32, jnp.float32
        b = {"prompt_ids": self.rows(PROMPTS, PROMPT_LEN, dtype=i32, micro=micro),
             "prompt_mask": self.rows(PROMPTS, PROMPT_LEN, dtype=i32, micro=micro),
             "input_features": self.rows(PROMPTS, a.num_mel_bins, a.num_frames, dtype=f32, micro=micro),
             "feature_mask": self.rows(PROMPTS, a.num_frames, dtype=i32, micro=micro),
             "completions": self.rows(n, NEW_TOKENS, dtype=i32, micro=micro),
             "completion_mask": self.rows(n, NEW_TOKENS, dtype=i32, micro=micro)}
        if micro is not None:
            b.update(old_logps=self.rows(n, NEW_TOKENS, dtype=f32, micro=micro),
                     ref_logps=self.rows(n, NEW_TOKENS, dtype=f32, micro=micro),
                     advantages=self.rows(n, dtype=f32, micro=micro), weights=self.rows(n, dtype=f32, micro=micro))
        return b

    def train_state(self, variant: str, tx):
        """(graphdef, TrainState of the trained params, frozen params), all abstract and placed on the mesh."""
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx

        from emorl_jax.models.audio_lm import AudioLM
        from emorl_jax.models.lora import add_lora, split_trainable
        from emorl_jax.rl.steps import TrainState
        from emorl_jax.sharding import param_shardings

        cfg = self.cfg.replace(param_dtype="bfloat16" if variant == "full_bf16" else "float32")
        build = lambda: AudioLM(cfg, rngs=nnx.Rngs(0))
        if variant == "lora16":
            abstract = nnx.eval_shape(lambda: add_lora(build(), rank=LORA_RANK, alpha=2.0 * LORA_RANK,
                                                       rngs=nnx.Rngs(1)))
        else:
            abstract = nnx.eval_shape(build)
        graphdef, params, frozen = split_trainable(abstract, lora=variant == "lora16")
        place = lambda state: jax.tree.map(self.sds, state, param_shardings(state, self.mesh))
        params, frozen = place(params), place(frozen)
        opt = optax.tree_utils.tree_map_params(tx, lambda m, p: self.sds(m, p.sharding),
                                               jax.eval_shape(tx.init, params), params,
                                               transform_non_params=lambda x: self.sds(x, self.replicated))
        return graphdef, TrainState(params, opt, self.sds(jax.ShapeDtypeStruct((), jnp.int32), self.replicated)), frozen


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    import jax
    import numpy as np

    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def lower(phase: str, inputs: Abstract, graphdef, tx, state, frozen, micro: int):
    """The lowered (not yet compiled) program of one phase, traced with the mesh in context (`jax.set_mesh`)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from emorl_jax.rl.sampler import SamplingParams, make_sampler, rollout_keys
    from emorl_jax.rl.steps import make_grpo_update, make_logps_fn
    from emorl_jax.sharding import BATCH_AXES

    if phase == "update":
        fn = make_grpo_update(graphdef, tx, group_size=GROUP, clip_eps=0.2, beta=0.04, normalization="sequence",
                              state_shardings=jax.tree.map(lambda x: x.sharding, state))
        args = (state, frozen, inputs.batch(micro))
    elif phase == "logps":
        fn, args = make_logps_fn(graphdef, group_size=GROUP), (state.params, frozen, inputs.batch(None))
    else:
        b = inputs.batch(None)
        keys = jax.eval_shape(lambda: rollout_keys(jax.random.key(0), PROMPTS, GROUP))
        keys = inputs.sds(keys, NamedSharding(inputs.mesh, P(BATCH_AXES)))
        fn = make_sampler(graphdef, group_size=GROUP, eos_ids=(1,), pad_id=0,
                          params=SamplingParams(max_new_tokens=NEW_TOKENS))
        args = ((state.params, frozen), b["prompt_ids"], b["prompt_mask"], b["input_features"], b["feature_mask"],
                keys)
    with jax.set_mesh(inputs.mesh):
        return fn.lower(*args)


def analyse(lowered) -> dict:
    """Per-device bytes and FLOPs of the compiled program, or {"oom": message} when the TPU compiler rejects it."""
    import jax

    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {"oom": str(e).splitlines()[0][:300]}
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    out["flops"] = float(cost.get("flops", 0.0))
    return out


def worker(args) -> None:
    """Compiles every (variant, phase) on one mesh and prints one `RESULT {json}` line per compilation."""
    import jax
    import numpy as np

    from emorl_jax.rl.steps import make_optimizer
    from emorl_jax.sharding import make_mesh

    devices, label = worker_devices(args.worker)
    mesh = make_mesh(MESHES[len(devices)], devices=devices)
    if args.constrain_activations:
        constrain_layer_activations(mesh)
    inputs = Abstract(mesh, args.quick)
    tx = make_optimizer(learning_rate=1e-6, total_steps=1000)
    for variant in args.variants:
        graphdef, state, frozen = inputs.train_state(variant, tx)
        sizes = {"params": device_bytes(state.params), "opt_state": device_bytes(state.opt_state),
                 "frozen": device_bytes(frozen),
                 "trained_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))}
        for phase in args.phases:
            start = time.perf_counter()
            lowered = lower(phase, inputs, graphdef, tx, state, frozen, args.micro)
            lower_s = time.perf_counter() - start
            analysis = analyse(lowered)
            print("RESULT " + json.dumps({
                "target": args.worker.split(":")[0], "mesh_name": label, "devices": len(devices),
                "mesh": MESHES[len(devices)], "variant": variant, "phase": phase, "micro": args.micro,
                "lower_s": round(lower_s, 1), "compile_s": round(time.perf_counter() - start - lower_s, 1),
                **sizes, **analysis}), flush=True)


def constrain_layer_activations(mesh) -> None:
    """Wraps the decoder's and encoder's layer scans so that each layer's hidden states [batch, time, d] carry a
    batch sharding constraint over ('data', 'fsdp') (the proposed library change, applied from outside)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from emorl_jax.models import audio_encoder, layers, qwen2
    from emorl_jax.sharding import BATCH_AXES

    batch = NamedSharding(mesh, P(BATCH_AXES, None, None))
    pin = lambda x: jax.lax.with_sharding_constraint(x, batch)

    def scan_layers(stacked, step, carry, xs=None, *, remat=False):
        def pinned(layer, h, x):
            h, y = step(layer, pin(h), x)
            return pin(h), y
        return layers.scan_layers(stacked, pinned, carry, xs, remat=remat)

    qwen2.scan_layers = audio_encoder.scan_layers = scan_layers


# ----------------------------------------------------------------------------------------------------- parent


def run_worker(args, spec: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])] + ([str(args.libtpu)] if args.libtpu else [])
        + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep), JAX_PLATFORMS="cpu")
    if spec.startswith("cpu:"):
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={spec[4:]}"
    else:
        env.pop("XLA_FLAGS", None)
        env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # compiling only: several processes may load libtpu at once
    cmd = [sys.executable, __file__, "--worker", spec, "--micro", str(args.micro), "--variants", *args.variants,
           "--phases", *args.phases]
    cmd += ["--quick"] * args.quick + ["--constrain-activations"] * args.constrain_activations
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"memory_7b worker {spec} failed:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
        return []
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    label = results[0]["mesh_name"] if results else spec
    print(f"{label}, mesh {MESHES[results[0]['devices']] if results else '?'}: {len(results)} compilations in "
          f"{time.perf_counter() - start:.0f} s wall (lowering + compiling: "
          f"{sum(r['lower_s'] + r['compile_s'] for r in results):.0f} s)", flush=True)
    return results


def oom_temps(message: str) -> float | None:
    """Bytes of HLO temporaries the TPU compiler said it needed, from its RESOURCE_EXHAUSTED message."""
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
    return float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024 if m else None


def needs(results: list[dict]) -> dict[tuple[str, str, str], dict[str, float]]:
    """Per-device bytes each phase needs, counting what stays resident outside it, by (target, mesh, variant).
    A phase the TPU compiler rejected counts as infinite."""
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in results:
        if "oom" in r:
            out.setdefault((r["target"], r["mesh_name"], r["variant"]), {})[r["phase"]] = float("inf")
            continue
        full = r["variant"] != "lora16"
        reference = r["params"] if full else 0  # the frozen reference copy under full fine-tuning
        extra = {"update": reference, "logps": r["opt_state"] + reference, "sampler": r["opt_state"] + reference}
        out.setdefault((r["target"], r["mesh_name"], r["variant"]), {})[r["phase"]] = r["total"] + extra[r["phase"]]
    return out


def print_tables(results: list[dict]) -> None:
    g = lambda b: f"{b / GiB:.2f}"
    print("\nPer-device GiB from compiled.memory_analysis(), XLA FLOPs per device, lowering + compile seconds:\n")
    print("| target | mesh | variant | phase | params | opt state | frozen | args | outputs | aliased | temps | "
          "total | TFLOP | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "oom" in r:
            temps = oom_temps(r["oom"])
            print(f"| {r['target']} | {r['mesh_name']} {tuple(r['mesh'])} | {r['variant']} | {r['phase']} | "
                  f"{g(r['params'])} | {g(r['opt_state'])} | {g(r['frozen'])} | rejected by the compiler: "
                  f"{'temps ' + g(temps) + ' GiB' if temps else r['oom']} > HBM | | | | | | "
                  f"{r['lower_s'] + r['compile_s']:.0f} |")
            continue
        print(f"| {r['target']} | {r['mesh_name']} {tuple(r['mesh'])} | {r['variant']} | {r['phase']} | "
              f"{g(r['params'])} | {g(r['opt_state'])} | {g(r['frozen'])} | {g(r['argument'])} | {g(r['output'])} | "
              f"{g(r['alias'])} | {g(r['temp'])} | {g(r['total'])} | {r['flops'] / 1e12:.1f} | "
              f"{r['lower_s'] + r['compile_s']:.0f} |")
    table = needs(results)
    print("\nPer-device need, GiB (compiled total + resident state outside the phase):\n")
    print("| target | mesh | variant | update | logps | sampler | need |")
    print("|---|---|---|---|---|---|---|")
    for (target, mesh, variant), phases in table.items():
        cells = " | ".join((g(phases[p]) if phases[p] < float("inf") else "OOM") if p in phases else "-"
                           for p in PHASES)
        need = max(phases.values())
        print(f"| {target} | {mesh} | {variant} | {cells} | {g(need) if need < float('inf') else 'OOM'} |")
    print("\nTPU slices (need per chip vs HBM per chip; from the TPU compiler where measured, else the CPU mesh "
          "of as many devices):\n")
    variants = sorted({r["variant"] for r in results})
    print("| slice | chips x HBM | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for name, (_, _, chips, hbm) in SLICES.items():
        cells = []
        for variant in variants:
            found = [(t, phases) for (t, mesh, v), phases in table.items() if v == variant and
                     (mesh.startswith(name + " ") if t == "tpu" else mesh == f"{chips} CPU devices")]
            if not found:
                cells.append("-")
                continue
            target, phases = sorted(found, key=lambda f: f[0] != "tpu")[0]
            need = max(phases.values())
            verdict = f"{need / GiB:.1f}" if need < float("inf") else "over HBM (compiler)"
            cells.append(f"{'fits' if need <= hbm * GiB else 'no'}: {verdict} ({target})")
        if any(c != "-" for c in cells):
            print(f"| {name} | {chips} x {hbm} GiB | " + " | ".join(cells) + " |")


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    print(f"machine: {os.cpu_count()} CPUs, load {'/'.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"RAM {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GiB:.0f} GiB")
    print(f"setup: {'2-layer narrow 7B-shaped model' if args.quick else 'Qwen2-Audio-7B'}, {PROMPTS} prompts x "
          f"G={GROUP}, prompt {PROMPT_LEN} tokens (30 s audio), {NEW_TOKENS} new tokens, {args.micro} micro-batch(es), "
          f"bf16 compute, remat, LoRA rank {LORA_RANK}; layer activations "
          f"{'pinned to batch sharding' if args.constrain_activations else 'as the library leaves them'}")
    specs = ([f"cpu:{n}" for n in args.devices] if "cpu" in args.target else []) + \
            ([f"tpu:{s}" for s in args.slices] if "tpu" in args.target else [])
    for spec in specs:
        if spec.startswith("cpu:") and int(spec[4:]) not in MESHES:
            raise SystemExit(f"--devices: no mesh shape for {spec[4:]} devices; known: {sorted(MESHES)}")
    per_spec = {spec: run_worker(args, spec) for spec in specs}
    results = [r for rs in per_spec.values() for r in rs]
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in results))
    print_tables(results)
    print()
    for r in results:  # report lines: the compiled total vs the trained state alone (params + optimizer + frozen)
        if "oom" in r:
            continue
        state = r["params"] + r["opt_state"] + r["frozen"]
        print(f"memory_7b {r['target']} {r['mesh_name'].replace(' ', '_')} {r['variant']} {r['phase']} GiB/device: "
              f"ours {r['total'] / GiB:.6g}, reference {state / GiB:.6g}, ratio {r['total'] / state:.3f}  "
              "[reference = params + optimizer state + frozen params alone]")
    failed = [spec for spec, rs in per_spec.items() if not rs]
    if failed:
        raise SystemExit(f"memory_7b: no results for {', '.join(failed)} (see the errors above)")


if __name__ == "__main__":
    main()
