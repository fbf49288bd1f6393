"""JAX's multi-controller runtime: one Python process per host (or, on a CPU, per group of
fake devices), all running the same program on one global mesh.

`initialize()` is called by `llama_jax.main` before anything touches a device:

  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set (`launch/local.py`
      sets them): `jax.distributed.initialize` with those values; on CPU, collectives go
      through gloo.
  LLAMA_JAX_DISTRIBUTED=auto (the TPU VM and SLURM launchers set it):
      `jax.distributed.initialize()` with JAX's own cluster detection (TPU pod slices,
      SLURM, Open MPI, ...).
  neither: a single process (nothing to do).

The helpers below are what the loop needs beyond jit: a barrier, "the lead process does
it, the others wait", and gathering small JSON states (the input pipelines' iterator
positions) from every process for the checkpoint.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import numpy as np

_INITIALIZED = False


def initialize() -> bool:
    """Joins the multi-process job described by the environment; returns whether it did."""
    global _INITIALIZED
    if _INITIALIZED:
        return True
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    mode = os.environ.get("LLAMA_JAX_DISTRIBUTED", "").lower()
    if mode not in ("", "0", "false", "auto", "1", "true"):
        raise ValueError(f"LLAMA_JAX_DISTRIBUTED={os.environ['LLAMA_JAX_DISTRIBUTED']!r}: expected auto (join the "
                         "cluster's job: TPU slice, SLURM, ...), or unset for one process")
    if address and os.environ.get("JAX_NUM_PROCESSES"):
        try:
            num = int(os.environ["JAX_NUM_PROCESSES"])
            pid = int(os.environ["JAX_PROCESS_ID"]) if num > 1 else 0
        except KeyError:  # every process would be process 0
            raise ValueError(f"JAX_NUM_PROCESSES={os.environ['JAX_NUM_PROCESSES']} and JAX_COORDINATOR_ADDRESS are "
                             "set but not JAX_PROCESS_ID: set it to this process's index (0 .. N-1)") from None
        except ValueError:
            raise ValueError(f"JAX_NUM_PROCESSES={os.environ.get('JAX_NUM_PROCESSES')!r}, JAX_PROCESS_ID="
                             f"{os.environ.get('JAX_PROCESS_ID')!r}: expected whole numbers") from None
        if num <= 1:
            return False
        if not 0 <= pid < num:
            raise ValueError(f"JAX_PROCESS_ID={pid}: expected 0 .. {num - 1} (JAX_NUM_PROCESSES={num})")
        if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    elif mode in ("auto", "1", "true"):
        # A cluster's own detection (SLURM) gives each process the one device of its local
        # rank; LLAMA_JAX_LOCAL_DEVICE_IDS=0,1,... gives a process-per-node job all of them
        ids = os.environ.get("LLAMA_JAX_LOCAL_DEVICE_IDS", "").strip()
        try:
            local = [int(i) for i in ids.split(",")] if ids else None
        except ValueError:
            raise ValueError(f"LLAMA_JAX_LOCAL_DEVICE_IDS={ids!r}: give device numbers, e.g. 0,1,2,3") from None
        try:
            jax.distributed.initialize(local_device_ids=local)
        except ValueError as e:  # JAX found no cluster: say which variable asked for one
            raise ValueError(f"LLAMA_JAX_DISTRIBUTED={mode}: no multi-process job found in this environment (a TPU "
                             f"slice, an srun step, ...): {e}; unset it to run as one process") from None
    else:
        return False
    _INITIALIZED = True
    return True


def job_process() -> tuple[int, int] | None:
    """(this process's index, number of processes) when the environment makes this one
    of a multi-process job (`launch/local.py`, an `srun` step of several tasks with
    LLAMA_JAX_DISTRIBUTED set), else None; read from the environment, before any device."""
    num = os.environ.get("JAX_NUM_PROCESSES") if os.environ.get("JAX_COORDINATOR_ADDRESS") else None
    index = os.environ.get("JAX_PROCESS_ID", "0")
    if num is None and os.environ.get("LLAMA_JAX_DISTRIBUTED", "").lower() in ("auto", "1", "true"):
        # srun's task count (an sbatch script or salloc shell has SLURM_NTASKS outside any srun: one process)
        num, index = os.environ.get("SLURM_STEP_NUM_TASKS"), os.environ.get("SLURM_PROCID", "0")
    try:
        return (int(index), int(num)) if num and int(num) > 1 else None
    except ValueError:
        return None


def require_one_process(prog: str, runs: str = "runs as one process, on all of this host's devices") -> None:
    """Exits (code 2) when `prog`, a one-process command, was started as one process of
    a multi-process job: each process would load the whole model and print, write or read
    its own copy. Process 0 says why (`runs`: how the command runs); the others exit quietly."""
    job = job_process()
    if job is None:
        return
    import sys

    if job[0] == 0:
        print(f"error: {prog} {runs}; it was started as one of "
              f"{job[1]} processes of a job (launch/local.py, an srun of several tasks): run it on its own",
              file=sys.stderr, flush=True)
    sys.exit(2)


def is_multiprocess() -> bool:
    return _INITIALIZED and jax.process_count() > 1


def is_lead() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def lead_first(name: str, fn: Callable[[], Any]) -> None:
    """Runs `fn` on the lead process only (e.g. writing a file every process then reads);
    the others wait until it is done."""
    if is_lead():
        fn()
    barrier(name)


def together(name: str, done: Callable[[], bool], fn: Callable[[], Any]) -> None:
    """Work every process does together, e.g. sampling from a model sharded over the run's
    mesh: unless `done()` on the lead (all processes follow its answer), every process
    runs `fn`, which writes its results from the lead only (`is_lead`); then all wait
    until all are done."""
    if not allgather_json(bool(done()))[0]:
        fn()
    barrier(name)


def say(*args, **kwargs) -> None:
    """print() on the lead process only (what all processes compute, reported once)."""
    if is_lead():
        print(*args, **kwargs)


def allgather_json(value: Any) -> list[Any]:
    """[value of process 0, value of process 1, ...] on every process, for small
    JSON-able values."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([len(data)], np.int32))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: len(data)] = data
    rows = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(rows, np.ravel(lengths))]


def sum_over_processes(x: np.ndarray) -> np.ndarray:
    """The sum of every process's `x` (same shape everywhere), on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x))).sum(axis=0)


def to_host(x) -> np.ndarray:
    """A (possibly multi-process sharded) array as a full numpy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


class Preemption:
    """A scheduler's notice that the job is about to end (SIGTERM: SLURM near its time
    limit with `launch/gpu_slurm.sbatch`, a preempted TPU VM or spot instance,
    `launch/local.py` passing on a Ctrl-C'd kill). `reached(step)`, asked after every
    step, is True at one step on every process once a notice has come, so all save that
    step's checkpoint together. Several processes: JAX's preemption sync point (the
    distributed runtime catches SIGTERM and agrees on the step); one process: a SIGTERM
    handler of ours, installed for the life of this object (`close`)."""

    def __init__(self):
        import signal
        import threading

        self.noticed, self.previous, self.service = False, None, True
        if not is_multiprocess() and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._notice)

    def _notice(self, signum, frame) -> None:
        self.noticed = True

    def reached(self, step: int) -> bool:
        if is_multiprocess():
            from jax.experimental import multihost_utils

            if not self.service:
                return False
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # JAX's preemption service is off (jax_enable_preemption_service): go on without
                self.service = False
                say("note: JAX's preemption service is off, so SIGTERM will not save a checkpoint", flush=True)
                return False
        return self.noticed

    def close(self) -> None:
        if self.previous is not None:
            import signal

            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None
