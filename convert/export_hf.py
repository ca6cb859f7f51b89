"""Our Orbax checkpoint -> a Hugging Face directory (`config.json`, safetensors shards, their index), so
fine-tunes reach transformers, vLLM and llama.cpp.

    from mixtral_jax.convert.export_hf import export_hf
    print(export_hf("run1/final", "run1-hf", dtype="bfloat16"))

The key mapping is the converter's own table (`keymap.HF_RULES`), run backwards: each HF key of the
release layout (`block_sparse_moe.experts.E.wN.weight`) is matched by the same rules the converter uses,
`keymap.match_keys` checks that these keys fill every parameter exactly once, and each rule's transform
(a transpose, reshape or slice: a permutation of elements) is inverted by applying it to the source
tensor's element indices. Every exported tensor is then checked forwards: the converter's transform of it
gives back our parameter bit for bit, so an export is the exact inverse of `mixtral-jax convert`.

Memory: one parameter (restored from Orbax as numpy) and one HF tensor at a time; shards are written by
streaming tensor after tensor behind a header computed up front. Safety: the directory is built in a
hidden sibling and renamed into place once complete (`convert.atomic`), so a partial export never looks
like a checkpoint. int8 checkpoints are exported only with `dequantize=True` (weights `q * scale`, in
float32 unless `dtype` says otherwise): silently widening them would hide that they are lossy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import time
from collections.abc import Iterator

import numpy as np

from mixtral_jax.config import MixtralConfig, as_dtype
from mixtral_jax.errors import CheckpointError, ConfigError
from mixtral_jax.model.params import param_specs
from mixtral_jax.model.quant import SCALE_SUFFIX, contracted_axes, dequantize
from mixtral_jax.progress import progress

from . import orbax_io
from .atomic import atomic_directory, write_durably
from .hf import INDEX_FILE, HFCheckpoint
from .keymap import HF_RULES, Placement, match_keys
from .safetensors_file import DTYPES

DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' long-time default for save_pretrained
_ST_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str | int) -> int:
    """`'5GB'`, `'500MB'`, `'2GiB'` or a byte count -> bytes (> 0)."""
    m = _SIZE.fullmatch(str(text).strip())
    if not m or float(m[1]) <= 0:
        raise ConfigError(f"bad shard size {text!r}: use a size such as 5GB, 500MB, 2GiB or a number of bytes")
    return int(float(m[1]) * _UNITS[(m[2] or "b").lower()])


def hf_keys(config: MixtralConfig) -> list[str]:
    """The tensor names of a Hugging Face Mixtral in the release layout (per-expert weights), in the
    order transformers' `state_dict` lists them."""
    keys = ["model.embed_tokens.weight"]
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        keys += [p + f"self_attn.{w}_proj.weight" for w in "qkvo"]
        keys.append(p + "block_sparse_moe.gate.weight")
        keys += [p + f"block_sparse_moe.experts.{e}.w{n}.weight" for e in range(config.n_experts) for n in (1, 2, 3)]
        keys += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    return keys + ["model.norm.weight", "lm_head.weight"]


@dataclasses.dataclass(frozen=True)
class HFTensor:
    key: str
    shape: tuple[int, ...]
    placements: tuple[Placement, ...]  # the converter's placements of this key (usually one)


