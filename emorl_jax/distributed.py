"""Multi-process helpers: start the JAX distributed runtime, build global arrays from the global batch every
process holds, and bring global values back to every host.

The input pipeline's contract (run_setup.RunData): every process runs the SAME global pipeline (same seed, same
shuffle, same length-sorted windows, same global batch size) and hands only the rows its own devices hold to
`jax.make_array_from_process_local_data`. The global batch at step k therefore does not depend on the number of
processes; a 2-host run sees exactly the batches of a 1-host run. On one process every helper here reduces to
a plain device_put / np.asarray.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from emorl_jax.sharding import batch_sharding


def initialize(*, multihost: bool, coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1) -> None:
    """Starts the JAX distributed runtime; call before anything touches JAX devices.

    coordinator_address set: `jax.distributed.initialize(coordinator_address, num_processes, process_id)` (both
    needed). multihost alone: `jax.distributed.initialize()`, which detects TPU pod slices, SLURM, Open MPI and
    the like. Neither: nothing (one process). On the CPU platform the gloo collectives are selected first
    (XLA:CPU has no cross-process collectives otherwise).
    """
    explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
    if explicit:
        missing = [name for name, ok in (("--coordinator_address", bool(coordinator_address)),
                                         ("--num_processes", num_processes > 0),
                                         ("--process_id", process_id >= 0)) if not ok]
        if missing:
            raise ValueError(f"multi-process flags are incomplete: {', '.join(missing)} missing (given "
                             f"coordinator_address={coordinator_address!r}, num_processes={num_processes}, "
                             f"process_id={process_id}); pass all three, or only --multihost to let JAX "
                             f"detect the cluster")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} is not in [0, {num_processes})")
    elif not multihost:
        return
    if _cpu_platform() and jax.config.jax_cpu_collectives_implementation != "mpi":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()


def define_flags() -> None:
    """The multi-process flags of the train and eval CLIs (absl): --multihost, --coordinator_address,
    --num_processes, --process_id."""
    from absl import flags

    flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() (TPU pod slices, SLURM, ...): run "
                      "the same command on every host")
    flags.DEFINE_string("coordinator_address", "", "HOST:PORT of process 0, for an explicit multi-process run "
                        "(with --num_processes and --process_id)")
    flags.DEFINE_integer("num_processes", 0, "number of processes of an explicit multi-process run")
    flags.DEFINE_integer("process_id", -1, "this process's index in [0, num_processes) of an explicit run")


def initialize_from_flags() -> None:
    """`initialize` with the values of the flags `define_flags` defined."""
    from absl import flags

    f = flags.FLAGS
    initialize(multihost=f.multihost, coordinator_address=f.coordinator_address, num_processes=f.num_processes,
               process_id=f.process_id)


def _cpu_platform() -> bool:
    """Whether JAX may run on CPU, read from the config (JAX_PLATFORMS), without starting a backend: JAX_PLATFORMS
    starts with cpu, or is unset (then a machine without accelerators runs on CPU; gloo is harmless elsewhere)."""
    platforms = (jax.config.jax_platforms or "").lower()
    return not platforms or platforms.split(",")[0].strip() == "cpu"


def host_rows(sharding: jax.sharding.Sharding, num_rows: int) -> slice:
    """The contiguous range of leading-axis rows that this process's devices hold under `sharding`, for an
    array of `num_rows` rows (rows held by several local devices, e.g. replicas, count once).

    Raises ValueError if this process's rows are not one contiguous range (a mesh whose device order
    interleaves processes along the batch axes).
    """
    spec = getattr(sharding, "spec", None)
    ndim = max(1, len(spec)) if spec is not None else 1
    index_map = sharding.addressable_devices_indices_map((num_rows,) + (1,) * (ndim - 1))
    spans = sorted({idx[0].indices(num_rows)[:2] if idx else (0, num_rows) for idx in index_map.values()})
    start, stop = spans[0]
    for a, b in spans[1:]:
        if a > stop:
            raise ValueError(f"process {jax.process_index()} holds rows {spans} of {num_rows}: not contiguous "
                             f"(build the mesh so that each process's devices are adjacent along the batch axes)")
        stop = max(stop, b)
    return slice(start, stop)


def global_array(host_array: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """The global jax.Array of `host_array` (the SAME full global value on every process) under `sharding`;
    each process contributes only the rows its devices hold."""
    host_array = np.asarray(host_array)
    rows = host_rows(sharding, host_array.shape[0]) if host_array.ndim else slice(None)
    local = host_array[rows] if host_array.ndim else host_array
    return jax.make_array_from_process_local_data(sharding, local, host_array.shape)


def global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Every numeric array of `batch` (the full global batch, identical on every process) as a global array
    with its leading axis sharded over ('data', 'fsdp'); non-numeric arrays (str utt_id, ...) are left out."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.dtype.kind not in "biuf" or value.ndim == 0:
            continue
        out[key] = global_array(value, batch_sharding(mesh, value.ndim))
    return out


def to_host(x):
    """The whole global value of `x` (an array or a pytree of arrays) as numpy on every process: np.asarray
    where fully addressable, else gathered across processes (`process_allgather(tiled=True)`)."""
    def one(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable:
            return np.asarray(a)
        if a.sharding.is_fully_replicated:  # every process holds all of it
            return np.asarray(a.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    return jax.tree.map(one, x)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is set on any process (one process: `flag`). Every process must call it
    (it is a collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([bool(flag)], np.int32))
    return bool(np.asarray(flags).any())


def gather_strings(s: str) -> list[str]:
    """Every process's string, in process order (one process: [s]). A collective: every process calls it."""
    if jax.process_count() == 1:
        return [s]
    from jax.experimental import multihost_utils

    data = np.frombuffer(s.encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int32))).reshape(-1)
    padded = np.zeros(int(lengths.max()) if len(lengths) else 0, np.uint8)
    padded[:len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
    return [bytes(row[:n]).decode() for row, n in zip(gathered, lengths)]
