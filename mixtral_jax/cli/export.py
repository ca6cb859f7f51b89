"""`mixtral-jax export CHECKPOINT DST --format hf`: a mixtral-jax checkpoint back to Hugging Face safetensors."""

from __future__ import annotations

import argparse

from mixtral_jax.convert.export_hf import DEFAULT_SHARD_BYTES, export_hf, parse_size

_DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


def register(subparsers: argparse._SubParsersAction):
    p = subparsers.add_parser(
        "export", allow_abbrev=False, help="write a mixtral-jax checkpoint as a Hugging Face directory",
        description="Write a mixtral-jax checkpoint (converted, trained or fine-tuned) as a Hugging Face "
                    "directory: config.json, generation_config.json and safetensors shards (with "
                    "model.safetensors.index.json when there are several), for transformers, vLLM and llama.cpp. "
                    "The exact inverse of `mixtral-jax convert`; written atomically.")
    p.add_argument("checkpoint", help="mixtral-jax checkpoint directory (e.g. a training run's final/)")
    p.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    p.add_argument("--format", choices=("hf",), required=True, help="output format: hf (Hugging Face safetensors)")
    p.add_argument("--dtype", choices=_DTYPES, default=None,
                   help="cast every tensor (default: as stored; float32 for --dequantize)")
    p.add_argument("--dequantize", action="store_true",
                   help="export an int8 checkpoint as float weights (q * scale); refused without it")
    p.add_argument("--max-shard-size", default=f"{DEFAULT_SHARD_BYTES // 10**9}GB",
                   help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing Hugging Face directory at DST, once the new one is complete")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    p.set_defaults(run=_run_export)


def _run_export(args) -> int:
    report = export_hf(args.checkpoint, args.dst, dtype=args.dtype, dequantize_int8=args.dequantize,
                       max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite,
                       show_progress=not args.no_progress)
    print(report)
    return 0
