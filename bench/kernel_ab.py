"""Two (or more) versions of the CPU kernels' source, timed in one process on the bench model's weights.

    python -m bench.kernel_ab --hf-dir DIR HEAD~1 HEAD               # git revisions of cpu_matvec.cc
    python -m bench.kernel_ab --hf-dir DIR --dtype int8 old.cc new.cc --reps 200

On a machine whose memory bandwidth moves from minute to minute (other tenants), two processes timed one
after the other say little about a few percent. Here every version is compiled, registered with XLA under
its own FFI names (`mixtral_matvec_v0`, ...) and called in turn, one decode step's weight reads each
(per layer q, k, v and o as separate products, the MoE with a fixed routing of two experts; then the LM
head), so background load falls on all of them alike. Prints best and median ms per version. Each source
must keep the handler symbols `MixtralMatvec` and `MixtralMoe` with single-weight matvec calls.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from bench.decode_profile import _model
from mixtral_jax.kernels import cpu as cpu_kernels
from mixtral_jax.model.mixtral import _read
from mixtral_jax.model.placement import quantize_model

HANDLERS = {"MixtralMatvec": "mixtral_matvec", "MixtralMoe": "mixtral_moe"}
KERNEL_PATH = "mixtral_jax/kernels/cpu_matvec.cc"


def source_text(version: str) -> str:
    """A kernel source file's text, or `cpu_matvec.cc` at a git revision of this repository."""
    if os.path.exists(version):
        return Path(version).read_text(encoding="utf-8")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["git", "show", f"{version}:{KERNEL_PATH}"], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{version!r} is neither a file nor a git revision with {KERNEL_PATH}")
    return done.stdout


def renamed(text: str, index: int) -> str:
    """The source with its FFI handler symbols suffixed `V<index>`, so several builds load side by side."""
    for symbol in HANDLERS:
        old = f"XLA_FFI_DEFINE_HANDLER_SYMBOL({symbol},"
        if old not in text:
            raise SystemExit(f"version {index} defines no {symbol} handler")
        text = text.replace(old, f"XLA_FFI_DEFINE_HANDLER_SYMBOL({symbol}V{index},")
    return text


def register(text: str, index: int, workdir: str) -> None:
    """Build one renamed version (`cpu_kernels.build`: its flags and cache) and register its handlers."""
    src = Path(workdir) / f"v{index}.cc"
    src.write_text(renamed(text, index), encoding="utf-8")
    try:
        lib = cpu_kernels.build(src)
    except RuntimeError as e:
        raise SystemExit(f"version {index}: {e}") from None
    handle = ctypes.cdll.LoadLibrary(str(lib))
    for symbol, target in HANDLERS.items():
        jax.ffi.register_ffi_target(f"{target}_v{index}", jax.ffi.pycapsule(getattr(handle, f"{symbol}V{index}")),
                                    platform="cpu")


def step_weights(model):
    """Per layer (q, k, v, o, (w1, w3, w2)) as kernel operands (values, scales), and the LM head's."""
    def flat(name, module, rows):
        values, scale = cpu_kernels._operand(_read(module, name, None))
        return values.reshape(rows, -1), scale.reshape(-1)

    d = model.config.dim
    layers = [tuple(flat(n, layer.attn, d) for n in ("wq", "wk", "wv"))
              + (flat("wo", layer.attn, model.config.n_heads * model.config.head_dim),
                 tuple(cpu_kernels._operand(_read(layer.moe, n, None)) for n in ("w1", "w3", "w2")))
              for layer in model.layers]
    return layers, flat("lm_head", model, d)


def step_fn(index: int, n_experts: int):
    """One decode step's kernel calls through version `index`'s handlers."""
    def matvec(x, w):
        out = jax.ShapeDtypeStruct((x.shape[0], w[0].shape[1]), jnp.float32)
        return jax.ffi.ffi_call(f"mixtral_matvec_v{index}", out)(x, *w)

    @jax.jit
    def step(x, layers, head):
        for i, (wq, wk, wv, wo, ((v1, s1), (v3, s3), (v2, s2))) in enumerate(layers):
            q, k, v = matvec(x, wq), matvec(x, wk), matvec(x, wv)
            attn = q + jnp.resize(k + v, q.shape)  # stands in for attention: a data dependency
            x = x + matvec(attn, wo) * 1e-3
            ids = jnp.array([[i % n_experts, (i + 3) % n_experts]], jnp.int32)
            moe = jax.ffi.ffi_call(f"mixtral_moe_v{index}", jax.ShapeDtypeStruct(x.shape, jnp.float32))
            x = x + moe(x, ids, jnp.full((1, 2), 0.5, jnp.float32), v1, s1, v3, s3, v2, s2) * 1e-3
        return matvec(x, head)

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("versions", nargs="+", help="kernel source files or git revisions")
    p.add_argument("--hf-dir", help="a saved bench model (written here when missing)")
    p.add_argument("--dtype", choices=("float32", "int8"), default="float32",
                   help="the weights' dtype (int8: the LM head too)")
    p.add_argument("--reps", type=int, default=100)
    args = p.parse_args(argv)
    if not cpu_kernels.available():
        raise SystemExit("the CPU kernels are unavailable here (no compiler, not a CPU backend, or turned off)")
    model = _model(args.hf_dir)
    if args.dtype == "int8":
        model = quantize_model(model, lm_head=True)
    model.use_huge_pages()
    layers, head = step_weights(model)
    with tempfile.TemporaryDirectory() as workdir:
        for i, version in enumerate(args.versions):
            register(source_text(version), i, workdir)
        steps = [step_fn(i, model.config.n_experts) for i in range(len(args.versions))]
        x = jnp.ones((1, model.config.dim), jnp.float32)
        for step in steps:
            step(x, layers, head).block_until_ready()  # compiled outside the timing
        times: list[list[float]] = [[] for _ in steps]
        for _ in range(args.reps):
            for i, step in enumerate(steps):
                start = time.perf_counter()
                step(x, layers, head).block_until_ready()
                times[i].append(time.perf_counter() - start)
    for version, t in zip(args.versions, times):
        print(f"{args.dtype} {version:<24} best {min(t) * 1e3:7.3f} ms  median {statistics.median(t) * 1e3:7.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
