"""`mixtral-jax convert SRC DST` and `mixtral-jax verify SRC DST`."""

from __future__ import annotations

import argparse
import sys

from mixtral_jax.config import QUANTIZE_MODES
from mixtral_jax.convert.converter import convert
from mixtral_jax.convert.verify import VerificationError, verify

_DTYPES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


def register(subparsers: argparse._SubParsersAction):
    p = subparsers.add_parser(
        "convert", allow_abbrev=False,
        help="convert a Hugging Face or Mistral PyTorch checkpoint into an Orbax checkpoint",
        description="Convert a Hugging Face (config.json + *.safetensors) or Mistral original (params.json + "
                    "consolidated.*.pth / .pt / .safetensors) checkpoint into a mixtral-jax Orbax checkpoint, "
                    "streaming one group of tensors at a time. bf16 stays bf16 unless --dtype says otherwise.")
    p.add_argument("src", help="source checkpoint directory")
    p.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    p.add_argument("--format", choices=("hf", "mistral"), default=None, help="source format (default: detected)")
    p.add_argument("--dtype", choices=_DTYPES, default=None, help="cast every weight (default: keep each tensor's)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default=None,
                   help="store the experts' and attention projections' weights as int8 with per-channel scales")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing DST, once the new checkpoint is complete")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to record (default: the mistral-common one matching the vocabulary)")
    p.add_argument("--buffer-mb", type=int, default=64, help="MB of weights gathered per write (default 64)")
    p.add_argument("--no-compression", action="store_true",
                   help="store the weights uncompressed (faster on few cores, ~25%% larger)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or messages")
    p.set_defaults(run=_run_convert)

    v = subparsers.add_parser(
        "verify", allow_abbrev=False, help="check every tensor of a converted checkpoint against its source",
        description="Compare every parameter of DST (shape, dtype, exact bits) with SRC read as the converter "
                    "reads it. Exits 1 at the first mismatch, naming it.")
    v.add_argument("src", help="source checkpoint directory")
    v.add_argument("dst", help="converted checkpoint directory")
    v.add_argument("--format", choices=("hf", "mistral"), default=None, help="source format (default: detected)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    v.set_defaults(run=_run_verify)


def _run_convert(args) -> int:
    report = convert(args.src, args.dst, format=args.format, dtype=args.dtype, overwrite=args.overwrite,
                     show_progress=not args.no_progress, tokenizer=args.tokenizer,
                     buffer_bytes=max(args.buffer_mb, 1) << 20, compress=not args.no_compression,
                     quantize=args.quantize)
    print(report)
    return 0


def _run_verify(args) -> int:
    try:
        report = verify(args.src, args.dst, format=args.format, show_progress=not args.no_progress)
    except VerificationError as e:
        print(f"mixtral-jax verify: MISMATCH: {e}", file=sys.stderr)
        return 1
    print(report)
    return 0
