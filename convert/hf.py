"""Hugging Face checkpoints: `config.json` + one or many `*.safetensors` (with or without the index)."""

from __future__ import annotations

import json
import os

import numpy as np

from mixtral_jax.config import MixtralConfig
from mixtral_jax.errors import CheckpointError

from . import paths
from .keymap import FileIndexedTensors
from .safetensors_file import SafetensorsFile

INDEX_FILE = "model.safetensors.index.json"


class HFCheckpoint(FileIndexedTensors):
    """All tensors of a Hugging Face checkpoint directory, each read from its own shard on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = paths.normalize(path)
        if not paths.is_dir(self.path):
            raise CheckpointError(f"checkpoint directory not found: {self.path}")
        self.config = MixtralConfig.from_hf(config_source(self.path, "config.json"))
        index_path = paths.join(self.path, INDEX_FILE)
        names = paths.listdir(self.path)
        if INDEX_FILE in names:
            try:
                weight_map = json.loads(paths.read_text(index_path))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index_path} is malformed (no weight_map)") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if f not in names]
            if missing:
                raise CheckpointError(f"missing shard(s) named by {INDEX_FILE}: {', '.join(missing)}")
        else:
            weight_map = None
            files = [n for n in names if n.endswith(".safetensors")]
            if not files:
                raise CheckpointError(f"no *.safetensors files in {self.path}")
        by_name = {name: SafetensorsFile(paths.join(self.path, name)) for name in files}
        super().__init__(by_name.values())
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in by_name[name]:
                    raise CheckpointError(f"{INDEX_FILE} places {key!r} in {name}, which does not hold it")

    def floating_dtype(self) -> np.dtype:
        key = "model.embed_tokens.weight"
        return self.dtype(key) if key in self else np.dtype(np.float32)


def config_source(path: str, name: str):
    """A local directory as it is (`MixtralConfig` reads it); a URL's JSON file as its dict."""
    if not paths.is_url(path):
        return path
    try:
        return json.loads(paths.read_text(paths.join(path, name)))
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {name}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{paths.join(path, name)} is not valid JSON: {e}") from None
