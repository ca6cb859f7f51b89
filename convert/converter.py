"""The conversion driver: any supported PyTorch checkpoint -> a mixtral-jax Orbax checkpoint, streamed.

    from mixtral_jax.convert import convert
    report = convert("Mixtral-8x7B-v0.1", "mixtral-8x7b-orbax")   # format detected, bf16 stays bf16
    print(report)

Steps: detect the format and open the source lazily (`open_source`); map every source key to its place
with the rule table and fail on anything unknown, missing, duplicated or mis-shaped (`keymap.match_keys`)
*before* writing anything; then build one parameter at a time in the model's layout (dropping the
source's memory-mapped pages after every tensor read) and hand it to the `orbax_io.StreamingWriter`,
which saves groups of at most `buffer_bytes`, one group in flight while the next is built
(`orbax_io.write_checkpoint`, the one writer every checkpoint goes through).

Memory: about 3x `max(buffer_bytes, largest parameter)` plus the interpreter's ~200 MB, whatever the
model's size (the group being built, the group being written, and Orbax's compressed copy of it). For
Mixtral-8x7B in bf16 the largest parameter (one layer's w1, w2 or w3) is 0.94 GB: bench/convert_memory.py
measured a 3.0 GB peak for checkpoints of 8x7B-width layers of 6.3 GB and 12.1 GB alike, i.e. about one
layer's weights plus a constant.

Safety (`convert.atomic`): the checkpoint is built in a hidden sibling workspace (`.DST.tmp-*`) and
renamed to `DST` only once complete (with its completion marker). An interrupted run leaves only that
workspace, which the next run removes; with `overwrite=True` the old `DST` is moved aside only after the
new one is complete (and put back by the next run if the process died between the two renames). A lock
file (`.DST.lock`) keeps two conversions from writing the same `DST` at once.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable

import ml_dtypes
import numpy as np

from mixtral_jax.config import MixtralConfig, RuntimeConfig, as_dtype, check_quantize
from mixtral_jax.errors import CheckpointError
from mixtral_jax.model.params import param_specs, quantized_weights
from mixtral_jax.model.quant import SCALE_SUFFIX, quantize
from mixtral_jax.progress import progress

from . import orbax_io, paths
from .atomic import unfinished
from .hf import HFCheckpoint
from .keymap import HF_RULES, MISTRAL_RULES, TensorSource, match_keys
from .mistral import MistralCheckpoint

FORMATS = ("hf", "mistral")
_SUPPORTED_DTYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)}


# ------------------------------------------------------------------------------------------ sources
@dataclasses.dataclass
class Source:
    """An opened source checkpoint: its tensors, how they map onto the model, and what it is."""
    path: str
    format: str                 # "hf" | "mistral"
    description: str            # e.g. "Hugging Face safetensors, per-expert keys, 3 files"
    config: MixtralConfig
    tensors: TensorSource
    rules: list

    _buffer: np.ndarray | None = None

    def release(self):
        """Drop the source's memory-mapped pages from this process (they count as resident once read)."""
        self.tensors.release()

    def read(self, key) -> np.ndarray:
        """Tensor `key`, read with one `readinto` into a buffer reused from tensor to tensor where it lies
        in a safetensors file (no page faults on a mapping, nothing left resident), else the reader's
        own (memory-mapped) view. Valid until the next `read`."""
        where = self.tensors.location(key)
        nbytes = int(np.prod(where[3], dtype=np.int64)) * where[2].itemsize if where else 0
        if where is None or nbytes > _MAX_READ_BUFFER:  # huge fused tensors: the mapping, released after
            return self.tensors.get(key)
        path, offset, dtype, shape = where
        if self._buffer is None or self._buffer.nbytes < nbytes:
            self._buffer = None
            self._buffer = np.empty(nbytes, np.uint8)
        view = self._buffer[:nbytes]
        with paths.open_binary(path) as f:  # on a bucket: one ranged read
            f.seek(offset)
            got = f.readinto(memoryview(view))
        if got != nbytes:
            raise CheckpointError(f"{path}: truncated while reading tensor {key!r}")
        return view.view(dtype).reshape(shape)


_MAX_READ_BUFFER = 512 << 20  # Mixtral-8x22B's per-expert tensors are 201 MB


def detect_format(path: str) -> str:
    """'hf' for config.json + *.safetensors, else 'mistral' for params.json; an error for neither."""
    names = paths.listdir(path)
    has_config, has_params = "config.json" in names, "params.json" in names
    hf_weights = [n for n in names if n.endswith(".safetensors") and not n.startswith("consolidated")]
    if has_config and (hf_weights or not has_params):
        return "hf"
    if has_params:
        return "mistral"
    raise CheckpointError(f"cannot tell the format of {path}: it has neither config.json (Hugging Face) nor "
                          f"params.json (Mistral original)")


