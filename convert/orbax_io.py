"""The mixtral-jax checkpoint on disk: one Orbax PyTree checkpoint written piece by piece, plus our metadata.

Layout of a converted checkpoint directory `DST/`::

    DST/
      _CHECKPOINT_METADATA, orbax.checkpoint, ...   Orbax (v1 API) checkpoint files
      state/                                        the Orbax PyTree: OCDBT + zarr3, zstd-compressed
        {"embed": ..., "layers": {"0": {"attn": {"wq": ...}, "moe": {"w1": ...}, ...}, ...},
         "lm_head": ..., "norm": {"scale": ...}}
      mixtral_jax.json                              config, tokenizer, dtypes, shapes, provenance
      MIXTRAL_JAX_COMPLETE                          completion marker, written last

- The PyTree is the model's parameters nested by their dotted names (`layers.3.moe.w1` ->
  `["layers"]["3"]["moe"]["w1"]`), each stored in the model's own layout (inputs first; see
  `mixtral_jax.param_specs`) and in the dtype it had in the source checkpoint (or `--dtype`), so loading
  is a plain Orbax restore with target shardings and no transform.
- It is written with Orbax's *partial saving* (`orbax.checkpoint.experimental.v1.partial`, present in
  orbax-checkpoint 0.12.8): every `partial.save` adds a group of parameters (bounded by a byte budget)
  to `<dir>.partial_save/`, and `partial.finalize` merges the groups (an OCDBT manifest merge, no data
  copy) into one ordinary checkpoint. Memory holds the group being written and the one being gathered,
  never the model. (Orbax's default deep copy of host arrays is switched off: ours are never modified.)
- Arrays are chunked so a host restores only what its devices hold: expert weights one expert per
  chunk, attention weights one head per chunk, and every chunk at most `CHUNK_BYTES` (the vocabulary and
  expert-hidden dimensions are split to get there).
- `mixtral_jax.json` holds `MixtralConfig.to_dict()`, the tokenizer the weights expect (for example
  `mistral-common:tokenizer.model.v1`), the default parameter dtype, every parameter's shape and dtype,
  and where it came from. The same dict is the Orbax checkpoint's `custom_metadata`.
- `MIXTRAL_JAX_COMPLETE` holds the SHA-256 of `mixtral_jax.json`. A directory without it (or with a
  different hash) is not a checkpoint, whatever else it holds. The converter also builds everything in a
  temporary sibling directory and renames it into place only when complete.

Reading any Orbax checkpoint of this layout needs nothing but Orbax: `ocp.load(DST, abstract_tree)`.

On object storage (`DST` a `gs://` URL) Orbax 0.12.8's partial saving does not work (it needs a
snapshot, which the commit-file protocol Orbax uses on GCS refuses: "Snapshot is not supported for
CommitFileTemporaryPath"; forcing the rename protocol fails on directory renames over gcsfs). There each
group is an ordinary Orbax PyTree checkpoint of its own, written by tensorstore straight into the bucket
(`DST/parts/00000/`, ... each with Orbax's `commit_success.txt`), `DST/parts.json` says which part holds
which parameter, and `restore` reads each parameter from its part (`ocp.load(part, subtree)` per part).
The metadata and the completion marker are the same; the marker is written last.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
from etils import epath

from mixtral_jax.config import MixtralConfig
from mixtral_jax.errors import CheckpointError, ConfigError
from mixtral_jax.version import __version__

from . import paths
from .atomic import IN_PROGRESS_FILE, atomic_directory, fsync_dir

METADATA_FILE = "mixtral_jax.json"
MARKER_FILE = "MIXTRAL_JAX_COMPLETE"
PARTS_DIR, PARTS_INDEX = "parts", "parts.json"  # the object-storage layout (see above)
FORMAT_NAME = "mixtral-jax"
FORMAT_VERSION = 1
PYTREE_NAME = "state"  # the checkpointable name Orbax's partial saving uses
CHUNK_BYTES = 8 * 1024 * 1024
# logical axes we always split into one chunk per index: what the mesh shards them over is one device's
# whole slices, so a device never reads a chunk it does not need.
_ONE_PER_CHUNK = ("expert", "q_heads", "kv_heads")


def _ocp():
    import orbax.checkpoint.experimental.v1 as ocp  # imported lazily: it is slow to import
    return ocp


# ---------------------------------------------------------------------------------------- tree names
def nest(flat: Mapping[str, Any]) -> dict:
    """`{'layers.0.attn.wq': x}` -> `{'layers': {'0': {'attn': {'wq': x}}}}`."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _keypath_name(keypath) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keypath)


