"""KV caches: preallocated keys and values for every layer, bf16/fp16/fp32 or int8 with a scale per token
and head, laid out on a mesh by the sharding rules (sequences over data x expert, KV heads over tensor).

- `KVCache`: a dense (batch, kv heads, slots, head dim) array pair per layer, one row per sequence (the
  sampler and training).
- `PagedKVCache`: fixed-size pages per layer, handed to sequences by page tables (the serving engine), in
  the layout of `mixtral_jax.model.paged_attention` (K and V interleaved on the head axis); `PagedBatch`
  says where a ragged step's tokens go.

Einsum letters as in `mixtral_jax.model.mixtral`: b batch, k kv heads, s slots, x head dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from mixtral_jax.config import KV_CACHE_DTYPES, MixtralConfig
from mixtral_jax.sharding.rules import CACHE_ROW_AXES, KV_CACHE_AXES, KV_SCALE_AXES, activation_spec, constrain


def quantize_kv(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 per token and head: a (..., x) -> (int8 values, float32 scales (...,)). The scale is
    max|a| / 127 over the head's vector, so each key and value keeps its own range."""
    af = a.astype(jnp.float32)
    scale = jnp.max(jnp.abs(af), axis=-1) / 127.0
    values = jnp.round(af / jnp.where(scale == 0, 1.0, scale)[..., None])
    return jnp.clip(values, -127, 127).astype(jnp.int8), scale


class LayerKV(NamedTuple):
    """One layer's slice of a `KVCache`: k, v (b, k, s, x); for an int8 cache also k_scale, v_scale (b, k, s)."""

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    def write(self, k, v, start, mesh=None) -> LayerKV:
        """Keys/values (b, k, t, x) written at slot `start` (quantised first for an int8 cache)."""
        put = lambda cache, new, axes: constrain(  # noqa: E731
            jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), start, axis=2), axes, mesh)
        if self.k_scale is None:
            return LayerKV(put(self.k, k, KV_CACHE_AXES), put(self.v, v, KV_CACHE_AXES))
        (k, ks), (v, vs) = quantize_kv(k), quantize_kv(v)
        return LayerKV(put(self.k, k, KV_CACHE_AXES), put(self.v, v, KV_CACHE_AXES),
                       put(self.k_scale, ks, KV_SCALE_AXES), put(self.v_scale, vs, KV_SCALE_AXES))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated keys/values for every layer, one slot per step; rows may hold different amounts of
    padding. k, v: one (b, kv_heads, s, head_dim) array per layer (separate arrays update in place; a
    stacked one would be sliced and restacked every step); positions, valid: (b, s); length: slots
    used; next_position (b,): the position the row's next token will have. An int8 cache (`dtype="int8"`)
    also holds k_scale, v_scale: one (b, kv_heads, s) float32 array per layer (a scale per token and head;
    half the bytes of bf16 plus 3%). On a mesh, the arrays are laid out by the sharding rules
    (`KV_CACHE_AXES`: sequences over data x expert, KV heads over tensor)."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    positions: jax.Array
    valid: jax.Array
    length: jax.Array
    next_position: jax.Array
    k_scale: tuple[jax.Array, ...] | None = None
    v_scale: tuple[jax.Array, ...] | None = None

    @classmethod
    def empty(cls, config: MixtralConfig, batch: int, size: int, dtype=jnp.bfloat16, mesh=None) -> KVCache:
        dtype = jnp.dtype(dtype)
        if dtype.name not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown KV cache dtype {dtype.name!r}; choose from {', '.join(KV_CACHE_DTYPES)}")
        shape = (batch, config.n_kv_heads, size, config.head_dim)
        per_layer = lambda shape, dtype: tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))  # noqa: E731
        scales = (lambda: per_layer(shape[:3], jnp.float32)) if dtype == jnp.int8 else (lambda: None)
        return cls(k=per_layer(shape, dtype), v=per_layer(shape, dtype),
                   positions=jnp.zeros((batch, size), jnp.int32), valid=jnp.zeros((batch, size), bool),
                   length=jnp.zeros((), jnp.int32), next_position=jnp.zeros((batch,), jnp.int32),
                   k_scale=scales(), v_scale=scales()).laid_out(mesh)

    def layer(self, i: int) -> LayerKV:
        if self.k_scale is None:
            return LayerKV(self.k[i], self.v[i])
        return LayerKV(self.k[i], self.v[i], self.k_scale[i], self.v_scale[i])

    def with_layers(self, layers: Sequence[LayerKV], **rows) -> KVCache:
        """A cache holding these layers' arrays, and `rows` (positions, valid, length, next_position) replaced."""
        quantized = layers[0].k_scale is not None
        return dataclasses.replace(self, k=tuple(lk.k for lk in layers), v=tuple(lk.v for lk in layers),
                                   k_scale=tuple(lk.k_scale for lk in layers) if quantized else None,
                                   v_scale=tuple(lk.v_scale for lk in layers) if quantized else None, **rows)

    def laid_out(self, mesh) -> KVCache:
        """This cache pinned to the rules' layout on `mesh` (inside jit; unchanged without a mesh)."""
        if mesh is None:
            return self
        pin = lambda arrays, axes: None if arrays is None else tuple(constrain(a, axes, mesh) for a in arrays)  # noqa: E731
        return KVCache(k=pin(self.k, KV_CACHE_AXES), v=pin(self.v, KV_CACHE_AXES),
                       positions=constrain(self.positions, CACHE_ROW_AXES, mesh),
                       valid=constrain(self.valid, CACHE_ROW_AXES, mesh), length=self.length,
                       next_position=constrain(self.next_position, CACHE_ROW_AXES[:1], mesh),
                       k_scale=pin(self.k_scale, KV_SCALE_AXES), v_scale=pin(self.v_scale, KV_SCALE_AXES))

    @property
    def size(self) -> int:
        return self.k[0].shape[2]


