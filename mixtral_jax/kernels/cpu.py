"""CPU kernels for the decode step, through the XLA FFI (`kernels/cpu_matvec.cc`).

Why: decoding a few tokens on CPU is bound by how fast the weights stream from memory. XLA:CPU's dot
streams a matrix-vector product at ~60% of what the machine gives, casts int8 weights into a float
copy before every dot, and the grouped MoE pays a conditional per expert. These kernels read each weight
once, in its stored dtype, on their own worker threads:

- `matvec(x, w)`: `x @ w` for a few rows of `x` (float32, bfloat16, or int8 `QArray` weights);
- `moe(x, routing, w1, w3, w2)`: the experts' SwiGLU for a few tokens, reading only the experts used;
- `attend(q, k, v, mask)`: attention for a few queries over a KV cache in one call (XLA spends ~20 small
  ops and a transposed copy of the keys on it), never reading the slots the mask hides;
- `huge_page_tree(weights)`: the weights moved into 2 MiB transparent huge pages (Linux), which the
  kernels (and XLA's own dots) stream 10-25% faster than 4 KiB pages: a decode step reads hundreds of
  MB, and with small pages the TLB misses cost as much as the arithmetic.

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
import logging
import math
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.progress import progress

SOURCE = Path(__file__).parent / "cpu_matvec.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
MAX_ROWS = 16  # rows of x up to which a kernel beats XLA's dot (a decode batch, an expert's bucket)
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.int8)  # weight dtypes the kernels read
_TARGETS = {"mixtral_matvec": "MixtralMatvec", "mixtral_moe": "MixtralMoe", "mixtral_attend": "MixtralAttend"}


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


def build(source: Path | None = None) -> Path:
    """The compiled kernel library (compiled now unless cached); raises `RuntimeError` saying why not.
    `source`: another version of the kernels' source (`bench.kernel_ab` times several side by side)."""
    source = SOURCE if source is None else Path(source)
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++ or clang++)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([source.read_text(encoding="utf-8"), cxx, *FLAGS, jax.__version__,
                                    getattr(jax.lib, "__version__", ""), _cpu_id()]).encode()).hexdigest()[:20]
    target = cache_dir() / f"cpu_matvec-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # same filesystem: the rename is atomic
        out = Path(tmp) / target.name
        cmd = [cxx, *FLAGS, f"-I{include}", str(source), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"compiling {source.name} failed: {tail}")
        os.replace(out, target)
    return target


@functools.cache
def available() -> bool:
    """Whether the kernels are registered with XLA:CPU in this process (built on the first call)."""
    if not enabled():
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError) as e:
        logging.getLogger(__name__).warning("mixtral-jax: CPU kernels unavailable, using XLA's dot (%s)", e)
        return False
    return True


HUGE_PAGE = 2 << 20  # x86-64 and arm64 Linux's transparent huge page
_in_huge_pages: set[int] = set()  # buffer addresses of the arrays `huge_page_copy` made (live ones only)


def enabled() -> bool:
    """`MIXTRAL_JAX_CPU_KERNELS=0` turns off the kernels and the huge pages: plain XLA, as on any machine."""
    return os.environ.get("MIXTRAL_JAX_CPU_KERNELS", "1").lower() not in ("0", "false", "no", "off")


