"""What this machine can really stream from memory, with every core: the ceiling for weight-bound decode.

    python -m bench.bandwidth            # each method's GB/s and the best one

A single-threaded `np.copyto` (the bench's old probe) reports well under what a multi-threaded engine
streams: llama.cpp's f32 decode reads its weights faster than that copy does. So several methods run, and
the best one counts:

- `copy`:         numpy copy, read + write counted, one thread.
- `sum`:          numpy float32 sum, read only, one thread.
- `sum_threads`:  the same sum split over one Python thread per core (numpy drops the GIL in reductions).
- `blas_matvec`:  numpy (BLAS) float32 matrix-vector product, the decode pattern, BLAS's own threads.
- `xla_matvec`:   the same product jitted by XLA, the engine our decode runs on.

Each method reads a buffer well past the last-level cache (256 MiB by default), best of a few runs.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BYTES = 256 * 2**20


def _best_time(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: page faults, compilation, thread pools
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def copy(n_bytes: int, reps: int) -> float:
    src = np.ones(n_bytes // 4, np.float32)
    dst = np.empty_like(src)
    return 2 * n_bytes / _best_time(lambda: np.copyto(dst, src), reps)


def read_sum(n_bytes: int, reps: int) -> float:
    a = np.ones(n_bytes // 4, np.float32)
    return n_bytes / _best_time(lambda: a.sum(), reps)


def read_sum_threads(n_bytes: int, reps: int, threads: int | None = None) -> float:
    threads = threads or os.cpu_count() or 1
    a = np.ones(n_bytes // 4, np.float32)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as pool:
        return n_bytes / _best_time(lambda: list(pool.map(np.sum, parts)), reps)


def _matrix_shape(n_bytes: int) -> tuple[int, int]:
    cols = 4096
    return max(1, n_bytes // (4 * cols)), cols


def blas_matvec(n_bytes: int, reps: int) -> float:
    m = np.ones(_matrix_shape(n_bytes), np.float32)
    x = np.ones(m.shape[1], np.float32)
    return m.nbytes / _best_time(lambda: m @ x, reps)


def xla_matvec(n_bytes: int, reps: int) -> float:
    m = jnp.ones(_matrix_shape(n_bytes), jnp.float32)
    x = jnp.ones(m.shape[1], jnp.float32)
    f = jax.jit(lambda m, x: m @ x)
    return m.nbytes / _best_time(lambda: f(m, x).block_until_ready(), reps)


METHODS: dict[str, Callable[[int, int], float]] = {
    "copy": copy, "sum": read_sum, "sum_threads": read_sum_threads, "blas_matvec": blas_matvec,
    "xla_matvec": xla_matvec,
}


def probe(n_bytes: int = DEFAULT_BYTES, reps: int = 5,
          methods: dict[str, Callable[[int, int], float]] | None = None) -> tuple[str, float, dict[str, float]]:
    """(best method, its bytes/s, every method's bytes/s). A method that fails is left out; none left is an error."""
    if n_bytes < 2**20:
        raise ValueError(f"n_bytes must be at least 1 MiB to measure memory rather than cache, got {n_bytes}")
    results = {}
    for name, method in (methods or METHODS).items():
        try:
            results[name] = method(n_bytes, reps)
        except Exception as e:  # e.g. not enough memory for this method's buffers
            print(f"bandwidth method {name} failed: {type(e).__name__}: {e}")
    if not results:
        raise RuntimeError("every bandwidth method failed")
    best = max(results, key=results.get)
    return best, results[best], results


def describe(best: str, results: dict[str, float]) -> str:
    """One line: the figure that counts and how each method did."""
    others = ", ".join(f"{name} {v / 1e9:.1f}" for name, v in results.items())
    return f"memory bandwidth {results[best] / 1e9:.1f} GB/s (best of: {others})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=DEFAULT_BYTES // 2**20, help="buffer size per method")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    best, _, results = probe(args.mib * 2**20, args.reps)
    print(describe(best, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
