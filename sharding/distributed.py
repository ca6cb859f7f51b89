"""Multi-host start-up: one `initialize()` for Cloud TPU VMs, SLURM, GPU clusters and local CPU processes.

Explicit settings win: the arguments, or `MIXTRAL_JAX_COORDINATOR`, `MIXTRAL_JAX_NUM_PROCESSES`,
`MIXTRAL_JAX_PROCESS_ID` (what `launch/` sets). Without them a process joins others only on evidence
that others exist, never on the mere presence of a variable:

- a Cloud TPU VM is one whose PCI bus holds TPU chips (JAX's own test, the same one that makes JAX
  load libtpu), or whose `TPU_WORKER_HOSTNAMES` lists two or more real host names with a numeric
  `TPU_WORKER_ID`. Why not "any `TPU_*` variable": once a process has loaded libtpu on a machine without
  TPUs, libtpu sets `TPU_WORKER_ID` and `CLOUD_TPU_TASK_ID` to warning sentences, and every child process
  (a notebook's `!mixtral-jax ...`, a script's subprocess) inherits them;
- under SLURM, a job step of two or more tasks (`SLURM_NTASKS`, `SLURM_PROCID`, ... as JAX reads them);
  an `salloc` shell or a one-task job stays one process.

On CPU, collectives across processes go through gloo.
"""

from __future__ import annotations

import glob
import ipaddress
import logging
import os
import re

import jax

try:  # private: JAX's PCI scan for TPU chips, guarded (tpu_chip_count falls back to the same scan of its own)
    from jax._src.hardware_utils import num_available_tpu_chips_and_device_id as _jax_tpu_chips
except ImportError:
    _jax_tpu_chips = None

ENV_COORDINATOR = "MIXTRAL_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "MIXTRAL_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MIXTRAL_JAX_PROCESS_ID"
TPU_COORDINATOR_PORT = 8482  # the port JAX's own Cloud TPU cluster detection uses
# what JAX's SLURM cluster detection reads (jax._src.clusters.slurm_cluster)
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}"
                       r"[A-Za-z0-9])?)*")
_GOOGLE_PCI_VENDOR = "0x1ae0"

log = logging.getLogger(__name__)


def tpu_chip_count() -> int:
    """TPU chips attached to this machine: JAX's PCI scan (what decides whether JAX loads libtpu at all),
    or, where that private helper is missing, Google TPU functions on the PCI bus and `/dev/accel*`."""
    if _jax_tpu_chips is not None:
        return int(_jax_tpu_chips()[0])
    google = 0
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                google += f.read().strip() == _GOOGLE_PCI_VENDOR
        except OSError:
            continue
    return google or len(glob.glob("/dev/accel[0-9]*"))


def is_host(value: str) -> bool:
    """A host name or IP address (optionally `:port`), as TPU worker lists hold them; a sentence is not."""
    value = value.strip()
    if value.count(":") == 1:  # host:port
        value, port = value.split(":")
        if not port.isdigit():
            return False
    try:
        ipaddress.ip_address(value.strip("[]"))
        return True
    except ValueError:
        return bool(_HOSTNAME.fullmatch(value))


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def tpu_workers_from_env() -> tuple[list[str], int] | None:
    """(worker hosts, this worker's index) from `TPU_WORKER_HOSTNAMES` and `TPU_WORKER_ID` (or
    `CLOUD_TPU_TASK_ID`) when they are real values of a slice of two or more hosts; None otherwise."""
    hosts = [h.strip() for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    worker = _int(os.environ.get("TPU_WORKER_ID"))
    if worker is None:
        worker = _int(os.environ.get("CLOUD_TPU_TASK_ID"))
    if len(hosts) < 2 or not all(is_host(h) for h in hosts) or worker is None or worker >= len(hosts):
        return None
    return hosts, worker


def on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM (TPU chips here) or a worker of a multi-host slice (real worker variables)."""
    return tpu_chip_count() > 0 or tpu_workers_from_env() is not None


def slurm_tasks() -> int | None:
    """The number of tasks of this SLURM job step when JAX can start from it (all its variables set)."""
    if not all(v in os.environ for v in _SLURM_VARS):
        return None
    return _int(os.environ["SLURM_NTASKS"])


def detect_cluster() -> str | None:
    """'tpu', 'tpu-env', 'slurm', or None (one process): how `initialize()` would join other processes."""
    if tpu_chip_count() > 0:
        return "tpu"
    if tpu_workers_from_env() is not None:
        return "tpu-env"
    if (slurm_tasks() or 0) > 1:
        return "slurm"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, local_device_ids=None) -> None:
    """Join this process to the others. A single process (nothing configured or detected) is left as it is."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    if coordinator is None and num_processes is None:
        cluster = detect_cluster()
        if cluster in ("tpu", "slurm"):
            log.info("joining the other processes (%s, detected by jax.distributed)", cluster)
            jax.distributed.initialize()  # JAX reads the TPU metadata / the SLURM variables itself
        elif cluster == "tpu-env":
            hosts, worker = tpu_workers_from_env()
            address = hosts[0].rsplit(":", 1)[0] if hosts[0].count(":") == 1 else hosts[0]
            log.info("joining %d TPU workers as worker %d (TPU_WORKER_HOSTNAMES)", len(hosts), worker)
            jax.distributed.initialize(f"{address}:{TPU_COORDINATOR_PORT}", len(hosts), worker)
        return
    if coordinator is None or num_processes is None or process_id is None:
        raise ValueError("multi-process start needs a coordinator address, the number of processes and this "
                         f"process's id (flags or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside [0, {num_processes})")
    if (os.environ.get("JAX_PLATFORMS") or "").startswith("cpu") or jax.config.jax_platforms == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("joining %d processes as process %d (coordinator %s)", num_processes, process_id, coordinator)
    jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids)
