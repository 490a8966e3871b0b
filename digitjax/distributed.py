"""Devices and processes: JAX's own multi-host start-up, a data-parallel mesh, placements.

Data parallelism over a 1-D mesh axis `data`: parameters, optimizer state and the uint8
dataset are replicated on every device, and each device computes its slice of every global
batch; XLA inserts the gradient all-reduce. The same program runs on 1 CPU, 8 GPUs or a pod.
"""

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from digitjax.config import UserError

DATA_AXIS = "data"


def initialize(
    distributed: bool,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins a multi-process job when asked (`--distributed` or any coordinator flag) or when
    a launcher started several processes. JAX itself finds the coordinator under SLURM, Open
    MPI and on TPU VMs. Must run before anything touches a device."""
    # srun sets SLURM_STEP_NUM_TASKS for the processes it starts; SLURM_NTASKS alone is also
    # set in an `sbatch -n 4` script or `salloc` shell, where only one process runs.
    launched = any(
        int(os.environ.get(name, "1")) > 1
        for name in ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")
    )
    asked = distributed or any(v is not None for v in (coordinator, num_processes, process_id))
    if not (asked or launched or "JAX_COORDINATOR_ADDRESS" in os.environ):
        return
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise UserError(
            f"--process-id {process_id} is out of range: a job of {num_processes} processes "
            f"numbers them 0 to {num_processes - 1}"
        )
    # XLA:CPU needs a collectives backend to talk across processes (GPUs and TPUs have theirs).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id)
    except (RuntimeError, ValueError) as e:
        said = str(e).splitlines()[0]
        if "coordinator_address should be defined" in said:  # JAX's words for it
            said = (
                "no coordinator: pass --coordinator HOST:PORT of process 0 (JAX finds it itself "
                "only under SLURM, Open MPI and on TPU VMs)"
            )
        raise UserError(f"cannot join the distributed job: {said}") from None
    global _joined
    _joined = True


_joined = False


def joined() -> bool:
    """Whether this process joined a multi-process job (its shutdown must then run)."""
    return _joined


def is_main_process() -> bool:
    return jax.process_index() == 0


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A mesh over the first `num_devices` devices (default: all, across all processes).
    Auto axes: Explicit ones (jax.make_mesh's default from 0.12) break optax's
    softmax-cross-entropy gradient."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise UserError(f"--devices {num_devices}: this job has {len(devices)} device(s)")
        if jax.process_count() > 1 and num_devices != len(devices):
            raise UserError(
                "--devices cannot restrict a multi-process job; every process "
                "contributes its devices"
            )
        devices = devices[:num_devices]
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def put_replicated(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array (the same in every process) as one global array on every device."""
    return jax.make_array_from_callback(array.shape, replicated(mesh), lambda index: array[index])


def abstract_on(abstract: Any, sharding: NamedSharding) -> Any:
    """`abstract` (shapes and dtypes) placed by `sharding`: a restore target."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract
    )


def to_host(array: jax.Array) -> np.ndarray:
    """A replicated array's value; every process holds a full copy, even in a multi-host job
    where the global array is not addressable as a whole."""
    return np.asarray(array.addressable_data(0))


@contextlib.contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """In a multi-process job, Gloo prints connection notes from C++ straight to file
    descriptor 1, which belongs to --json: point the descriptor at stderr meanwhile. The other
    processes' notes (`[Gloo] Rank N is connected to...`, one each) are dropped: process 0
    speaks for the job, and they say nothing its own does not."""
    if jax.process_count() == 1:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    if is_main_process():
        os.dup2(2, 1)
    else:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def sync(name: str) -> None:
    """All processes wait here for each other (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.size:
        raise UserError(
            f"--batch-size {batch_size} does not divide over {mesh.size} devices; "
            f"use a multiple of {mesh.size}"
        )


def runtime_info(mesh: Mesh) -> dict[str, Any]:
    """Where a run ran, for its record: devices, processes and the library versions."""
    import importlib.metadata

    from digitjax import __version__

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:  # importable, but not pip-installed
            return "unknown"

    packages = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")
    return {
        "backend": jax.default_backend(),
        "device_kind": mesh.devices.flat[0].device_kind,
        "devices": mesh.size,
        "processes": jax.process_count(),
        # digitjax's own from the code that runs: a checkout (`python cli.py`) has no metadata.
        "versions": {"digitjax": __version__} | {name: version(name) for name in packages},
    }