@functools.cache
def huge_pages_possible() -> bool:
    """Linux with transparent huge pages offered to `madvise` (or always) and the CPU backend."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="utf-8") as f:
            offered = "[never]" not in f.read()
    except OSError:
        return False
    return offered and hasattr(mmap, "MADV_HUGEPAGE") and enabled() and jax.default_backend() == "cpu"


def huge_page_copy(a: jax.Array) -> jax.Array:
    """`a`'s values on its (CPU) device, in memory advised as huge pages before it is touched, so the
    kernel backs it with 2 MiB pages; `a` itself where that is not possible or already so. The new array
    owns that memory (JAX aliases the buffer and keeps it alive), and is an ordinary array otherwise."""
    if (not huge_pages_possible() or not isinstance(a, jax.Array) or a.nbytes < HUGE_PAGE
            or len(a.devices()) != 1 or a.unsafe_buffer_pointer() in _in_huge_pages):
        return a
    host = np.asarray(a)  # a view of a CPU array's buffer, no copy
    memory = mmap.mmap(-1, host.nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(memory, np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    view = raw[start:start + host.nbytes].view(host.dtype).reshape(host.shape)
    view[...] = host
    out = jax.device_put(view, next(iter(a.devices())), may_alias=True)
    address = out.unsafe_buffer_pointer()
    if address != view.ctypes.data:  # jax copied it after all: nothing gained
        return a
    _in_huge_pages.add(address)
    weakref.finalize(memory, _in_huge_pages.discard, address)  # when the last array holding it goes
    return out


def huge_page_tree(tree):
    """`tree` with each array of at least 2 MiB on one CPU device moved by `huge_page_copy`, and the bytes
    moved: one array at a time, so the extra memory is one array's. Shows progress above 4 GiB (a full
    8x7B takes ~10 s)."""
    if not huge_pages_possible():
        return tree, 0
    leaves, treedef = jax.tree.flatten(tree)
    candidates = sum(a.nbytes for a in leaves if isinstance(a, jax.Array) and a.nbytes >= HUGE_PAGE)
    moved, out = 0, []
    with progress(candidates >> 20, "moving weights into huge pages", "MiB", enabled=candidates > 4 << 30) as bar:
        for a in leaves:
            new = huge_page_copy(a)
            if new is not a:
                moved += a.nbytes
                bar.advance(a.nbytes >> 20)
            out.append(new)
    return jax.tree.unflatten(treedef, out), moved


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
    return matvecs(x, [w], out_dtype)[0]


def matvecs(x: jax.Array, ws, out_dtype=None) -> list[jax.Array]:
    """`[x @ w for w in ws]` (each as `matvec`'s w) in one kernel call: one parallel region for the
    attention's three projections instead of three (~50 us a decode step of 8 layers)."""
    lead, d = x.shape[:-1], x.shape[-1]
    operands = []
    for w in ws:
        values, scale = _operand(w)
        if values.ndim != 2 or values.shape[0] != d or scale.shape not in ((0,), (values.shape[1],)):
            raise ValueError(f"matvec: x (..., {d}) needs w ({d}, F) and scales (F,); got {values.shape}, "
                             f"{scale.shape}")
        operands += [values, scale]
    ys = _matvecs(x.reshape(-1, d).astype(jnp.float32), *operands)
    return [y.reshape(*lead, y.shape[1]).astype(out_dtype or x.dtype) for y in ys]


@jax.custom_jvp
def _matvecs(x, *operands):
    shapes = [jax.ShapeDtypeStruct((x.shape[0], values.shape[1]), jnp.float32) for values in operands[::2]]
    return tuple(jax.ffi.ffi_call("mixtral_matvec", shapes, vmap_method="sequential")(x, *operands))


@_matvecs.defjvp
def _matvecs_jvp(primals, tangents):
    x, *operands = primals
    dx, *d_operands = tangents
    ys = _matvecs(x, *operands)
    dys = []
    for values, scale, dvalues, dscale in zip(operands[::2], operands[1::2], d_operands[::2], d_operands[1::2]):
        quantized = scale.shape[0] > 0
        w = values.astype(jnp.float32) * (scale if quantized else 1)
        dy = dx @ w
        if quantized:  # int8 values have no tangent; the scales do
            dy = dy + (x @ values.astype(jnp.float32)) * dscale
        else:
            dy = dy + x @ dvalues.astype(jnp.float32)
        dys.append(dy)
    return ys, tuple(dys)


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


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, k_scale=None, v_scale=None) -> jax.Array:
    """`mixtral_jax.model.attention.attend_plain`'s numbers from a mask: q (b, t, h, x) float32; k, v (b, kh, s, x)
    float32/bfloat16/int8 (int8 with float32 scales (b, kh, s)); mask (b, t, s). Returns (b, t, h, x)
    float32. No derivative of its own: `attention` gives it one."""
    empty = jnp.zeros((0,), jnp.float32)
    call = jax.ffi.ffi_call("mixtral_attend", jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    return call(q, k, v, empty if k_scale is None else k_scale.astype(jnp.float32),
                empty if v_scale is None else v_scale.astype(jnp.float32), mask)


def einsum(spec: str, x: jax.Array, w, preferred_element_type=None, **other) -> jax.Array | None:
    """`matvec` for an einsum of the model's weight shapes (`btd,dhx->bthx`, `bthx,hxd->btd`,
    `btd,dv->btv`: x's contracted letters last, w's first, in the same order) with few rows, where the
    kernels are usable; else None (the caller then runs the einsum)."""
    ys = einsums([spec], x, [w], preferred_element_type, **other)
    return None if ys is None else ys[0]


def einsums(specs, x: jax.Array, ws, preferred_element_type=None, **other) -> list[jax.Array] | None:
    """`einsum` for several weights against one x, in one kernel call (`matvecs`); None unless every
    one of them can take the kernels."""
    if other:
        return None
    parsed = [_as_matvec(spec, x, w) for spec, w in zip(specs, ws, strict=True)]
    if not parsed or any(p is None for p in parsed) or len({p[0] for p in parsed}) != 1:
        return None
    lead, d = parsed[0][0]
    ys = matvecs(x.reshape(*lead, d), [w2d for _, w2d, _ in parsed], preferred_element_type)
    return [y.reshape(*lead, *out) for y, (_, _, out) in zip(ys, parsed)]


def _as_matvec(spec: str, x: jax.Array, w):
    """((lead, D), w as (D, F), w's output dims) for an einsum `matvec` can run, else None."""
    if "->" not in spec or "." in spec:
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
    return (tuple(lead), d), w2d, values.shape[n:]
