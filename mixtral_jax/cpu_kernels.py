"""CPU kernels for the decode step's weight reads, through the XLA FFI (`kernels/cpu_matvec.cc`).

Why: decoding a few tokens on CPU is bound by how fast the weights stream from memory. XLA:CPU's dot
streams a matrix-vector product at ~60% of what the machine gives, casts int8 weights into a float
copy before every dot, and the grouped MoE pays a conditional per expert. These kernels read each weight
once, in its stored dtype, on XLA's own intra-op threads:

- `matvec(x, w)`: `x @ w` for a few rows of `x` (float32, bfloat16, or int8 `QArray` weights);
- `moe(x, routing, w1, w3, w2)`: the experts' SwiGLU for a few tokens, reading only the experts used.

The C++ source is compiled on first use with the machine's C++ compiler (`-O3 -march=native`, against
the XLA FFI headers that jaxlib ships) into a cache keyed by source, compiler, flags, jaxlib and CPU
(`$MIXTRAL_JAX_CACHE`, else `$XDG_CACHE_HOME/mixtral_jax` or `~/.cache/mixtral_jax`). Without a
compiler, on another backend, on a mesh, or with `MIXTRAL_JAX_CPU_KERNELS=0`, callers use XLA's own
ops instead (`usable` says which): the numbers agree to float32 rounding either way.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).parent / "kernels" / "cpu_matvec.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
MAX_ROWS = 16  # rows of x up to which a kernel beats XLA's dot (a decode batch, an expert's bucket)
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.int8)  # weight dtypes the kernels read
_TARGETS = {"mixtral_matvec": "MixtralMatvec", "mixtral_moe": "MixtralMoe"}


def _cpu_id() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def cache_dir() -> Path:
    root = os.environ.get("MIXTRAL_JAX_CACHE")
    if root:
        return Path(root) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mixtral_jax" / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build() -> Path:
    """The compiled kernel library (compiled now unless cached); raises `RuntimeError` saying why not."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++ or clang++)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([SOURCE.read_text(encoding="utf-8"), cxx, *FLAGS, jax.__version__,
                                    getattr(jax.lib, "__version__", ""), _cpu_id()]).encode()).hexdigest()[:20]
    target = cache_dir() / f"cpu_matvec-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # same filesystem: the rename is atomic
        out = Path(tmp) / target.name
        cmd = [cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"compiling {SOURCE.name} failed: {tail}")
        os.replace(out, target)
    return target


@functools.cache
def available() -> bool:
    """Whether the kernels are registered with XLA:CPU in this process (built on the first call)."""
    if os.environ.get("MIXTRAL_JAX_CPU_KERNELS", "1") in ("0", "false", "no", "off"):
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        print(f"mixtral-jax: CPU kernels unavailable, using XLA's dot ({e})", file=sys.stderr)
        return False
    return True


def usable(rows: int, *weights) -> bool:
    """Whether a product of `rows` rows of activations (with these weights, when given) should go through
    the kernels: a few rows, weights of a dtype they read, the CPU backend, kernels built. The caller
    vouches for one device (a custom call has no sharding rule)."""
    return (0 < rows <= MAX_ROWS and all(_values(w).dtype in _DTYPES for w in weights)
            and jax.default_backend() == "cpu" and available())


def _values(w):
    """The stored array of a float weight or an int8 `QArray` (quant imports this module: duck-typed)."""
    return w.q if hasattr(w, "q") else w


def _operand(w):
    """(values, scales) of a float array or an int8 `QArray` (scales empty for float weights)."""
    if hasattr(w, "q"):
        return w.q, w.scale.astype(jnp.float32)
    return w, jnp.zeros((0,), jnp.float32)


def matvec(x: jax.Array, w, out_dtype=None) -> jax.Array:
    """`x @ w` for x (..., D) and w (D, F) (float32/bfloat16 array, or an int8 `QArray` whose scale is
    (F,)), accumulated in float32, returned in `out_dtype` (default x's). Differentiable (the tangent is
    XLA's dot)."""
    lead, d = x.shape[:-1], x.shape[-1]
    values, scale = _operand(w)
    if values.ndim != 2 or values.shape[0] != d or scale.shape not in ((0,), (values.shape[1],)):
        raise ValueError(f"matvec: x (..., {d}) needs w ({d}, F) and scales (F,); got {values.shape}, {scale.shape}")
    rows = x.reshape(-1, d).astype(jnp.float32)
    y = _matvec(rows, values, scale)
    return y.reshape(*lead, values.shape[1]).astype(out_dtype or x.dtype)


@jax.custom_jvp
def _matvec(x, values, scale):
    call = jax.ffi.ffi_call("mixtral_matvec", jax.ShapeDtypeStruct((x.shape[0], values.shape[1]), jnp.float32),
                            vmap_method="sequential")
    return call(x, values, scale)


@_matvec.defjvp
def _matvec_jvp(primals, tangents):
    x, values, scale = primals
    dx, dvalues, dscale = tangents
    y = _matvec(x, values, scale)
    quantized = scale.shape[0] > 0
    w = values.astype(jnp.float32) * (scale if quantized else 1)
    dy = dx @ w
    if quantized:  # int8 values have no tangent; the scales do
        dy = dy + (x @ values.astype(jnp.float32)) * dscale
    else:
        dy = dy + x @ dvalues.astype(jnp.float32)
    return y, dy


def moe(x: jax.Array, expert_ids: jax.Array, gates: jax.Array, w1, w3, w2) -> jax.Array:
    """`sum_k gates[t, k] * swiglu_{expert_ids[t, k]}(x_t)` for x (t, D), reading only the experts used.
    w1, w3 (E, D, F) and w2 (E, F, D): float arrays or int8 `QArray`s, all alike. No derivative of its
    own: `moe.moe_kernel` gives it one."""
    v1, s1 = _operand(w1)
    v3, s3 = _operand(w3)
    v2, s2 = _operand(w2)
    call = jax.ffi.ffi_call("mixtral_moe", jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="sequential")
    y = call(x.astype(jnp.float32), expert_ids.astype(jnp.int32), gates.astype(jnp.float32), v1, s1, v3, s3, v2, s2)
    return y.astype(x.dtype)


def einsum(spec: str, x: jax.Array, w, preferred_element_type=None, **other) -> jax.Array | None:
    """`matvec` for an einsum of the model's weight shapes (`btd,dhx->bthx`, `bthx,hxd->btd`,
    `btd,dv->btv`: x's contracted letters last, w's first, in the same order) with few rows, where the
    kernels are usable; else None (the caller then runs the einsum)."""
    if other or "->" not in spec or "." in spec:
        return None
    inputs, out = spec.split("->")
    xs, ws = inputs.split(",")
    if any(len(set(letters)) != len(letters) for letters in (xs, ws, out)):
        return None
    n = len(xs) - len(xs.rstrip("".join(c for c in xs if c in ws)))  # trailing letters shared with w
    contracted = xs[len(xs) - n:]
    lead = x.shape[: len(xs) - n]
    if (not n or not ws.startswith(contracted) or out != xs[: len(xs) - n] + ws[n:]
            or set(xs[: len(xs) - n]) & set(ws) or not usable(math.prod(lead), w)):
        return None
    values = _values(w)
    d = math.prod(values.shape[:n])
    f = values.size // d
    if hasattr(w, "q"):
        if w.scale.shape != values.shape[n:]:
            return None
        w2d = type(w)(values.reshape(d, f), w.scale.reshape(f))
    else:
        w2d = values.reshape(d, f)
    return matvec(x.reshape(*lead, d), w2d, preferred_element_type).reshape(*lead, *values.shape[n:])
