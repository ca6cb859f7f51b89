"""Mistral's original checkpoints: `params.json` + `consolidated.*.pth` / `*.pt` (PyTorch) or
`consolidated*.safetensors`.

Two layouts (see DESIGN.md, "Checkpoint formats the converter reads"), both mapped by
`keymap.MISTRAL_RULES`:

- the release: per-expert keys `layers.N.feed_forward.experts.E.{w1,w2,w3}.weight`, router
  `layers.N.feed_forward.gate.weight`, usually one `consolidated.00.pth`;
- the pre-release torrent: stacked experts `layers.N.block_sparse_moe.{w1,w2,w3}` (`[E*F, D]`), router
  `layers.N.block_sparse_moe.gate.weight`, possibly split over `consolidated.00.pt` ... `.07.pt` with
  disjoint keys.

PyTorch files are opened with `torch.load(mmap=True, weights_only=True)`: nothing is read until a
tensor is asked for, and no pickle can construct anything but tensors. A file holding anything else is
refused. bf16 tensors are handed over as `ml_dtypes.bfloat16` numpy views of the same bytes (through an
int16 view: numpy has no bf16 of its own), never widened.
"""

from __future__ import annotations

import fnmatch
import os
import re

import ml_dtypes
import numpy as np

from mixtral_jax.config import MixtralConfig
from mixtral_jax.errors import CheckpointError

from . import paths
from .hf import config_source
from .keymap import FileIndexedTensors
from .pages import drop_range
from .safetensors_file import SafetensorsFile

LAYOUT_RELEASE = "per-expert keys (release layout)"
LAYOUT_TORRENT = "stacked experts (pre-release torrent layout)"


def _numbered(paths: list[str]) -> list[str]:
    def number(p):
        m = re.search(r"\.(\d+)\.pth?$", p)
        return int(m.group(1)) if m else -1
    return sorted(paths, key=lambda p: (number(p), p))


class _TorchFile:
    """The tensors of one PyTorch file, memory-mapped; `release()` drops the pages read so far."""

    def __init__(self, path: str):
        self.path = path
        self._tensors = None
        tensors = self._load()
        self._shapes = {k: tuple(t.shape) for k, t in tensors.items()}
        self._dtypes = {k: _numpy_dtype(t.dtype, path, k) for k, t in tensors.items()}

    def _load(self) -> dict:
        if self._tensors is not None:
            return self._tensors
        try:
            import torch
        except ImportError:
            raise CheckpointError(f"reading {os.path.basename(self.path)} needs PyTorch: "
                                  f"pip install 'mixtral-jax[convert]'") from None
        try:
            if paths.is_url(self.path):  # torch maps only local files: a bucket's .pth is read into memory
                with paths.open_binary(self.path) as f:
                    obj = torch.load(f, map_location="cpu", weights_only=True)
            else:
                obj = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds; ours is one line
            found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
            if found or "Weights only load failed" in str(e):
                what = f" ({found.group(1)})" if found else ""
                raise CheckpointError(f"{self.path}: holds pickled objects that are not tensors{what}; refused "
                                      f"without unpickling them (only plain tensor dicts are read)") from None
            raise CheckpointError(f"{self.path}: cannot be read as a PyTorch checkpoint (truncated, or not a "
                                  f"torch.save zip file): {_first_line(e)}") from None
        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: holds a {type(obj).__name__}, expected a dict of tensors")
        for key, value in obj.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{self.path}: entry {key!r} is a {type(value).__name__}, not a tensor; only "
                                      f"plain tensor dicts are read")
        self._tensors = obj
        return obj

    def keys(self):
        return list(self._shapes)

    def shape(self, key):
        return self._shapes[key]

    def dtype(self, key):
        return self._dtypes[key]

    def get(self, key) -> np.ndarray:
        import torch
        t = self._load()[key]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def location(self, key):
        return None  # inside a zip archive: read through the mapping

    def release(self):
        """Drop the pages read so far from this process; the mapping stays, so nothing is reloaded."""
        if self._tensors is None or paths.is_url(self.path):
            return
        for t in self._tensors.values():
            storage = t.untyped_storage()
            drop_range(storage.data_ptr(), storage.nbytes())


def _numpy_dtype(torch_dtype, path, key) -> np.dtype:
    import torch
    table = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16,
             torch.float64: np.float64, torch.int64: np.int64, torch.int32: np.int32, torch.int16: np.int16,
             torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_}
    if torch_dtype not in table:
        raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {torch_dtype}")
    return np.dtype(table[torch_dtype])


class MistralCheckpoint(FileIndexedTensors):
    """All tensors of a Mistral original checkpoint directory (a `TensorSource`)."""

    def __init__(self, path: str | os.PathLike):
        self.path = paths.normalize(path)
        if not paths.is_dir(self.path):
            raise CheckpointError(f"checkpoint directory not found: {self.path}")
        self.config = MixtralConfig.from_mistral(config_source(self.path, "params.json"))
        names = paths.listdir(self.path)

        def matching(pattern):
            return [paths.join(self.path, n) for n in names if fnmatch.fnmatch(n, pattern)]

        st = sorted(matching("consolidated*.safetensors"))
        pt = _numbered(matching("consolidated*.pth") + matching("consolidated*.pt"))
        if st:  # prefer safetensors where both exist: no pickle at all
            files = [SafetensorsFile(p) for p in st]
        elif pt:
            _check_numbering(pt)
            files = [_TorchFile(p) for p in pt]
        else:
            raise CheckpointError(f"no consolidated*.pth, consolidated*.pt or consolidated*.safetensors in {self.path}")
        super().__init__(files)
        stacked = any(re.fullmatch(r"layers\.\d+\.block_sparse_moe\.w[123]", k) for k in self.keys())
        self.layout = LAYOUT_TORRENT if stacked else LAYOUT_RELEASE
        self.release()

    def describe(self) -> str:
        names = [paths.basename(f.path) for f in self.files]
        files = names[0] if len(names) == 1 else f"{len(names)} files {names[0]} ... {names[-1]}"
        return f"Mistral original, {self.layout}, {files}"


def _check_numbering(paths: list[str]):
    numbers = []
    for p in paths:
        m = re.search(r"consolidated\.(\d+)\.pth?$", os.path.basename(p))
        if m:
            numbers.append(int(m.group(1)))
    if numbers and sorted(numbers) != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        if missing:
            width = len(re.search(r"\.(\d+)\.", os.path.basename(paths[0])).group(1))
            ext = os.path.splitext(paths[0])[1]
            raise CheckpointError("missing shard(s): " + ", ".join(f"consolidated.{n:0{width}d}{ext}" for n in missing))


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0].strip() if lines else ''}"
