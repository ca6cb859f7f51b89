"""`mixtral-jax serve` in a subprocess (the demo model, 127.0.0.1), as users run it, with raw-socket helpers for
the requests no well-behaved client sends. Every wait is bounded."""

import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tests.helpers.processes import free_port  # noqa: F401 - re-exported for the serving tests

MODEL = "mixtral-jax-demo"


def raise_open_files(wanted: int) -> int:
    """Raise this process's soft open-file limit to at least `wanted` (the hard limit permitting); children
    inherit it. Returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard),
                                                    hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@contextlib.contextmanager
def serve_process(*flags: str, env: dict | None = None, startup_s: float = 300, warmup: bool = False):
    """Yields (process, base URL, port) once /health answers; the process is killed at exit. Without
    `warmup`, `--no-warmup` (step shapes compile when first used: the tests here are about other things,
    and tests/serving/test_serve.py starts its servers warmed up)."""
    port = free_port()
    flags = flags if warmup else (*flags, "--no-warmup")
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu") | (env or {})
    proc = subprocess.Popen([sys.executable, "-m", "mixtral_jax.cli", "serve", "--port", str(port), *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_s
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{proc.stdout.read()}")
            try:
                if get(base, "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"server did not come up in {startup_s} s"
            time.sleep(0.5)
        yield proc, base, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def get(base, path, timeout=30, headers=None):
    req = urllib.request.Request(f"{base}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def post(base, path, data: bytes | dict, timeout=120, headers=None):
    """(status, JSON body, response headers by lower-case name)."""
    data = json.dumps(data).encode() if isinstance(data, dict) else data
    req = urllib.request.Request(f"{base}{path}", data=data,
                                 headers={"Content-Type": "application/json"} | (headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), {k.lower(): v for k, v in e.headers.items()}


def metric(base, name, labels: str = "", headers=None) -> float:
    """A sample from /metrics: `name{labels}` (0 when a labelled counter has not been touched yet)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in get(base, "/metrics", headers=headers)[1].splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[1])
    if labels:
        return 0.0
    raise AssertionError(f"{wanted} not in /metrics")


def raw_exchange(port: int, data: bytes, timeout: float = 30, then_send: bytes = b"") -> bytes:
    """Send `data` on a fresh connection, then `then_send` (ignoring a closed pipe), and read until the server
    closes; the bytes it answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        with contextlib.suppress(OSError):
            s.sendall(then_send)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return out


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


def body_of(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


def wait_for(condition, timeout: float = 60, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True