class _Shapes:
    """Just enough of a `TensorSource` for `match_keys`: the keys and their shapes."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self._shapes = shapes

    def keys(self):
        return list(self._shapes)

    def shape(self, key):
        return self._shapes[key]


def export_plan(config: MixtralConfig) -> list[HFTensor]:
    """Every HF tensor with the converter's placements of it; `match_keys` checks they fill every parameter
    of the (unquantized) model exactly once, so nothing is dropped or written twice. (The release layout
    has one parameter per HF tensor; the fused `gate_up_proj` would have two.)"""
    compiled = [re.compile(pattern) for pattern, _ in HF_RULES]
    tensors = []
    for key in hf_keys(config):
        i, m = next((i, m) for i, rx in enumerate(compiled) if (m := rx.fullmatch(key)))
        placements = tuple(HF_RULES[i][1](m, config))
        if len({p.target for p in placements}) != 1:
            raise CheckpointError(f"{key}: exporting a tensor that fills several parameters is not supported")
        tensors.append(HFTensor(key, tuple(placements[0].source_shape), placements))
    match_keys(_Shapes({t.key: t.shape for t in tensors}), HF_RULES, config, param_specs(config))
    return tensors


def _source_index(p: Placement, shape: tuple[int, ...]) -> np.ndarray:
    """Where each element of `p.transform(source)` comes from, as flat indices into the source tensor."""
    n = int(np.prod(shape, dtype=np.int64))
    ids = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64).reshape(shape)
    return np.ascontiguousarray(p.transform(ids))


def invert(tensor: HFTensor, pieces: list[np.ndarray], cache: dict) -> np.ndarray:
    """The HF tensor whose converter transforms give `pieces` (one per placement, in our layout).

    Index maps depend on a rule's transform and shapes only, so they are cached by (target, index rank,
    shape) with the layer and expert numbers taken out; the forward check after each tensor makes that
    caching safe: a wrong map cannot pass it."""
    out = np.empty(tensor.shape, pieces[0].dtype)
    flat = out.reshape(-1)
    filled = 0
    for ordinal, (p, piece) in enumerate(zip(tensor.placements, pieces)):
        key = (re.sub(r"\d+", "#", p.target), len(p.index), ordinal, tensor.shape)
        if key not in cache:
            cache[key] = _source_index(p, tensor.shape)
        index = cache[key]
        if index.shape != piece.shape:
            raise CheckpointError(f"{tensor.key}: parameter {p.target} slice has shape {piece.shape}, "
                                  f"expected {index.shape}")
        flat[index.reshape(-1)] = piece.reshape(-1)
        filled += index.size
    if filled != out.size:
        raise CheckpointError(f"{tensor.key}: the rules fill {filled} of its {out.size} elements")
    bits = np.dtype(f"u{out.dtype.itemsize}")
    for p, piece in zip(tensor.placements, pieces):  # forwards again: exactly what `convert` would read back
        back = np.ascontiguousarray(p.transform(out)).view(bits)
        if not np.array_equal(back, np.ascontiguousarray(piece).view(bits)):
            raise CheckpointError(f"{tensor.key}: the exported tensor does not convert back to {p.target}")
    return out


# ------------------------------------------------------------------------------------ safetensors writing
def _header(entries: list[tuple[str, np.dtype, tuple[int, ...]]]) -> tuple[bytes, int]:
    """The safetensors header for tensors written back to back in this order, and the data's size."""
    header, offset = {}, 0
    for key, dtype, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}  # what transformers checks for
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    return struct.pack("<Q", len(text)) + text, offset


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def pack_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive tensors (by index) into shards of at most `max_bytes` (a bigger tensor gets its own)."""
    shards: list[list[int]] = [[]]
    total = 0
    for i, nbytes in enumerate(sizes):
        if shards[-1] and total + nbytes > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += nbytes
    return shards


# ------------------------------------------------------------------------------------------------ export
@dataclasses.dataclass
class ExportReport:
    src: str
    dst: str
    n_tensors: int
    files: list[str]
    nbytes: int
    dtype: str
    seconds: float

    def __str__(self):
        where = self.files[0] if len(self.files) == 1 else f"{len(self.files)} shards + {INDEX_FILE}"
        return (f"exported {self.src} to {self.dst}: {self.n_tensors} tensors, {self.nbytes / 1e9:.2f} GB {self.dtype} "
                f"in {where} ({self.seconds:.1f} s)")


def is_hf_export(path: str) -> bool:
    """A complete Hugging Face directory: `config.json` and the shards its index (or the one file) names."""
    try:
        HFCheckpoint(path)
    except (CheckpointError, ConfigError, OSError):
        return False
    return True


def _may_replace(path: str) -> bool:
    if not os.path.isdir(path) or os.path.islink(path):
        return False
    names = os.listdir(path)
    return not names or ("config.json" in names and any(n.endswith(".safetensors") for n in names))


def _parameters(info: orbax_io.CheckpointInfo, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """Yield `(name, array)` of the float model, one parameter at a time, restored as numpy."""
    path = info.path
    stored = orbax_io.stored_tree(path)
    axes = {n: p["logical_axes"] for n, p in info.metadata["params"].items()}
    for name in param_specs(info.config):
        scale_name = name + SCALE_SUFFIX
        if scale_name in stored:
            got = orbax_io.restore(path, {name: stored[name], scale_name: stored[scale_name]}, partial=True)
            array = dequantize(np.asarray(got[name]), np.asarray(got[scale_name]),
                               contracted_axes(axes[name], axes[scale_name]))
        else:
            array = np.asarray(orbax_io.restore(path, {name: stored[name]}, partial=True)[name])
        if dtype is not None:
            array = array.astype(dtype, copy=False)
        if np.dtype(array.dtype) not in _ST_NAMES:
            raise CheckpointError(f"{path}: parameter {name} has dtype {array.dtype}, which safetensors cannot hold")
        yield name, array


def export_hf(src, dst, *, dtype=None, dequantize_int8: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
              overwrite: bool = False, show_progress: bool = True) -> ExportReport:
    """Write the checkpoint at `src` as a Hugging Face directory at `dst` (see the module docstring).

    `dtype`: cast every tensor (default: each parameter's stored dtype; float32 when dequantizing int8).
    `max_shard_bytes`: above this the tensors go into several `model-0000N-of-0000M.safetensors` with a
    `model.safetensors.index.json`."""
    t0 = time.perf_counter()
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    cast = as_dtype(dtype) if dtype is not None else None
    if max_shard_bytes <= 0:
        raise ConfigError(f"max shard size must be > 0 bytes, got {max_shard_bytes}")
    info = orbax_io.read_info(src)
    if info.quantize is not None and not dequantize_int8:
        raise CheckpointError(f"{src} holds {info.quantize} weights; Hugging Face Mixtral loaders expect float "
                              f"weights: pass --dequantize (dequantize_int8=True) to export q * scale "
                              f"(float32 unless --dtype says otherwise)")
    if os.path.lexists(dst) and not (overwrite and _may_replace(dst)):
        raise CheckpointError(f"destination {dst} already exists; pass --overwrite to replace it" if not overwrite
                              else f"destination {dst} is not a Hugging Face checkpoint directory; not replacing it")
    order = {name: i for i, name in enumerate(param_specs(info.config))}
    # in the model's parameter order, so that `piece` holds one parameter at a time
    plan = sorted(export_plan(info.config), key=lambda t: order[t.placements[0].target])
    if info.quantize is not None and cast is None:
        cast = np.dtype(np.float32)
    stored_dtypes = {name: np.dtype(dt) for name, (_, dt) in info.params.items()}
    out_dtype = {t.key: np.dtype(cast) if cast is not None else stored_dtypes[t.placements[0].target] for t in plan}
    sizes = [int(np.prod(t.shape, dtype=np.int64)) * out_dtype[t.key].itemsize for t in plan]
    shards = pack_shards(sizes, max_shard_bytes)
    names = shard_names(len(shards))
    params = _parameters(info, cast)
    current: dict[str, np.ndarray] = {}
    cache: dict = {}

    def piece(p: Placement) -> np.ndarray:
        while p.target not in current:  # the plan visits parameters in the model's order: one held at a time
            current.clear()
            name, array = next(params)
            current[name] = array
        return current[p.target][p.index]

    def check(tmp: str) -> None:
        if set(HFCheckpoint(tmp).keys()) != {t.key for t in plan}:
            raise CheckpointError(f"{tmp}: the written shards do not hold exactly the planned tensors")

    weight_map = {}
    bar = progress(total=len(plan), description="exporting", unit="tensors", enabled=show_progress)
    with atomic_directory(dst, overwrite=overwrite, is_complete=is_hf_export, check=check, what="export") as tmp:
        os.makedirs(tmp)
        with bar:
            for name, members in zip(names, shards):
                entries = [(plan[i].key, out_dtype[plan[i].key], plan[i].shape) for i in members]
                header, _ = _header(entries)
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(header)
                    for i in members:
                        t = plan[i]
                        array = invert(t, [piece(p) for p in t.placements], cache)
                        f.write(np.ascontiguousarray(array.astype(out_dtype[t.key], copy=False)).tobytes())
                        weight_map[t.key] = name
                        bar.advance()
                    f.flush()
                    os.fsync(f.fileno())
        if len(names) > 1:
            write_durably(os.path.join(tmp, INDEX_FILE), json.dumps(
                {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2) + "\n")
        _write_configs(tmp, info, out_dtype[plan[0].key])
    dtypes = sorted({d.name for d in out_dtype.values()})
    return ExportReport(src, dst, len(plan), names, sum(sizes), "/".join(dtypes), time.perf_counter() - t0)


def _write_configs(path: str, info: orbax_io.CheckpointInfo, dtype: np.dtype) -> None:
    """`config.json` (what transformers' `MixtralConfig` takes, with the weights' dtype) and
    `generation_config.json` (the BOS/EOS ids, as `save_pretrained` writes them)."""
    config = dict(info.config.to_hf(), torch_dtype=np.dtype(dtype).name)
    write_durably(os.path.join(path, "config.json"), json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": info.config.bos_id, "eos_token_id": info.config.eos_id}
    write_durably(os.path.join(path, "generation_config.json"), json.dumps(generation, indent=2) + "\n")
