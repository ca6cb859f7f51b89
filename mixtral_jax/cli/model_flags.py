"""What every command means by "the model": the flags that choose and place one, and the named configs.

`load_model(args)` is the one place that decides "the embedded demo model or a checkpoint" (`generate`,
`chat` and `serve` all come here, so `--mesh`, `--dtype` and `--quantize` mean the same on both paths), and
`model_config(spec)` the one place that turns a name, a checkpoint or a config file into a `MixtralConfig`
(`plan --model` and `train --config`).
"""

from __future__ import annotations

import argparse
import os
import sys

from mixtral_jax.config import KV_CACHE_DTYPES, QUANTIZE_MODES, MixtralConfig, RuntimeConfig
from mixtral_jax.convert import paths
from mixtral_jax.convert.hf import config_source
from mixtral_jax.convert.orbax_io import read_info
from mixtral_jax.errors import ConfigError
from mixtral_jax.loading.checkpoint import load_checkpoint
from mixtral_jax.loading.demo import DEMO_CONFIG, default_model, has_trained_model
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.sharding import make_mesh

# The smallest config with the real tokenizer's vocabulary and TPU-sized heads (head_dim 128, as the
# splash and paged attention kernels want): quick to train on a CPU, quick to compile for a slice.
TINY_CONFIG = MixtralConfig.tiny(dim=256, head_dim=128, hidden_dim=512, vocab_size=32000, max_seq_len=2048)

NAMED_CONFIGS = {
    "8x7b": lambda: MixtralConfig.from_preset("8x7b"),
    "8x22b": lambda: MixtralConfig.from_preset("8x22b"),
    "demo": lambda: DEMO_CONFIG,  # the embedded demo model's shape
    "tiny": lambda: TINY_CONFIG,
}


def model_config(spec: str) -> MixtralConfig:
    """A name from `NAMED_CONFIGS`, a mixtral-jax checkpoint, a Hugging Face / Mistral checkpoint directory,
    or a JSON config file (a `MixtralConfig` dict, `config.json` or `params.json`)."""
    if spec.lower() in NAMED_CONFIGS:
        return NAMED_CONFIGS[spec.lower()]()
    if paths.is_file(paths.join(spec, "mixtral_jax.json")):
        return read_info(spec).config
    if paths.is_url(spec):  # a Hugging Face or Mistral checkpoint in a bucket: its config file
        for name, build in (("config.json", MixtralConfig.from_hf), ("params.json", MixtralConfig.from_mistral)):
            if paths.is_file(paths.join(spec, name)):
                return build(config_source(spec, name))
    elif os.path.isfile(spec) or any(os.path.isfile(os.path.join(spec, n)) for n in ("config.json", "params.json")):
        return MixtralConfig.from_file(spec)
    raise ConfigError(f"the model must be one of {', '.join(NAMED_CONFIGS)}, a checkpoint directory or a config "
                      f"JSON file; {spec!r} is none of these")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The flags that choose and place a model and its KV cache (`generate`, `chat`, `serve`)."""
    p.add_argument("--checkpoint", help="Hugging Face directory or converted Orbax checkpoint "
                                        "(default: the embedded demo model)")
    p.add_argument("--mesh", help="device mesh spec such as expert=4,tensor=2 (default: one device)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="parameter dtype (default: the checkpoint's; "
                                                                     "float32 for the demo model)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, help="int8 weights for the experts and attention, "
                                                              "quantized while loading (default: as stored)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES,
                   help="the KV cache's dtype (default: the compute dtype; int8 halves bf16's bytes)")


def describe_demo_model() -> str:
    return "trained on Python's standard library" if has_trained_model() else "random weights: checkpoint absent"


def load_model(args: argparse.Namespace, note: str = "") -> Mixtral:
    """The checkpoint `--checkpoint` names, else the embedded demo model (saying so on stderr, with `note`),
    placed on `--mesh` either way."""
    if args.checkpoint is not None:
        return load_checkpoint(args.checkpoint, dtype=args.dtype, mesh=args.mesh, quantize=args.quantize)
    print(f"using the embedded demo model ({describe_demo_model()}){note}", file=sys.stderr)
    mesh = make_mesh(args.mesh) if args.mesh else None
    return default_model(RuntimeConfig(param_dtype=args.dtype or "float32", mesh=mesh, quantize=args.quantize))