# -------------------------------------------------------------------------------------------- writing
class StreamingWriter:
    """Writes parameters into an Orbax checkpoint at `path` a group at a time, then finalizes it.

    `add(name, array, logical_axes)` buffers until `buffer_bytes` would be exceeded, then saves the
    buffered group with one `partial.save`. `finish(metadata)` flushes, finalizes the Orbax checkpoint
    at `path`, writes `mixtral_jax.json` and last the completion marker.
    """

    def __init__(self, path: str, custom_metadata: dict | None = None, *, buffer_bytes: int = 64 << 20,
                 chunk_bytes: int = CHUNK_BYTES, compress: bool = True, overlap: bool = True):
        self.path = paths.normalize(path)
        self.in_parts = paths.is_url(self.path)  # object storage: one Orbax checkpoint per group
        self._part_of: dict[str, str] = {}
        self.buffer_bytes = int(buffer_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self.compress = compress
        self._custom_metadata = custom_metadata
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shard_axes: dict[str, tuple[int, ...]] = {}
        self.groups_written = 0
        self.overlap = overlap
        self._inflight = None

    @property
    def partial_path(self) -> str:
        return self.path + ".partial_save"

    def would_overflow(self, nbytes: int) -> bool:
        """True if adding `nbytes` more would exceed the budget (call `flush` first to stay bounded)."""
        return bool(self._pending) and self._pending_bytes + nbytes > self.buffer_bytes

    def add(self, name: str, array: np.ndarray, logical_axes: Iterable[str | None] = ()):
        self._shard_axes[name] = tuple(i for i, a in enumerate(logical_axes) if a in _ONE_PER_CHUNK)
        self._pending[name] = array
        self._pending_bytes += array.nbytes
        if self._pending_bytes >= self.buffer_bytes:
            self.flush()

    def _context(self):
        ocp = _ocp()
        ctx = ocp.Context()
        ctx.memory_options.deepcopy_host_arrays = False  # our arrays are never modified while saved
        saving = ctx.array.saving
        saving.use_compression = self.compress
        saving.storage_options.chunk_byte_size = self.chunk_bytes
        shard_axes = self._shard_axes
        storage_options = ocp.options.ArrayOptions.Saving.StorageOptions

        def per_leaf(keypath, value):
            return storage_options(shard_axes=shard_axes.get(_keypath_name(keypath), ()))

        saving.scoped_storage_options_creator = per_leaf
        return ctx

    def flush(self):
        """Start saving the buffered group; with `overlap`, return while it is written (at most one
        group in flight, so memory holds the group being written and the one being gathered)."""
        if not self._pending:
            return
        ocp = _ocp()
        group = nest(self._pending)
        self._pending = {}
        self._pending_bytes = 0
        self.wait()
        with self._context():
            if self.in_parts:
                part = f"{self.groups_written:05d}"
                self._part_of.update(dict.fromkeys(flatten(group), part))
                response = ocp.save_async(paths.join(self.path, PARTS_DIR, part), group,
                                          custom_metadata=self._custom_metadata)
            else:
                response = ocp.partial.save_async(
                    self.path, group, custom_metadata=self._custom_metadata if self.groups_written == 0 else None)
        del group
        self.groups_written += 1
        self._inflight = response
        if not self.overlap:
            self.wait()

    def wait(self):
        """Block until the group in flight (if any) is on disk; re-raises its error."""
        response, self._inflight = self._inflight, None
        if response is not None:
            response.result()

    def finish(self, metadata: dict):
        self.flush()
        self.wait()
        if self.groups_written == 0:
            raise CheckpointError("nothing to write: the checkpoint has no parameters")
        if self.in_parts:
            paths.write_text(paths.join(self.path, PARTS_INDEX), json.dumps(self._part_of, indent=0) + "\n")
        else:
            _ocp().partial.finalize(self.path)
        write_metadata(self.path, metadata)


def write_metadata(path: str, metadata: dict):
    """`mixtral_jax.json`, then the completion marker holding its hash; both fsynced (local)."""
    text = json.dumps(metadata, indent=1, sort_keys=False) + "\n"
    paths.write_text(paths.join(path, METADATA_FILE), text)
    digest = hashlib.sha256(text.encode()).hexdigest()
    paths.write_text(paths.join(path, MARKER_FILE), json.dumps({"metadata_sha256": digest}) + "\n")
    if not paths.is_url(path):
        fsync_dir(path)


# ------------------------------------------------------------------------------ the one writer
def default_tokenizer(config: MixtralConfig) -> str | None:
    """The mistral-common tokenizer a Mixtral of this vocabulary was trained with (None: unknown)."""
    known = {32000: "mistral-common:tokenizer.model.v1", 32768: "mistral-common:tokenizer.model.v3"}
    return known.get(config.vocab_size)


def checkpoint_metadata(config: MixtralConfig, specs: Mapping[str, Any], dtypes: Mapping[str, np.dtype], *,
                        source: Mapping[str, Any], tokenizer: str | None = None,
                        quantize: str | None = None) -> dict:
    """`mixtral_jax.json` for parameters `specs` (`param_specs`) stored in `dtypes`: the one schema that
    converted, exported and trained checkpoints share. `tokenizer` None: `default_tokenizer(config)`.
    The default load dtype is the float dtype most of the bytes have; `quantize` ('int8') records that
    the weights with a `_scale` parameter are quantized (`mixtral_jax.model.quant`)."""
    nbytes = {name: int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(dtypes[name]).itemsize
              for name, spec in specs.items()}
    by_dtype: dict = {}
    for name in (n for n in specs if np.dtype(dtypes[n]).kind not in "iu"):
        by_dtype[np.dtype(dtypes[name])] = by_dtype.get(np.dtype(dtypes[name]), 0) + nbytes[name]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "tokenizer": tokenizer if tokenizer is not None else default_tokenizer(config),
        "dtype": max(by_dtype, key=by_dtype.get).name,
        **({"quantize": quantize} if quantize is not None else {}),
        "params": {n: {"shape": list(s.shape), "dtype": np.dtype(dtypes[n]).name, "logical_axes": list(s.logical_axes)}
                   for n, s in specs.items()},
        "source": dict(source),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "converted_with": f"mixtral-jax {__version__}",
    }


