"""Source-checkpoint key -> model parameter, as a table of regexes, and the assembly of parameters from it.

Each rule turns one source tensor into one or more `Placement`s: which parameter it fills, which slice
of it (an expert index, or all of it), the source shape it must have, and the transform into our layout
(PyTorch stores `[out, in]`; we store inputs first). Any key no rule matches, any duplicate, any shape
mismatch and any parameter left unfilled is a `CheckpointError`: nothing is guessed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import numpy as np

from mixtral_jax.config import MixtralConfig
from mixtral_jax.errors import CheckpointError


@dataclasses.dataclass(frozen=True)
class Placement:
    target: str                      # parameter name, e.g. "layers.3.moe.w1"
    index: tuple[int, ...]           # leading index into the target ((expert,) or () for all of it)
    source_shape: tuple[int, ...]
    transform: Callable[[np.ndarray], np.ndarray]


KeyRule = tuple[str, Callable[[re.Match, MixtralConfig], list[Placement]]]


def _t(w):
    return w.T


# KeyRule builders shared by the HF and Mistral tables.
def _whole(target, shape_fn, transform=lambda w: w):
    """One source tensor fills a whole parameter; `target` is formatted with the regex groups."""
    return lambda m, c: [Placement(target.format(*m.groups()), (), shape_fn(c), transform)]


def _heads(target, n_heads_fn, rope: bool = False):
    """A `[heads * head_dim, dim]` projection -> ours `[dim, heads, head_dim]`; `rope` permutes Mistral's
    interleaved wq/wk rows into HF's order first."""
    def rule(m, c):
        n = n_heads_fn(c)

        def transform(w):
            if rope:
                w = mistral_to_hf_rows(w, n)
            return w.T.reshape(c.dim, n, c.head_dim)
        return [Placement(target.format(*m.groups()), (), (n * c.head_dim, c.dim), transform)]
    return rule


def _expert(m, c):
    """`...experts.E.wN.weight` (groups: layer, expert, N) -> slice E of `layers.L.moe.wN`."""
    layer, e, which = m.groups()
    e = int(e)
    if e >= c.n_experts:
        return []  # reported as an unknown key
    shape = (c.dim, c.hidden_dim) if which == "2" else (c.hidden_dim, c.dim)
    return [Placement(f"layers.{layer}.moe.w{which}", (e,), shape, _t)]


def _wo(m, c):
    return [Placement(f"layers.{m.group(1)}.attn.wo", (), (c.dim, c.n_heads * c.head_dim),
                      lambda w: w.T.reshape(c.n_heads, c.head_dim, c.dim))]


def _hf_rules() -> list[KeyRule]:
    L = r"model\.layers\.(\d+)\."

    def gate_up(m, c):
        f = c.hidden_dim
        shape = (c.n_experts, 2 * f, c.dim)
        return [Placement(f"layers.{m.group(1)}.moe.w1", (), shape, lambda w: w[:, :f].transpose(0, 2, 1)),
                Placement(f"layers.{m.group(1)}.moe.w3", (), shape, lambda w: w[:, f:].transpose(0, 2, 1))]

    return [
        (r"model\.embed_tokens\.weight", _whole("embed", lambda c: (c.vocab_size, c.dim))),
        (r"lm_head\.weight", _whole("lm_head", lambda c: (c.vocab_size, c.dim), _t)),
        (r"model\.norm\.weight", _whole("norm.scale", lambda c: (c.dim,))),
        (L + r"input_layernorm\.weight", _whole("layers.{}.attn_norm.scale", lambda c: (c.dim,))),
        (L + r"post_attention_layernorm\.weight", _whole("layers.{}.moe_norm.scale", lambda c: (c.dim,))),
        (L + r"self_attn\.q_proj\.weight", _heads("layers.{}.attn.wq", lambda c: c.n_heads)),
        (L + r"self_attn\.k_proj\.weight", _heads("layers.{}.attn.wk", lambda c: c.n_kv_heads)),
        (L + r"self_attn\.v_proj\.weight", _heads("layers.{}.attn.wv", lambda c: c.n_kv_heads)),
        (L + r"self_attn\.o_proj\.weight", _wo),
        (L + r"(?:block_sparse_moe|mlp)\.gate\.weight",
         _whole("layers.{}.moe.router", lambda c: (c.n_experts, c.dim), _t)),
        (L + r"block_sparse_moe\.experts\.(\d+)\.w([123])\.weight", _expert),
        (L + r"mlp\.experts\.gate_up_proj", gate_up),
        (L + r"mlp\.experts\.down_proj",
         _whole("layers.{}.moe.w2", lambda c: (c.n_experts, c.dim, c.hidden_dim), lambda w: w.transpose(0, 2, 1))),
    ]


HF_RULES = _hf_rules()