# ---------------------------------------------------------------------------------------- paged
class PagedBatch(NamedTuple):
    """Where one ragged step's tokens (S sequence shards x T token slots) go and what they see, in
    `mixtral_jax.model.paged_attention`'s layout: positions, slot_mapping (S, T) int32 (local page *
    page_size + offset, -1 for padding); kv_lens (S, B); page_indices (S, B, pages per sequence);
    cu_q_lens (S, B + 1); num_seqs (S,)."""

    positions: jax.Array
    slot_mapping: jax.Array
    kv_lens: jax.Array
    page_indices: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array


def page_spec(shape, n_kv_heads: int, mesh) -> PartitionSpec:
    """A page array's layout (pages, page_size, 2 kv heads[, head_dim]): pages over the sequence shards (the
    rules' `batch` axes), KV heads over `tensor` as far as the KV heads divide (K and V of a head together)."""
    seq = activation_spec(shape[:1], ("batch",), mesh)[0]
    heads = activation_spec((n_kv_heads,), ("kv_heads",), mesh)[0]
    return PartitionSpec(seq, None, heads, *([None] * (len(shape) - 3)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    """Every layer's pages: pages, one (num_pages, page_size, 2 * kv_heads, head_dim) array per layer (K of
    head h at 2h, V at 2h + 1); an int8 cache also holds scales, one (num_pages, page_size, 2 * kv_heads)
    float32 array per layer. A page belongs to whichever sequences' page tables name it (the engine's
    allocator decides): sequences come and go without moving anything. On a mesh the pages split over the
    sequence shards (each shard's sequences use its own pages, numbered locally) and KV heads over tensor."""

    pages: tuple[jax.Array, ...]
    scales: tuple[jax.Array, ...] | None = None

    @classmethod
    def empty(cls, config: MixtralConfig, num_pages: int, page_size: int, dtype=jnp.bfloat16,
              mesh=None) -> PagedKVCache:
        dtype = jnp.dtype(dtype)
        if dtype.name not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown KV cache dtype {dtype.name!r}; choose from {', '.join(KV_CACHE_DTYPES)}")
        shape = (num_pages, page_size, 2 * config.n_kv_heads, config.head_dim)
        per_layer = lambda shape, dtype: tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))  # noqa: E731
        scales = per_layer(shape[:3], jnp.float32) if dtype == jnp.int8 else None
        return cls(pages=per_layer(shape, dtype), scales=scales).laid_out(mesh)

    @staticmethod
    def shapes(config: MixtralConfig, num_pages: int, page_size: int, dtype, mesh=None) -> PagedKVCache:
        """The cache `empty` makes, as `ShapeDtypeStruct`s (with their shardings on `mesh`): for lowering
        ahead of time."""
        dtype = jnp.dtype(dtype)
        shape = (num_pages, page_size, 2 * config.n_kv_heads, config.head_dim)

        def struct(shape, dtype):
            sharding = None if mesh is None else NamedSharding(mesh, page_spec(shape, config.n_kv_heads, mesh))
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        scales = tuple(struct(shape[:3], jnp.float32) for _ in range(config.n_layers)) if dtype == jnp.int8 else None
        return PagedKVCache(pages=tuple(struct(shape, dtype) for _ in range(config.n_layers)), scales=scales)

    @staticmethod
    def bytes_per_page(config: MixtralConfig, page_size: int, dtype) -> int:
        """One page of every layer, scales included."""
        dtype = jnp.dtype(dtype)
        per_token = 2 * config.n_kv_heads * (config.head_dim * dtype.itemsize + (4 if dtype == jnp.int8 else 0))
        return config.n_layers * page_size * per_token

    def laid_out(self, mesh) -> PagedKVCache:
        """The pages pinned to their layout on `mesh` (inside jit; unchanged without a mesh)."""
        if mesh is None:
            return self
        n_kv = self.pages[0].shape[2] // 2
        pin = lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, page_spec(a.shape, n_kv, mesh)))  # noqa: E731
        return PagedKVCache(pages=tuple(map(pin, self.pages)),
                            scales=None if self.scales is None else tuple(map(pin, self.scales)))

    @property
    def num_pages(self) -> int:
        return self.pages[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.pages[0].shape[1]