def open_source(src, format: str | None = None) -> Source:
    src = paths.normalize(src)
    if format is not None and format not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {format!r}; use one of: {', '.join(FORMATS)}")
    if not paths.is_dir(src):
        raise CheckpointError(f"source checkpoint directory not found: {src}")
    fmt = format or detect_format(src)
    if fmt == "hf":
        tensors = HFCheckpoint(src)
        fused = any(k.endswith("mlp.experts.gate_up_proj") for k in tensors.keys())
        n = len(tensors.files)
        desc = (f"Hugging Face safetensors, {'fused gate_up_proj/down_proj experts' if fused else 'per-expert keys'}, "
                f"{n} file{'s' if n != 1 else ''}")
        source = Source(src, "hf", desc, tensors.config, tensors, HF_RULES)
    else:
        tensors = MistralCheckpoint(src)
        source = Source(src, "mistral", tensors.describe(), tensors.config, tensors, MISTRAL_RULES)
    if preset := source.config.preset_name():  # "8x22b" -> the report says "... (Mixtral-8x22B)"
        source.description += f" (Mixtral-{preset[:-1]}B)"
    source.release()
    return source


@dataclasses.dataclass
class Conversion:
    """Everything decided before writing: targets, their sources, dtypes and sizes."""
    source: Source
    specs: dict
    by_target: dict
    dtypes: dict                # name -> dtype stored in the checkpoint
    source_bytes: int
    cast: np.dtype | None
    quantize: str | None = None
    contract: dict = dataclasses.field(default_factory=dict)   # quantized weight -> its contracted axes
    float_dtypes: dict = dataclasses.field(default_factory=dict)
    _pending: dict = dataclasses.field(default_factory=dict)   # a quantized weight's values or scales, not yet built

    @property
    def total_bytes(self) -> int:
        return sum(int(np.prod(s.shape, dtype=np.int64)) * self.dtypes[n].itemsize for n, s in self.specs.items())

    def param_bytes(self, name) -> int:
        return int(np.prod(self.specs[name].shape, dtype=np.int64)) * self.dtypes[name].itemsize

    def build(self, name) -> np.ndarray:
        """One parameter as stored: quantized weights (`quant.quantize`) hand out their int8 values and
        their scales from one read of the source (the second of the two comes from `_pending`)."""
        base = name[:-len(SCALE_SUFFIX)] if name.endswith(SCALE_SUFFIX) else name
        if base not in self.contract:
            return self.build_float(name)
        if base not in self._pending:
            self._pending[base] = list(quantize(self.build_float(base), self.contract[base]))
        pair = self._pending[base]
        i = 0 if name == base else 1
        value, pair[i] = pair[i], None
        if pair[0] is None and pair[1] is None:
            del self._pending[base]
        return value

    def build_float(self, name) -> np.ndarray:
        """One parameter in our layout, in memory of its own; the source's pages are dropped as we go.

        (`keymap.assemble`, but reading each source tensor in one go into a reused buffer, copying
        transposed views in cache-sized tiles, and releasing the source after every tensor, so building
        a parameter from eight experts holds one expert's source at a time, not eight.)"""
        spec, parts, source = self.specs[name], self.by_target[name], self.source
        dtype = self.float_dtypes.get(name, self.dtypes[name])
        out = np.empty(spec.shape, dtype)
        for key, p in parts:
            tiled_copy(out[p.index], p.transform(source.read(key)))
            source.release()
        return out


def tiled_copy(dst: np.ndarray, src: np.ndarray, block: int = 128):
    """`dst[...] = src` (casting as assignment does), in `block`-square tiles over src's fastest axis and
    dst's last one when they differ: a transposing copy that stays in cache (3-4x a plain strided copy
    of a 117 MB expert weight)."""
    if src.ndim >= 2:
        strides = [abs(st) if n > 1 else np.inf for st, n in zip(src.strides, src.shape, strict=True)]
        k, last = int(np.argmin(strides)), src.ndim - 1
        if k != last and (src.shape[k] > block or src.shape[last] > block):
            idx = [slice(None)] * src.ndim
            for i in range(0, src.shape[k], block):
                idx[k] = slice(i, i + block)
                for j in range(0, src.shape[last], block):
                    idx[last] = slice(j, j + block)
                    np.copyto(dst[tuple(idx)], src[tuple(idx)], casting="unsafe")
            return
    np.copyto(dst, src, casting="unsafe")