class PendingTensor(NamedTuple):
    """One parameter to write, built only when its turn comes (so memory holds one group at a time)."""

    name: str
    logical_axes: tuple[str | None, ...]
    nbytes: int
    build: Callable[[], np.ndarray]


def is_complete(path) -> bool:
    return paths.is_file(paths.join(path, MARKER_FILE))


def may_replace(path) -> bool:
    """Only an empty directory or a (possibly incomplete) mixtral-jax checkpoint may be overwritten."""
    path = os.fspath(path)
    if paths.is_url(path):
        return paths.is_dir(path) and (is_checkpoint(path) or paths.exists(paths.join(path, IN_PROGRESS_FILE)))
    if not os.path.isdir(path) or os.path.islink(path):
        return False
    return not os.listdir(path) or is_checkpoint(path)


def write_checkpoint(dst, metadata: dict, tensors: Iterable[PendingTensor], *, overwrite: bool = False,
                     buffer_bytes: int = 64 << 20, compress: bool = True, overlap: bool = True,
                     on_written: Callable[[PendingTensor], None] | None = None, what: str = "write") -> None:
    """Write a complete checkpoint at `dst`, atomically (see `convert.atomic`): the tensors stream through
    a `StreamingWriter` (a group in flight while the next is built), then the metadata and the marker;
    `dst` appears only once `read_info` accepts the result."""
    with atomic_directory(dst, overwrite=overwrite, is_complete=is_complete, check=read_info, what=what,
                          marker=MARKER_FILE) as tmp:
        writer = StreamingWriter(tmp, custom_metadata=metadata, buffer_bytes=buffer_bytes, compress=compress,
                                 overlap=overlap)
        try:
            for tensor in tensors:
                if writer.would_overflow(tensor.nbytes):
                    writer.flush()
                writer.add(tensor.name, tensor.build(), tensor.logical_axes)
                if on_written is not None:
                    on_written(tensor)
            writer.finish(metadata)
        except BaseException:
            try:
                writer.wait()  # never delete files under a write still in flight
            except BaseException:  # noqa: BLE001 - the first error is the one to report
                pass
            raise


# -------------------------------------------------------------------------------------------- reading
@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    path: str
    config: MixtralConfig
    tokenizer: str | None
    dtype: np.dtype                               # default parameter dtype when loading
    params: dict[str, tuple[tuple[int, ...], np.dtype]]
    metadata: dict                                # the whole of mixtral_jax.json

    @property
    def quantize(self) -> str | None:
        """'int8' for a checkpoint of quantized weights (`convert --quantize int8`), else None."""
        return self.metadata.get("quantize")

    @property
    def quantize_lm_head(self) -> bool:
        return "lm_head_scale" in self.params


def is_checkpoint(path) -> bool:
    return paths.is_file(paths.join(path, METADATA_FILE)) or paths.is_file(paths.join(path, MARKER_FILE))


