"""emorl_jax.distributed on one process with the fake 8-device CPU mesh (two processes: test_multihost_cli.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from emorl_jax import distributed
from emorl_jax.sharding import BATCH_AXES, batch_sharding, make_mesh


@pytest.mark.parametrize("shape", [(2, 4, 1), (1, 8, 1), (1, 4, 2), (8, 1, 1)])
def test_host_rows_is_every_row_on_one_process(shape):
    mesh = make_mesh(shape)
    for ndim in (1, 2, 3):
        assert distributed.host_rows(batch_sharding(mesh, ndim), 16) == slice(0, 16)
    assert distributed.host_rows(NamedSharding(mesh, P()), 5) == slice(0, 5)  # replicated


def test_host_rows_of_a_subset_of_devices():
    """A sharding over a mesh of some devices only: the rows of the devices this process can address; a mesh
    that interleaves them along the batch axis is refused."""
    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
    sharding = NamedSharding(mesh, P(BATCH_AXES))

    class Subset:  # the rows of the first 4 devices, as if the other 4 belonged to another process
        spec = sharding.spec

        def __init__(self, keep):
            self.keep = keep

        def addressable_devices_indices_map(self, shape):
            full = sharding.devices_indices_map(shape)
            return {d: full[d] for d in self.keep}

    assert distributed.host_rows(Subset(devices[:4]), 16) == slice(0, 8)
    assert distributed.host_rows(Subset(devices[4:]), 16) == slice(8, 16)
    with pytest.raises(ValueError, match="not contiguous"):
        distributed.host_rows(Subset([devices[0], devices[2]]), 16)


def test_global_array_and_batch():
    mesh = make_mesh((2, 4, 1))
    rng = np.random.default_rng(0)
    batch = {"prompt_ids": rng.integers(0, 100, (8, 5)).astype(np.int32),
             "input_features": rng.normal(size=(8, 3, 4)).astype(np.float32),
             "label": np.arange(8, dtype=np.int32), "utt_id": np.asarray([f"u{i}" for i in range(8)])}
    out = distributed.global_batch(batch, mesh)
    assert set(out) == {"prompt_ids", "input_features", "label"}  # str utt_id skipped
    for key, value in out.items():
        assert value.shape == batch[key].shape and value.sharding == batch_sharding(mesh, batch[key].ndim)
        assert len(value.addressable_shards) == 8 and value.addressable_shards[0].data.shape[0] == 1
        np.testing.assert_array_equal(distributed.to_host(value), batch[key])
    x = distributed.global_array(batch["prompt_ids"], NamedSharding(mesh, P(None, None)))
    np.testing.assert_array_equal(np.asarray(x), batch["prompt_ids"])


def test_to_host_any_process_gather_strings():
    tree = {"a": jax.numpy.arange(8.0), "b": (np.ones(2), 3)}
    host = distributed.to_host(tree)
    assert isinstance(host["a"], np.ndarray) and host["b"][1] == 3
    np.testing.assert_array_equal(host["a"], np.arange(8.0))
    assert distributed.any_process(True) is True and distributed.any_process(False) is False
    assert distributed.gather_strings("état") == ["état"]


def test_initialize_single_process_and_bad_flags():
    distributed.initialize(multihost=False)  # no-op
    assert jax.process_count() == 1
    with pytest.raises(ValueError, match="--num_processes, --process_id missing"):
        distributed.initialize(multihost=False, coordinator_address="127.0.0.1:1234")
    with pytest.raises(ValueError, match="--coordinator_address missing"):
        distributed.initialize(multihost=True, num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="not in"):
        distributed.initialize(multihost=False, coordinator_address="h:1", num_processes=2, process_id=2)
