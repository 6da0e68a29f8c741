"""The runtime a notebook or script runs on (TPU, GPU or CPU, how many devices) and a run config sized to it.

  rt = runtime.detect()                                          # Runtime(platform="tpu", device_count=8, ...)
  overrides = runtime.sized_overrides("tiny_synthetic", "rl.steps=10", runtime=rt)
  config = load_run_config("tiny_synthetic", *overrides)

`size_run` returns config overrides ("key=value", as `load_run_config` takes them; `--config.key=value` on a CLI):
a mesh over every device, and batch sizes rounded up to multiples of the devices a batch is sharded over
(('data', 'fsdp'), see `emorl_jax.sharding`), so that every global batch splits evenly across them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from emorl_jax.config import load_run_config

# Global batch sizes of a run config and the micro-batch count each is split into (None: not split).
BATCH_KEYS = (("sft.batch_size", "sft.micro_batches"), ("rl.batch_size", "rl.micro_batches"),
              ("train.eval_batch_size", None))


@dataclasses.dataclass(frozen=True)
class Runtime:
    """platform: "tpu", "gpu" or "cpu"; device_count: every device of the run; device_kind: e.g. "TPU v5 lite"."""

    platform: str
    device_count: int
    device_kind: str

    @property
    def accelerator(self) -> bool:
        return self.platform != "cpu"

    def __str__(self) -> str:
        return f"{self.platform.upper()} runtime: {self.device_count} x {self.device_kind}"


def detect(devices: Sequence | None = None) -> Runtime:
    """The runtime of `devices` (default: `jax.devices()`, every process's); CUDA and ROCm devices are "gpu"."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("no devices")
    platform = str(devices[0].platform).lower()
    return Runtime("gpu" if platform in ("cuda", "rocm") else platform, len(devices), str(devices[0].device_kind))


def _get(config, dotted: str):
    section, key = dotted.split(".")
    return config[section][key] if section in config and key in config[section] else None


def mesh_shape(config, runtime: Runtime) -> tuple[int, int, int]:
    """(data, fsdp, tensor) over every device: the config's tensor and data sizes where they divide the devices
    (-1 = the rest), FSDP over what is left."""
    n = runtime.device_count
    data, _, tensor = (int(s) for s in _get(config, "mesh.shape") or (1, -1, 1))
    tensor = n if tensor == -1 else tensor
    tensor = tensor if tensor >= 1 and n % tensor == 0 else 1
    data = data if data >= 1 and (n // tensor) % data == 0 else 1
    return data, n // (tensor * data), tensor


def size_run(config, runtime: Runtime | None = None) -> list[str]:
    """Overrides that fit a run config to `runtime` (default: `detect()`): `mesh.shape` over every device, each
    batch size that does not split into (batch-sharding devices x its micro-batches) rounded up to one that does,
    and, on a CPU with several (fake) devices, `mesh.activation_constraints=false` (see `config.base_run_config`).
    One device: the mesh only, every batch size unchanged."""
    runtime = runtime or detect()
    data, fsdp, tensor = mesh_shape(config, runtime)
    shards = data * fsdp
    out = [f"mesh.shape=({data},{fsdp},{tensor})"]
    for key, micro_key in BATCH_KEYS:
        size = _get(config, key)
        if size is None:
            continue
        multiple = shards * int((_get(config, micro_key) if micro_key else None) or 1)
        rounded = -(-max(int(size), 1) // multiple) * multiple
        if rounded != size:
            out.append(f"{key}={rounded}")
    if runtime.platform == "cpu" and runtime.device_count > 1 and _get(config, "mesh.activation_constraints"):
        out.append("mesh.activation_constraints=false")
    return out


def _key(override: str) -> str:
    return override.removeprefix("--config.").split("=", 1)[0]


def sized_overrides(path_or_name, *overrides: str, runtime: Runtime | None = None) -> list[str]:
    """`overrides` plus `size_run`'s for the config they give (`load_run_config(path_or_name, *overrides)`), one
    per key, the sizing's last: pass them to `load_run_config`. (ml_collections appends a repeated tuple override,
    e.g. mesh.shape, to the first instead of replacing it.)"""
    sizing = size_run(load_run_config(path_or_name, *overrides), runtime)
    merged = {_key(o): o for o in overrides}
    merged.update({_key(o): o for o in sizing})
    return list(merged.values())
