"""Several local processes joined by `jax.distributed` (gloo on 127.0.0.1), as on a multi-host slice."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.helpers import REPO_ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(n: int, script: str, args: list[str], *, devices: int = 8, timeout: float = 240) -> list[str]:
    """Run `tests/helpers/<script>` ARGS as processes 0..n-1 of one job (`devices` CPU devices in all);
    returns their outputs, asserting that every one exited cleanly."""
    port = free_port()
    procs = []
    for pid in range(n):
        env = dict(os.environ, JAX_PLATFORMS="cpu", MIXTRAL_JAX_COORDINATOR=f"127.0.0.1:{port}",
                   MIXTRAL_JAX_NUM_PROCESSES=str(n), MIXTRAL_JAX_PROCESS_ID=str(pid), PYTHONPATH=REPO_ROOT,
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices // n}")
        procs.append(subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "tests", "helpers", script), *args],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(stdout)
        assert p.returncode == 0, stdout[-3000:]
    return outputs
