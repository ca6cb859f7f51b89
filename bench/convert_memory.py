"""Peak memory and throughput of `mixtral-jax convert` on a random Mixtral-shaped checkpoint.

Writes a random Hugging Face-format checkpoint (config.json, sharded bf16 safetensors with an index, the
per-expert hub keys) straight from numpy, one tensor at a time, then converts it in a subprocess and
reports the subprocess's peak RSS (`getrusage(RUSAGE_CHILDREN).ru_maxrss`, measured by a wrapper process
around it) against the checkpoint's size, next to the same figure for a process that only imports
everything (the constant part), and the conversion's throughput.

    .venv/bin/python bench/convert_memory.py --layers 6 --out bench/results/convert_memory.json

The shape is Mixtral's (8 experts, top-2, GQA 8:2 heads of 128, vocabulary 32000) at width 1024 and
expert width 3584, so each layer is ~181 MB in bf16: six layers make a ~1.2 GB checkpoint. With
`--full-width` the widths are Mixtral-8x7B's own (each layer 2.8 GB, each expert weight 0.94 GB), so a
couple of layers show the memory a full 93 GB conversion needs. The converter's memory should follow
`max(--buffer-mb, largest parameter)`, not the checkpoint size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

_ST_DTYPES = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}


def bench_config(n_layers: int = 6, **overrides):
    from mixtral_jax.config import MixtralConfig
    base = dict(vocab_size=32000, dim=1024, n_layers=n_layers, n_heads=8, n_kv_heads=2, head_dim=128,
                hidden_dim=3584, n_experts=8, top_k=2, max_seq_len=4096)
    base.update(overrides)
    return MixtralConfig(**base)


def hf_tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """The hub's key names and PyTorch `[out, in]` shapes of a Mixtral."""
    c = config
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (c.dim,)
        shapes[p + "self_attn.q_proj.weight"] = (c.n_heads * c.head_dim, c.dim)
        shapes[p + "self_attn.k_proj.weight"] = (c.n_kv_heads * c.head_dim, c.dim)
        shapes[p + "self_attn.v_proj.weight"] = (c.n_kv_heads * c.head_dim, c.dim)
        shapes[p + "self_attn.o_proj.weight"] = (c.dim, c.n_heads * c.head_dim)
        shapes[p + "post_attention_layernorm.weight"] = (c.dim,)
        shapes[p + "block_sparse_moe.gate.weight"] = (c.n_experts, c.dim)
        for e in range(c.n_experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes[q + "w1.weight"] = (c.hidden_dim, c.dim)
            shapes[q + "w2.weight"] = (c.dim, c.hidden_dim)
            shapes[q + "w3.weight"] = (c.hidden_dim, c.dim)
    shapes["model.norm.weight"] = (c.dim,)
    shapes["lm_head.weight"] = (c.vocab_size, c.dim)
    return shapes


def _random(rng, shape, dtype) -> np.ndarray:
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
    return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def write_random_hf(path, config, dtype: str = "bfloat16", seed: int = 0, shard_bytes: int = 512 << 20) -> int:
    """A random HF checkpoint at `path`; returns the bytes of tensor data. Memory: one tensor at a time."""
    os.makedirs(path, exist_ok=True)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    shapes = hf_tensor_shapes(config)
    shards: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for n, keys in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for key in keys:
            nbytes = int(np.prod(shapes[key])) * np_dtype.itemsize
            header[key] = {"dtype": _ST_DTYPES[dtype], "shape": list(shapes[key]),
                           "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[key] = name
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(os.path.join(path, name), "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for key in keys:
                f.write(_random(rng, shapes[key], np_dtype).tobytes())
        total += offset
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    hf = config.to_hf()
    hf["torch_dtype"] = dtype
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=1)
    return total


_WRAPPER = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:]); "
            "print(json.dumps({'rc': r.returncode, 'seconds': time.perf_counter() - t, "
            "'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def peak_rss(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` under a wrapper process; its children's peak RSS (KiB), wall time and return code."""
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, env=env)
    lines = out.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"measurement failed: {out.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result["stdout"] = "\n".join(lines[:-1])
    result["stderr"] = out.stderr[-2000:]
    return result


