"""Hugging Face checkpoints: `config.json` + one or many `*.safetensors` (with or without the index)."""

from __future__ import annotations

import glob
import json
import os

import numpy as np

from mixtral_jax.config import MixtralConfig
from mixtral_jax.errors import CheckpointError

from .keymap import FileIndexedTensors
from .safetensors_file import SafetensorsFile

INDEX_FILE = "model.safetensors.index.json"


class HFCheckpoint(FileIndexedTensors):
    """All tensors of a Hugging Face checkpoint directory, each read from its own shard on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"checkpoint directory not found: {self.path}")
        self.config = MixtralConfig.from_hf(self.path)
        index_path = os.path.join(self.path, INDEX_FILE)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index_path} is malformed (no weight_map)") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(self.path, f))]
            if missing:
                raise CheckpointError(f"missing shard(s) named by {INDEX_FILE}: {', '.join(missing)}")
        else:
            weight_map = None
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.path, "*.safetensors")))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {self.path}")
        by_name = {name: SafetensorsFile(os.path.join(self.path, name)) for name in files}
        super().__init__(by_name.values())
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in by_name[name]:
                    raise CheckpointError(f"{INDEX_FILE} places {key!r} in {name}, which does not hold it")

    def floating_dtype(self) -> np.dtype:
        key = "model.embed_tokens.weight"
        return self.dtype(key) if key in self else np.dtype(np.float32)
