"""`mixtral-jax info PATH`: what a checkpoint is, in a few lines, without loading its weights.

Reads only headers and metadata: a Hugging Face directory (config.json + safetensors headers), a Mistral
original (params.json + consolidated.* headers) or one of our Orbax checkpoints (mixtral_jax.json and
its completion marker). "complete" means everything loading needs is there: every tensor the config
implies, with the right shape (HF, Mistral), or a completion marker matching the metadata (ours). An
incomplete checkpoint is still described, with the reason, and the command exits 1.
"""

from __future__ import annotations

import fnmatch
import json

from mixtral_jax.config import MixtralConfig
from mixtral_jax.convert import orbax_io, paths
from mixtral_jax.convert.converter import detect_format, open_source, prepare_conversion
from mixtral_jax.convert.hf import config_source
from mixtral_jax.convert.orbax_io import default_tokenizer
from mixtral_jax.errors import CheckpointError

_TOKENIZER_FILES = ("tokenizer.model*", "tokenizer.json", "tekken.json")


def _size_on_disk(path: str) -> str:
    found = paths.walk_files(path)
    total, files = sum(n for _, n in found), len(found)
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if total >= scale:
            return f"{total / scale:.1f} {unit} in {files} files"
    return f"{total} bytes in {files} files"


def _shape(c: MixtralConfig) -> str:
    window = f"sliding window {c.sliding_window}" if c.sliding_window else "no sliding window"
    return (f"dim {c.dim}, {c.n_layers} layers, {c.n_heads}/{c.n_kv_heads} heads x {c.head_dim}, FFN {c.hidden_dim}, "
            f"{c.n_experts} experts top-{c.top_k}, vocab {c.vocab_size}, context {c.max_seq_len}, "
            f"rope theta {c.rope_theta:g}, {window}")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _tokenizer_files(path: str, config: MixtralConfig) -> str:
    names = paths.listdir(path)
    found = sorted({n for pat in _TOKENIZER_FILES for n in names if fnmatch.fnmatch(n, pat)})
    expected = default_tokenizer(config)
    if found:
        return ", ".join(found)
    return "none in the directory" + (f" (its vocabulary matches {expected})" if expected else "")


def _orbax(path: str) -> dict:
    try:
        info = orbax_io.read_info(path)
        meta, complete = info.metadata, "yes"
    except CheckpointError as e:
        complete = f"no: {e}"
        try:
            meta = json.loads(paths.read_text(paths.join(path, orbax_io.METADATA_FILE)))
        except (OSError, json.JSONDecodeError):
            raise CheckpointError(f"{path} is an incomplete mixtral-jax checkpoint without readable metadata: "
                                  f"{e}") from None
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    origin = f"; from {source['format']}: {source.get('layout')}" if source.get("format") else ""
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: {orbax_io.METADATA_FILE} holds no model config")
    return {"format": f"mixtral-jax Orbax checkpoint (format version {meta.get('format_version')}){origin}",
            "config": MixtralConfig.from_dict(meta["config"]), "dtype": str(meta.get("dtype")),
            "tokenizer": str(meta.get("tokenizer")), "complete": complete}


def _pytorch(path: str, fmt: str) -> dict:
    config = (MixtralConfig.from_hf(config_source(path, "config.json")) if fmt == "hf"
              else MixtralConfig.from_mistral(config_source(path, "params.json")))
    described = {"format": "Hugging Face safetensors" if fmt == "hf" else "Mistral original", "config": config,
                 "dtype": "unknown (tensors unreadable)", "tokenizer": _tokenizer_files(path, config)}
    try:
        conversion = prepare_conversion(open_source(path, fmt))
    except CheckpointError as e:
        return described | {"complete": f"no: {e}"}
    dtypes = sorted({str(d) for d in conversion.dtypes.values()})
    return described | {"format": conversion.source.description, "dtype": ", ".join(dtypes), "complete": "yes"}


def describe(path: str) -> dict:
    """{format, config, dtype, tokenizer, complete, parameters, size}; `CheckpointError` for a directory
    that is no checkpoint at all."""
    path = paths.normalize(path)
    if not paths.is_dir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    found = _orbax(path) if orbax_io.is_checkpoint(path) else _pytorch(path, detect_format(path))
    config = found["config"]
    return found | {"parameters": f"{_count(config.param_count())} ({config.param_count():,}), "
                                  f"{_count(config.active_param_count())} active per token",
                    "size": _size_on_disk(path)}


def run_info(args) -> int:
    d = describe(args.path)
    rows = [("path", args.path), ("format", d["format"]), ("config", _shape(d["config"])),
            ("parameters", d["parameters"]), ("dtype", d["dtype"]), ("on disk", d["size"]),
            ("tokenizer", d["tokenizer"]), ("complete", d["complete"])]
    for label, value in rows:
        print(f"{label:<11}{value}")
    return 0 if d["complete"] == "yes" else 1


def register(sub):
    p = sub.add_parser("info", allow_abbrev=False, help="describe a checkpoint (any format) without loading it",
                       description=__doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("path", help="Hugging Face, Mistral original, or mixtral-jax checkpoint directory")
    p.set_defaults(run=run_info)