def baseline_cmd() -> list[str]:
    """A process that imports and initialises what a conversion does, and converts nothing."""
    return [sys.executable, "-c",
            "import mixtral_jax.convert.converter, mixtral_jax.convert.orbax_io as o; "
            "import orbax.checkpoint.experimental.v1; "
            "from mixtral_jax.model.params import param_specs; from mixtral_jax.config import MixtralConfig; "
            "param_specs(MixtralConfig.tiny())"]


def convert_cmd(src, dst, buffer_mb: int, compression: bool = True) -> list[str]:
    return [sys.executable, "-m", "mixtral_jax.cli", "convert", str(src), str(dst), "--no-progress",
            "--buffer-mb", str(buffer_mb)] + ([] if compression else ["--no-compression"])


def main(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6, help="decoder layers (each ~181 MB in bf16)")
    ap.add_argument("--full-width", action="store_true",
                    help="Mixtral-8x7B's own widths (dim 4096, 32 heads, experts of width 14336): 2.8 GB a layer")
    ap.add_argument("--buffer-mb", type=int, nargs="+", default=[64, 256], help="converter buffer sizes to try")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--out", default="bench/results/convert_memory.json", help="JSON results file")
    ap.add_argument("--no-compression", action="store_true", help="convert with --no-compression")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args(argv)

    workdir = args.workdir or tempfile.mkdtemp(prefix="convert_memory_")
    src = os.path.join(workdir, "hf")
    widths = dict(dim=4096, n_heads=32, n_kv_heads=8, hidden_dim=14336) if args.full_width else {}
    config = bench_config(args.layers, **widths)
    t = time.perf_counter()
    size = write_random_hf(src, config)
    print(f"wrote a random {size / 1e9:.2f} GB bf16 HF checkpoint ({config.n_layers} layers, dim {config.dim}, "
          f"{config.n_experts} experts of width {config.hidden_dim}) in {time.perf_counter() - t:.1f} s", flush=True)
    base = peak_rss(baseline_cmd())
    print(f"baseline (imports only): peak RSS {base['maxrss_kb'] / 1024:.0f} MiB", flush=True)
    runs = []
    for buffer_mb in args.buffer_mb:
        dst = os.path.join(workdir, f"orbax-{buffer_mb}")
        shutil.rmtree(dst, ignore_errors=True)
        r = peak_rss(convert_cmd(src, dst, buffer_mb, compression=not args.no_compression))
        if r["rc"] != 0:
            raise SystemExit(f"conversion failed: {r['stderr']}")
        out_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs)
        found = re.search(r" in ([\d.]+) s \(", r["stdout"])  # the converter's own report line
        convert_s = float(found.group(1)) if found else float("nan")
        run = {"buffer_mb": buffer_mb, "compression": not args.no_compression, "peak_rss_mib": r["maxrss_kb"] / 1024,
               "peak_rss_over_baseline_mib": (r["maxrss_kb"] - base["maxrss_kb"]) / 1024,
               "peak_rss_over_checkpoint": r["maxrss_kb"] * 1024 / size,
               "wall_seconds": r["seconds"], "wall_mb_s": size / 1e6 / r["seconds"],
               "convert_seconds": convert_s, "convert_mb_s": size / 1e6 / convert_s,
               "output_bytes": out_bytes}
        runs.append(run)
        print(f"buffer {buffer_mb} MB: peak RSS {run['peak_rss_mib']:.0f} MiB ({run['peak_rss_over_baseline_mib']:.0f} "
              f"MiB over baseline) for a {size / 2**20:.0f} MiB checkpoint = "
              f"{run['peak_rss_over_checkpoint']:.2f}x its "
              f"size; conversion {convert_s:.1f} s = {run['convert_mb_s']:.0f} MB/s ({r['seconds']:.1f} s = "
              f"{run['wall_mb_s']:.0f} MB/s with process startup); output {out_bytes / 2**20:.0f} MiB", flush=True)
        if not args.keep:
            shutil.rmtree(dst, ignore_errors=True)
    largest = max(int(np.prod(s)) for s in hf_tensor_shapes(config).values()) * 2
    result = {"checkpoint_bytes": size, "config": config.to_dict(), "largest_source_tensor_bytes": largest,
              "largest_param_bytes": config.n_experts * config.dim * config.hidden_dim * 2,
              "baseline_peak_rss_mib": base["maxrss_kb"] / 1024, "runs": runs, "cpus": os.cpu_count(),
              "command": " ".join([os.path.relpath(sys.executable)] + sys.argv)}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
