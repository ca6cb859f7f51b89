"""Multi-host start-up: one `initialize()` for Cloud TPU VMs, SLURM, GPU clusters and local CPU processes.

On a Cloud TPU VM slice (and under SLURM), `jax.distributed.initialize()` finds everything itself.
Elsewhere the coordinator address, the number of processes and this process's id come from the
arguments or from `MIXTRAL_JAX_COORDINATOR`, `MIXTRAL_JAX_NUM_PROCESSES`, `MIXTRAL_JAX_PROCESS_ID`
(what `launch/` sets). On CPU, collectives across processes go through gloo.
"""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "MIXTRAL_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MIXTRAL_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MIXTRAL_JAX_PROCESS_ID"


def on_cloud_tpu_vm() -> bool:
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID")
                or os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0"))


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, local_device_ids=None) -> None:
    """Join this process to the others. A single process (nothing configured) is left as it is."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if coordinator is None and num_processes is None:
        if on_cloud_tpu_vm() or "SLURM_JOB_ID" in os.environ:
            jax.distributed.initialize()  # auto-detected from the TPU metadata / SLURM environment
        return
    if coordinator is None or num_processes is None or process_id is None:
        raise ValueError("multi-process start needs a coordinator address, the number of processes and this "
                         f"process's id (flags or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside [0, {num_processes})")
    if (os.environ.get("JAX_PLATFORMS") or "").startswith("cpu") or jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids)