class TensorSource(Protocol):
    """Read access to a checkpoint's tensors, whatever the file format."""

    def keys(self) -> Iterable[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> np.dtype: ...
    def get(self, key: str) -> np.ndarray: ...
    def location(self, key: str) -> tuple[str, int, np.dtype, tuple[int, ...]] | None: ...
    def release(self) -> None: ...


class TensorFile(Protocol):
    """One file of a checkpoint: `SafetensorsFile`, or a PyTorch file in `convert.mistral`."""

    path: str

    def keys(self) -> Iterable[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> np.dtype: ...
    def get(self, key: str) -> np.ndarray: ...
    def location(self, key: str) -> tuple[str, int, np.dtype, tuple[int, ...]] | None: ...
    def release(self) -> None: ...


class FileIndexedTensors:
    """A `TensorSource` over several files, each key held by exactly one of them."""

    def __init__(self, files: Iterable[TensorFile]):
        self.files = list(files)
        self._file_of: dict[str, TensorFile] = {}
        for f in self.files:
            for key in f.keys():
                if key in self._file_of:
                    raise CheckpointError(f"tensor {key!r} appears in both {self._file_of[key].path} and {f.path}")
                self._file_of[key] = f

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def file_of(self, key: str) -> TensorFile:
        return self._file_of[key]

    def shape(self, key):
        return self._file_of[key].shape(key)

    def dtype(self, key):
        return self._file_of[key].dtype(key)

    def get(self, key):
        return self._file_of[key].get(key)

    def location(self, key):
        """(path, offset, dtype, shape) where `key` lies uncompressed in a plain file, else None."""
        return self._file_of[key].location(key)

    def release(self):
        """Drop the memory-mapped pages read so far (they count as resident until then)."""
        for f in self.files:
            f.release()


def match_keys(source: TensorSource, rules: list[KeyRule], config: MixtralConfig,
         specs: Mapping[str, object]) -> dict[str, list[tuple[str, Placement]]]:
    """Map every source key to its placements; fail on unknown keys, bad shapes and missing parameters."""
    compiled = [(re.compile(pattern), fn) for pattern, fn in rules]
    by_target: dict[str, list[tuple[str, Placement]]] = {name: [] for name in specs}
    for key in source.keys():
        placements = next((fn(m, config) for rx, fn in compiled if (m := rx.fullmatch(key))), None)
        if not placements or any(p.target not in by_target for p in placements):
            raise CheckpointError(f"unexpected tensor {key!r}: not part of a Mixtral model with this config")
        shape = tuple(source.shape(key))
        if shape != placements[0].source_shape:
            raise CheckpointError(f"tensor {key!r} has shape {shape}, expected {placements[0].source_shape}")
        for p in placements:
            by_target[p.target].append((key, p))
    for name, spec in specs.items():
        parts = by_target[name]
        covered = {p.index for _, p in parts}
        if () in covered:
            if len(parts) > 1:
                raise CheckpointError(f"parameter {name} is given twice: {', '.join(k for k, _ in parts)}")
            continue
        need = {(i,) for i in range(spec.shape[0])} if parts else {()}
        if covered != need or len(parts) != len(covered):
            missing = sorted(need - covered)
            what = f"slices {[i[0] for i in missing]} of " if parts else ""
            raise CheckpointError(f"checkpoint is missing {what}parameter {name} (shape {spec.shape})")
    return by_target


def assemble(source: TensorSource, parts: list[tuple[str, Placement]], shape, dtype) -> np.ndarray:
    """One parameter in our layout and `dtype`, built from its source tensors."""
    if len(parts) == 1 and parts[0][1].index == ():
        key, p = parts[0]
        return np.ascontiguousarray(p.transform(source.get(key))).astype(dtype, copy=False)
    out = np.empty(shape, dtype)
    for key, p in parts:
        out[p.index] = p.transform(source.get(key))
    return out


# ------------------------------------------------------------------------------------ Mistral originals
def mistral_to_hf_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute the rows of a Mistral `wq`/`wk` ([n_heads * head_dim, dim], RoPE on interleaved pairs
    (2i, 2i+1)) into HF's order (pairs (i, i + head_dim/2)), as `convert_mixtral_weights_to_hf.py` does:
    `w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)`."""
    dim1, dim2 = w.shape
    return w.reshape(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(0, 2, 1, 3).reshape(dim1, dim2)


def _mistral_rules() -> list[KeyRule]:
    """Mistral's `consolidated.*` keys, both layouts: the release's per-expert `feed_forward.experts.E.wN`
    and the pre-release torrent's stacked `block_sparse_moe.wN` (`[E*F, D]`; each w2 slice is the
    transposed expert weight). wq/wk rows are permuted from interleaved RoPE into our (HF) convention."""
    L = r"layers\.(\d+)\."

    def stacked(m, c):
        layer, which = m.groups()
        e, f, d = c.n_experts, c.hidden_dim, c.dim
        if which == "2":  # slice e is w2_e.T: [F, D], already our (inputs-first) layout
            transform = lambda w: w.reshape(e, f, d)  # noqa: E731
        else:             # slice e is w1_e / w3_e: [F, D] -> ours [D, F]
            transform = lambda w: w.reshape(e, f, d).transpose(0, 2, 1)  # noqa: E731
        return [Placement(f"layers.{layer}.moe.w{which}", (), (e * f, d), transform)]

    return [
        (r"tok_embeddings\.weight", _whole("embed", lambda c: (c.vocab_size, c.dim))),
        (r"output\.weight", _whole("lm_head", lambda c: (c.vocab_size, c.dim), _t)),
        (r"norm\.weight", _whole("norm.scale", lambda c: (c.dim,))),
        (L + r"attention_norm\.weight", _whole("layers.{}.attn_norm.scale", lambda c: (c.dim,))),
        (L + r"ffn_norm\.weight", _whole("layers.{}.moe_norm.scale", lambda c: (c.dim,))),
        (L + r"attention\.wq\.weight", _heads("layers.{}.attn.wq", lambda c: c.n_heads, rope=True)),
        (L + r"attention\.wk\.weight", _heads("layers.{}.attn.wk", lambda c: c.n_kv_heads, rope=True)),
        (L + r"attention\.wv\.weight", _heads("layers.{}.attn.wv", lambda c: c.n_kv_heads, rope=False)),
        (L + r"attention\.wo\.weight", _wo),
        (L + r"(?:feed_forward|block_sparse_moe)\.gate\.weight",
         _whole("layers.{}.moe.router", lambda c: (c.n_experts, c.dim), _t)),
        (L + r"feed_forward\.experts\.(\d+)\.w([123])\.weight", _expert),
        (L + r"block_sparse_moe\.w([123])", stacked),
    ]


MISTRAL_RULES = _mistral_rules()
