#!/usr/bin/env python3
"""Start N `mixtral-jax` processes on this machine as if each were one host of a pod.

    python launch/local.py -n 4 generate "The mixture of experts" --checkpoint DIR --mesh expert=4,tensor=2

Why: a TPU pod or a GPU cluster runs the *same* command on every host, joined by
`jax.distributed`. This launcher does exactly that on one machine, so every multi-host code path
(start-up, sharded loading, collectives, "only process 0 prints") is exercised on a laptop or in CI:

- the same entry point and flags on every process (`mixtral-jax ARGS...`);
- `MIXTRAL_JAX_COORDINATOR` / `MIXTRAL_JAX_NUM_PROCESSES` / `MIXTRAL_JAX_PROCESS_ID`, which
  `mixtral_jax.sharding.distributed.initialize()` reads, with a free port on 127.0.0.1;
- `JAX_PLATFORMS=cpu` and `--xla_force_host_platform_device_count=D/N` so the N processes hold
  D simulated devices between them (D=8 by default, like one 8-chip host or an 8-GPU box);
- each process's stdout/stderr streamed as it comes, every line prefixed with `[pI]`;
- stdin goes to process 0 only (as on a pod, where only worker 0 has your terminal);
- the first process to fail takes the others down (they would otherwise wait forever in a collective),
  and its exit status becomes ours.
"""

from __future__ import annotations

import argparse
import codecs
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entry_point() -> list[str]:
    """`mixtral-jax` from this interpreter's environment (so a venv works without activating it)."""
    beside = os.path.join(os.path.dirname(sys.executable), "mixtral-jax")
    if os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which("mixtral-jax")
    return [found] if found else [sys.executable, "-m", "mixtral_jax.cli"]


def process_env(base: dict, pid: int, n: int, devices_per_process: int, port: int) -> dict:
    """The environment of process `pid`: what a pod host would have, plus a per-process CPU device count."""
    xla = re.sub(rf"{DEVICE_FLAG}=\S*", "", base.get("XLA_FLAGS", "")).strip()
    return dict(base, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{xla} {DEVICE_FLAG}={devices_per_process}".strip(),
                MIXTRAL_JAX_COORDINATOR=f"127.0.0.1:{port}", MIXTRAL_JAX_NUM_PROCESSES=str(n),
                MIXTRAL_JAX_PROCESS_ID=str(pid))


class _Pump(threading.Thread):
    """Copies one child stream to `sink`, `prefix` at the start of every line. Whole lines go out at once
    (so processes' lines do not mix); an unfinished line goes out after `patience` seconds of quiet, so
    a chat prompt or streamed tokens still show up live."""

    def __init__(self, stream, sink, prefix: str, lock: threading.Lock, patience: float = 0.2):
        super().__init__(daemon=True)
        self.stream, self.sink, self.prefix, self.lock, self.patience = stream, sink, prefix, lock, patience
        self.at_line_start = True

    def emit(self, text: str):
        if not text:
            return
        body = text[:-1].replace("\n", "\n" + self.prefix) + text[-1]
        with self.lock:
            self.sink.write((self.prefix if self.at_line_start else "") + body)
            self.sink.flush()
        self.at_line_start = text.endswith("\n")

    def run(self):
        fd, decoder, pending = self.stream.fileno(), codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
        while True:
            if pending and not select.select([fd], [], [], self.patience)[0]:
                self.emit(pending)  # quiet for a while: show the unfinished line
                pending = ""
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            lines, newline, pending = (pending + decoder.decode(chunk)).rpartition("\n")
            self.emit(lines + newline)
        self.emit(pending + ("" if self.at_line_start and not pending else "\n"))
        self.stream.close()


def run(command: list[str], n: int, devices: int = 8, port: int | None = None, timeout: float | None = None,
        grace: float = 5.0) -> int:
    """Run `command` in n processes; 0 when all succeed, else the first failure's status (124: timeout)."""
    if n < 1 or devices % n:
        raise ValueError(f"{devices} devices do not split evenly over {n} processes")
    port = port or free_port()
    lock = threading.Lock()
    procs, pumps, groups = [], [], set()
    for pid in range(n):
        # Own process groups, so stopping a process also stops anything it started; except process 0
        # when it reads a terminal (chat), which must stay in the terminal's foreground group to read it.
        own_group = pid > 0 or not sys.stdin.isatty()
        p = subprocess.Popen(command, env=process_env(os.environ, pid, n, devices // n, port),
                             stdin=None if pid == 0 else subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=own_group)
        procs.append(p)
        if own_group:
            groups.add(p.pid)
        for stream, sink in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            pumps.append(_Pump(stream, sink, f"[p{pid}] ", lock))
            pumps[-1].start()
    status, deadline = 0, None if timeout is None else time.monotonic() + timeout
    try:
        while None in (codes := [p.poll() for p in procs]):  # poll every process, each round
            failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                status = codes[failed[0]]
                print(f"local.py: process {failed[0]} exited with {status}; stopping the others", file=sys.stderr)
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"local.py: timed out after {timeout}s; stopping all processes", file=sys.stderr)
                status = 124
                break
            time.sleep(0.1)
        else:
            status = next((code for code in codes if code), 0)
    except KeyboardInterrupt:
        status = 130
    finally:
        _stop(procs, groups, grace)
        for t in pumps:
            t.join(timeout=grace)
    return status if status >= 0 else 128 - status  # killed by signal S -> 128 + S, like a shell


def _stop(procs, groups: set[int], grace: float):
    """SIGTERM the processes still running (their whole group where they lead one), then SIGKILL what is
    left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            try:
                if p.pid in groups:
                    os.killpg(p.pid, sig)
                else:
                    p.send_signal(sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace
        while any(p.poll() is None for p in alive) and time.monotonic() < end:
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch/local.py", allow_abbrev=False,
        description="Run `mixtral-jax ARGS...` in N local processes joined by jax.distributed (CPU, gloo).",
        epilog="Everything after the options is passed to every process unchanged, e.g. "
               "`-n 2 generate 'Hi' --checkpoint DIR --mesh data=2,expert=4`.")
    parser.add_argument("-n", "--num-processes", type=int, default=2, help="processes (simulated hosts), default 2")
    parser.add_argument("--devices", type=int, default=8, help="CPU devices over all processes (default 8)")
    parser.add_argument("--port", type=int, help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--timeout", type=float, help="stop everything after this many seconds (exit 124)")
    parser.add_argument("--exec", dest="program", help="run this program instead of mixtral-jax (debugging)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the mixtral-jax subcommand and its arguments")
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    if not args:
        parser.error("give the mixtral-jax subcommand to run, e.g. generate 'Hello' --mesh data=2,expert=4")
    command = [ns.program] + args if ns.program else entry_point() + args
    try:
        return run(command, ns.num_processes, ns.devices, ns.port, ns.timeout)
    except ValueError as e:
        print(f"local.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
