"""Hugging Face checkpoints: `config.json` + one or many `*.safetensors` (with or without the index)."""

from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np

from mixtral_jax.config import MixtralConfig, RuntimeConfig, as_dtype
from mixtral_jax.model import Mixtral
from mixtral_jax.params import assemble_model, param_specs
from mixtral_jax.progress import progress

from .keymap import HF_RULES, FileIndexedTensors, assemble, plan
from .safetensors_file import CheckpointError, SafetensorsFile

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
        self._files = {name: SafetensorsFile(os.path.join(self.path, name)) for name in files}
        self._where: dict[str, SafetensorsFile] = {}
        for st in self._files.values():
            for key in st.keys():
                if key in self._where:
                    raise CheckpointError(f"tensor {key!r} appears in both {self._where[key].path} and {st.path}")
                self._where[key] = st
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in self._files[name]:
                    raise CheckpointError(f"{INDEX_FILE} places {key!r} in {name}, which does not hold it")

    def floating_dtype(self) -> np.dtype:
        key = "model.embed_tokens.weight"
        return self.dtype(key) if key in self._where else np.dtype(np.float32)


def load_hf(path: str | os.PathLike, dtype=None, *, compute_dtype=None, moe_strategy: str = "auto", mesh=None,
            show_progress: bool = True) -> Mixtral:
    """Build a `Mixtral` from a Hugging Face checkpoint, one tensor at a time.

    `dtype` is the parameter dtype (default: the checkpoint's own, so bf16 stays bf16);
    `compute_dtype` the matmul dtype (default: `dtype`). With `mesh` (a Mesh or a spec such as
    "expert=4,tensor=2") each parameter is placed as the sharding rules say and each process reads,
    from the memory-mapped files, only the slices its own devices hold.
    """
    ckpt = HFCheckpoint(path)
    param_dtype = as_dtype(dtype) if dtype is not None else ckpt.floating_dtype()
    runtime = RuntimeConfig(param_dtype=param_dtype, compute_dtype=compute_dtype, moe_strategy=moe_strategy)
    shardings = None
    if mesh is not None:
        from mixtral_jax.sharding import param_shardings
        from mixtral_jax.sharding.placement import sharded_runtime

        runtime = sharded_runtime(ckpt.config, runtime, mesh)
    specs = param_specs(ckpt.config, runtime)
    if mesh is not None:
        shardings = param_shardings(specs, runtime.mesh)
    by_target = plan(ckpt, HF_RULES, ckpt.config, specs)
    bar = progress(total=len(specs), description="loading", unit="tensors", enabled=show_progress)

    def get_array(name, spec):
        parts = by_target[name]
        if shardings is None:
            array = jax.device_put(assemble(ckpt, parts, spec.shape, spec.dtype))
        elif len(parts) > 1:  # per-expert tensors: read only the experts this process's devices hold
            array = jax.make_array_from_callback(
                spec.shape, shardings[name], lambda idx: _slice_experts(ckpt, parts, spec, idx))
        else:
            full = assemble(ckpt, parts, spec.shape, spec.dtype)
            array = jax.make_array_from_callback(spec.shape, shardings[name], lambda idx: full[idx])
        bar.advance()
        return array

    with bar:
        return assemble_model(ckpt.config, runtime, get_array)


def _slice_experts(ckpt, parts, spec, idx):
    """The block `idx` of a stacked expert parameter, reading only the experts it covers."""
    experts = range(*idx[0].indices(spec.shape[0]))
    rest = tuple(idx[1:])
    by_expert = {p.index[0]: (key, p) for key, p in parts}
    return np.stack([np.asarray(by_expert[e][1].transform(ckpt.get(by_expert[e][0])))[rest].astype(spec.dtype)
                     for e in experts])
