"""emorl_jax.runtime: detecting the runtime and sizing a run config to it (the suite's fake 8-device CPU mesh, and
stubbed TPU/GPU device lists); the sized config's batches shard evenly over the mesh it names."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from emorl_jax import runtime
from emorl_jax.config import load_run_config
from emorl_jax.sharding import BATCH_AXES, batch_sharding, make_mesh

QUICK = ["sft.batch_size=4", "rl.batch_size=2", "train.eval_batch_size=6"]  # the notebook's quick sizes, roughly


def stub(platform: str, kind: str, n: int) -> list:
    return [SimpleNamespace(platform=platform, device_kind=kind, id=i) for i in range(n)]


def sized(name: str, rt: runtime.Runtime, *overrides: str):
    return load_run_config(name, *runtime.sized_overrides(name, *overrides, runtime=rt))


def test_detect_the_fake_cpu_mesh():
    rt = runtime.detect()
    assert (rt.platform, rt.device_count, rt.accelerator) == ("cpu", jax.device_count(), False)
    assert rt.device_count == 8  # conftest's fake devices
    assert str(rt) == f"CPU runtime: 8 x {jax.devices()[0].device_kind}"


@pytest.mark.parametrize("platform,expected", [("tpu", "tpu"), ("gpu", "gpu"), ("cuda", "gpu"), ("rocm", "gpu")])
def test_detect_stubbed_accelerators(platform, expected):
    rt = runtime.detect(stub(platform, "Some Chip", 4))
    assert rt == runtime.Runtime(expected, 4, "Some Chip") and rt.accelerator


def test_sized_config_shards_every_batch_on_the_fake_mesh():
    rt = runtime.detect()
    overrides = runtime.size_run(load_run_config("tiny_synthetic", *QUICK), rt)
    assert overrides == ["mesh.shape=(1,8,1)", "sft.batch_size=8", "rl.batch_size=8", "train.eval_batch_size=8",
                         "mesh.activation_constraints=false"]
    assert runtime.sized_overrides("tiny_synthetic", *QUICK, "--config.rl.steps=2", "mesh.shape=(1,-1,1)") == \
        ["sft.batch_size=8", "rl.batch_size=8", "train.eval_batch_size=8", "--config.rl.steps=2", *overrides[:1],
         "mesh.activation_constraints=false"]
    config = load_run_config("tiny_synthetic", *runtime.sized_overrides("tiny_synthetic", *QUICK))
    mesh = make_mesh(tuple(config.mesh.shape))
    assert int(np.prod([mesh.shape[a] for a in BATCH_AXES])) == 8
    for rows in (config.sft.batch_size, config.rl.batch_size * config.rl.group_size, config.train.eval_batch_size):
        x = jax.device_put(np.zeros((rows, 3), np.float32), batch_sharding(mesh, 2))  # raises if uneven
        assert len(x.addressable_shards) == 8 and x.addressable_shards[0].data.shape == (rows // 8, 3)


def test_one_device_changes_nothing_but_the_mesh():
    config = load_run_config("tiny_synthetic")
    assert runtime.size_run(config, runtime.detect(jax.devices()[:1])) == ["mesh.shape=(1,1,1)"]
    gpu = runtime.Runtime("gpu", 1, "Tesla T4")
    assert runtime.size_run(load_run_config("tiny_synthetic", *QUICK), gpu) == ["mesh.shape=(1,1,1)"]


def test_tpu_keeps_the_configs_tensor_parallelism():
    tpu = runtime.detect(stub("tpu", "TPU v4", 8))
    config = sized("qwen2_audio_7b_meld", tpu, "mesh.shape=(1,-1,4)")
    assert tuple(config.mesh.shape) == (1, 2, 4)  # batches shard over 2 devices: 16 prompts in 2 micro-batches fit
    assert (config.rl.batch_size, config.sft.batch_size, config.train.eval_batch_size) == (16, 8, 16)
    assert config.mesh.activation_constraints  # only fake CPU meshes turn them off
    # a tensor size that does not divide the devices falls back to FSDP over all of them
    assert runtime.mesh_shape(load_run_config("tiny_synthetic", "mesh.shape=(1,-1,3)"), tpu) == (1, 8, 1)
    assert runtime.mesh_shape(load_run_config("tiny_synthetic", "mesh.shape=(2,-1,1)"), tpu) == (2, 4, 1)


def test_gpu_batches_round_up_to_devices_times_micro_batches():
    gpus = runtime.detect(stub("gpu", "NVIDIA A100-SXM4-40GB", 3))
    config = sized("qwen2_audio_7b_iemocap", gpus)
    assert tuple(config.mesh.shape) == (1, 3, 1)
    # rl: 16 prompts in 2 micro-batches -> each micro-batch a multiple of 3 prompts: 18; sft 8 -> 9; eval 16 -> 18
    assert (config.rl.batch_size, config.sft.batch_size, config.train.eval_batch_size) == (18, 9, 18)
    assert config.rl.batch_size // config.rl.micro_batches % 3 == 0


def test_model_shape_configs_get_a_mesh_only():
    assert runtime.size_run(load_run_config("tiny"), runtime.Runtime("tpu", 4, "TPU v5 lite")) == \
        ["mesh.shape=(1,4,1)"]