def prepare_conversion(source: Source, dtype=None, quantize: str | None = None) -> Conversion:
    check_quantize(quantize)
    cast = as_dtype(dtype) if dtype is not None else None
    specs = param_specs(source.config, RuntimeConfig())
    by_target = match_keys(source.tensors, source.rules, source.config, specs)
    dtypes, source_bytes = {}, 0
    for name, parts in by_target.items():
        keys = [k for k, _ in parts]
        src_dtypes = {np.dtype(source.tensors.dtype(k)) for k in keys}
        for k in dict.fromkeys(keys):
            itemsize = np.dtype(source.tensors.dtype(k)).itemsize
            source_bytes += int(np.prod(source.tensors.shape(k), dtype=np.int64)) * itemsize
        if cast is not None:
            for d in src_dtypes:
                if d.kind not in "fV" and d not in _SUPPORTED_DTYPES:
                    raise CheckpointError(f"tensor {keys[0]!r} has dtype {d}, which is not a float type")
            dtypes[name] = cast
            continue
        if len(src_dtypes) > 1:
            raise CheckpointError(f"parameter {name} is assembled from tensors of different dtypes "
                                  f"({', '.join(sorted(map(str, src_dtypes)))}); pass --dtype to cast")
        (d,) = src_dtypes
        if d not in _SUPPORTED_DTYPES:
            raise CheckpointError(f"tensor {keys[0]!r} has dtype {d}; only float32, bfloat16 and float16 are kept "
                                  f"as they are (pass --dtype to cast)")
        dtypes[name] = d
    if quantize is None:
        return Conversion(source, specs, by_target, dtypes, source_bytes, cast)
    specs = param_specs(source.config, RuntimeConfig(quantize=quantize))
    contract = quantized_weights(specs)
    float_dtypes = {name: dtypes[name] for name in contract}
    stored = {name: np.dtype(np.int8) if name in contract else dtypes.get(name, np.dtype(np.float32)) for name in specs}
    return Conversion(source, specs, by_target, stored, source_bytes, cast, quantize, contract, float_dtypes)


# --------------------------------------------------------------------------------------- the driver
@dataclasses.dataclass
class ConversionReport:
    src: str
    dst: str
    format: str
    description: str
    n_params: int
    n_source_tensors: int
    bytes_written: int          # parameter bytes (before Orbax's compression)
    seconds: float
    dtype: str

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / max(self.seconds, 1e-9)

    def __str__(self):
        return (f"converted {self.n_source_tensors} tensors ({self.bytes_written / 1e9:.2f} GB, {self.dtype}) from "
                f"{self.description} into {self.n_params} parameters at {self.dst} in {self.seconds:.1f} s "
                f"({self.mb_per_s:.0f} MB/s)")


def convert(src, dst, format: str | None = None, dtype=None, overwrite: bool = False, show_progress: bool = True,
            *, tokenizer: str | None = None, buffer_bytes: int = 64 << 20, compress: bool = True,
            log: Callable[[str], None] | None = None, quantize: str | None = None) -> ConversionReport:
    """Convert the checkpoint directory `src` into a mixtral-jax Orbax checkpoint at `dst`.

    `format`: 'hf' or 'mistral' (default: detected). `dtype`: cast every parameter to it (default: keep
    each tensor's own dtype, bit for bit). `overwrite`: replace an existing `dst` (only once the new one
    is complete). `tokenizer`: recorded in the checkpoint (default: the mistral-common tokenizer matching
    the vocabulary). `buffer_bytes`: how much to gather before each write; peak memory is about
    `max(buffer_bytes, largest parameter)` plus a constant. Every problem with the input is a
    `CheckpointError` raised before anything is written. `quantize='int8'`: store the experts' and
    attention projections' weights as int8 with per-output-channel scales (`mixtral_jax.model.quant`), each
    quantized from the source (after `dtype`) as it is built.
    """
    t0 = time.perf_counter()
    say = log if log is not None else ((lambda m: print(m, file=sys.stderr)) if show_progress else (lambda m: None))
    src, dst = paths.normalize(src), paths.normalize(dst)  # a gs:// URL stays one
    exists = paths.exists(dst) and not unfinished(dst, orbax_io.MARKER_FILE)  # a dead writer's leftover goes
    if exists and not overwrite:
        raise CheckpointError(f"destination {dst} already exists; pass --overwrite (overwrite=True) to replace it")
    source = open_source(src, format)
    say(f"found {source.description}")
    p = prepare_conversion(source, dtype, quantize)
    if exists and not orbax_io.may_replace(dst):
        raise CheckpointError(f"destination {dst} exists and is not a mixtral-jax checkpoint; refusing to replace "
                              f"it even with --overwrite")
    metadata = orbax_io.checkpoint_metadata(
        source.config, p.specs, p.dtypes, tokenizer=tokenizer, quantize=quantize,
        source={"path": src, "format": source.format, "layout": source.description,
                "cast_to": p.cast.name if p.cast is not None else None})
    total, start, done = p.total_bytes, time.perf_counter(), 0
    pending = [orbax_io.PendingTensor(name, spec.logical_axes, p.param_bytes(name), lambda name=name: p.build(name))
               for name, spec in p.specs.items()]
    bar = progress(total=len(p.specs), description="converting", unit="tensors", enabled=show_progress)

    def written(tensor):
        nonlocal done
        done += tensor.nbytes
        rate = done / 1e6 / max(time.perf_counter() - start, 1e-9)
        bar.advance(description=f"converting {done / 1e9:.2f}/{total / 1e9:.2f} GB {rate:.0f} MB/s")

    try:
        with bar:
            orbax_io.write_checkpoint(dst, metadata, pending, overwrite=overwrite, buffer_bytes=buffer_bytes,
                                      compress=compress, on_written=written, what="conversion")
    finally:
        source.release()
    return ConversionReport(src, dst, source.format, source.description, len(p.specs),
                            len(source.tensors.keys()), p.total_bytes, time.perf_counter() - t0,
                            (p.cast.name if p.cast is not None else metadata["dtype"])
                            + (f" + {quantize} weights" if quantize else ""))