def read_info(path) -> CheckpointInfo:
    """The metadata of a complete mixtral-jax checkpoint; `CheckpointError` for anything else.

    `path` may be local or anything `etils.epath` opens (e.g. `gs://...` where its backend is installed).
    """
    path = paths.normalize(path)
    root = epath.Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    marker, meta_path = root / MARKER_FILE, root / METADATA_FILE
    if not marker.exists():
        raise CheckpointError(
            f"{path} is not a complete mixtral-jax checkpoint (no {MARKER_FILE}): the conversion did not "
            f"finish or this is another kind of directory; convert again")
    try:
        text = meta_path.read_text(encoding="utf-8")
        expected = json.loads(marker.read_text(encoding="utf-8"))["metadata_sha256"]
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete mixtral-jax checkpoint (no {METADATA_FILE})") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{marker} is malformed") from None
    if hashlib.sha256(text.encode()).hexdigest() != expected:
        raise CheckpointError(f"{meta_path} does not match its completion marker: the checkpoint was modified "
                              f"or copied incompletely")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON: {e}") from None
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{meta_path} does not describe a {FORMAT_NAME} checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {meta.get('format_version')!r}; this "
                              f"mixtral-jax reads version {FORMAT_VERSION}")
    try:
        config = MixtralConfig.from_dict(meta["config"])
        params = {name: (tuple(p["shape"]), np.dtype(_dtype(p["dtype"]))) for name, p in meta["params"].items()}
        dtype = np.dtype(_dtype(meta["dtype"]))
    except ConfigError as e:
        raise CheckpointError(f"{meta_path}: bad model config: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path} is malformed: {e!r}") from None
    return CheckpointInfo(path, config, meta.get("tokenizer"), dtype, params, meta)


def _dtype(name: str):
    return {"bfloat16": ml_dtypes.bfloat16}.get(name, name)


def check_specs(info: CheckpointInfo, specs: Mapping[str, Any]):
    """The checkpoint's parameters are exactly the model's, with the shapes the config implies."""
    missing = [n for n in specs if n not in info.params]
    extra = [n for n in info.params if n not in specs]
    if missing or extra:
        what = (f"lacks {', '.join(missing[:3])}" if missing else "") + \
               (" and " if missing and extra else "") + (f"has unexpected {', '.join(extra[:3])}" if extra else "")
        raise CheckpointError(f"{info.path} does not match its config: it {what}")
    for name, spec in specs.items():
        if info.params[name][0] != tuple(spec.shape):
            raise CheckpointError(f"{info.path}: parameter {name} has shape {info.params[name][0]}, but the "
                                  f"config implies {tuple(spec.shape)}")


def _parts(path) -> dict[str, str] | None:
    """{parameter: part folder} of a checkpoint written to object storage; None for the one-PyTree layout."""
    index = paths.join(path, PARTS_INDEX)
    if not paths.is_url(path) and not os.path.isfile(index):
        return None
    try:
        return {name: paths.join(path, PARTS_DIR, part) for name, part in json.loads(paths.read_text(index)).items()}
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{index} is malformed: {e}") from None


def stored_tree(path) -> dict:
    """`{name: leaf metadata}` of the Orbax PyTree actually on disk (shapes and dtypes as stored)."""
    ocp = _ocp()
    path = paths.normalize(path)
    parts = _parts(path)
    out = {}
    for where in sorted(set(parts.values())) if parts is not None else [path]:
        try:
            meta = ocp.metadata(where, checkpointable_name=PYTREE_NAME)
        except Exception as e:  # noqa: BLE001 - Orbax raises many types; ours is one line
            raise CheckpointError(f"{where}: cannot read the Orbax checkpoint: {_first_line(e)}") from None
        out.update(flatten(meta.metadata))
    return out


def restore(path, abstract: Mapping[str, Any], *, partial: bool = False) -> dict:
    """Restore `{name: array}` for the `{name: abstract leaf}` given.

    Leaves are `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` (restored as `jax.Array`s directly
    into that sharding: each process reads only the chunks its devices hold) or Orbax leaf metadata
    (restored as numpy). `partial=True` restores a subset of the parameters.
    """
    ocp = _ocp()
    path = paths.normalize(path)
    parts = _parts(path)
    if parts is None:
        groups = {path: abstract}
    else:
        groups = {}
        for name, leaf in abstract.items():
            if name not in parts:
                raise CheckpointError(f"{path}: no stored parameter {name}")
            groups.setdefault(parts[name], {})[name] = leaf
    out = {}
    for where, subset in groups.items():
        ctx = ocp.Context()
        ctx.pytree.loading.partial_load = partial or parts is not None  # a part holds more than asked
        try:
            with ctx:
                tree = ocp.load(where, nest(subset), checkpointable_name=PYTREE_NAME)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot restore from the Orbax checkpoint: {_first_line(e)}") from None
        out.update(flatten(tree))
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
