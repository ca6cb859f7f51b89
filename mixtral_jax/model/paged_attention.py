"""Attention over a paged KV cache: a ragged batch of prefill chunks and decode tokens in one call.

The layout is the one JAX's TPU kernel takes (`jax.experimental.pallas.ops.tpu.ragged_paged_attention`,
vLLM's TPU backend), so TPU runs it unchanged:

- one layer's pages `kv_pages` (num_pages, page_size, 2 * kv_heads, head_dim): K of KV head h at 2h, V at
  2h + 1. int8 pages carry `kv_scales` (num_pages, page_size, 2 * kv_heads) float32, one scale per token
  and head (as `kv_cache.quantize_kv`).
- sequence shards: on a mesh the pages split over the sequence axes (`batch`'s rule: data x expert, S
  shards; S = 1 without a mesh) and KV heads over `tensor`. A sequence lives on one shard; its page ids
  are local to it, its query tokens sit in that shard's block of `q`.
- per step, by shard: q (S, T, heads, head_dim); kv_lens (S, B) int32, each sequence's length including
  this step's tokens; page_indices (S, B, pages_per_seq) local page ids; cu_q_lens (S, B + 1) cumulative
  query lengths in the shard's block; num_seqs (S,). Query j of sequence i is at position
  kv_lens[i] - q_len_i + j and sees keys at positions <= its own (and > position - sliding_window).

Implementations: `xla` (any backend; tiles of query tokens read their sequences' pages a block at a time
under an online softmax, so temporaries are (tile x one block of keys), never a dense copy of the cache),
`pallas_tpu` (JAX's kernel; int8 pages are dequantised a step's pages at a time, since the kernel takes
only one scalar scale), `pallas_gpu` (our Pallas Triton kernel, `paged_attention_gpu`: the same pages read
through the page table, int8 too), `auto` (the kernel of the platform where it takes the shapes, else `xla`).
Letters: s shard, t tokens, b sequences, h query heads, k KV heads, g query heads per KV head,
n keys of a block, x head dim.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import ragged_paged_attention as tpu_rpa
from jax.sharding import Mesh, PartitionSpec

from mixtral_jax.model import paged_attention_gpu as gpu_rpa
from mixtral_jax.model.kv_cache import quantize_kv
from mixtral_jax.sharding.rules import activation_spec

IMPLEMENTATIONS = ("auto", "xla", "pallas_tpu", "pallas_gpu")
Q_TILE = 16           # xla: query tokens a tile (a decode tile of 16 sequences reads each one's pages once)
KV_BLOCK_KEYS = 256   # xla: keys a step of a tile's online softmax
TPU_KV_BUFFER_BYTES = 2 << 20  # pallas_tpu: one of the kernel's double-buffered KV blocks in VMEM
_NEG = float(jnp.finfo(jnp.float32).min)


# ------------------------------------------------------------------------------------------- mesh
def _specs(n_shards: int, n_kv_heads: int, mesh: Mesh | None):
    """(sequence-shard entry, kv-head entry) of the PartitionSpecs: the rules' `batch` and `kv_heads`
    axes, each as far as the dimension divides (KV heads split whole, so K and V of a head stay together)."""
    if mesh is None:
        return None, None
    return (activation_spec((n_shards,), ("batch",), mesh)[0],
            activation_spec((n_kv_heads,), ("kv_heads",), mesh)[0])


def _sharded(local, mesh, in_specs, out_specs, *args):
    if mesh is None:
        return local(*args)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def _by_shard(fn, n_local_shards: int, pages_args: int, *args):
    """Run `fn` once per sequence shard held here (one on a mesh whose sequence axes cover every shard):
    the first `pages_args` arguments are page arrays (their leading axis splits into the shards' pages),
    the rest have a leading shard axis. Returns fn's outputs stacked on a leading shard axis."""
    outs = []
    for i in range(n_local_shards):
        pages = [a.reshape(n_local_shards, a.shape[0] // n_local_shards, *a.shape[1:])[i] for a in args[:pages_args]]
        outs.append(fn(*pages, *(a[i] for a in args[pages_args:])))
    if isinstance(outs[0], tuple):  # write_pages: (pages, scales), the pages back in one array
        return tuple(jnp.concatenate(parts) for parts in zip(*outs))
    return jnp.stack(outs)


# ------------------------------------------------------------------------------------------ write
def write_pages(kv_pages, k, v, slot_mapping, kv_scales=None, *, mesh: Mesh | None = None):
    """This step's keys and values written into their pages: k, v (S, T, kv_heads, head_dim);
    slot_mapping (S, T) int32 = local page * page_size + offset, -1 for padding (not written). int8 pages
    are quantised per token and head. Returns (kv_pages, kv_scales); donate them to update in place."""
    n_shards, _, n_kv, _ = k.shape
    num_pages, page_size = kv_pages.shape[:2]
    if num_pages % n_shards:
        raise ValueError(f"{num_pages} pages do not split into {n_shards} sequence shards")
    if (kv_scales is not None) != (kv_pages.dtype == jnp.int8):
        raise ValueError("int8 pages need kv_scales, and only int8 pages take them")
    seq, heads = _specs(n_shards, n_kv, mesh)

    def one_shard(pages, scales, k, v, slots):                           # pages (p, ps, 2k, x); k, v (t, k, x)
        # indexed by (page, offset), not through a flat (pages * page_size) view: on TPU that reshape of the
        # scales' tiled minor dimensions would copy every layer's scales
        page = jnp.where(slots < 0, pages.shape[0], slots // page_size)     # padding: out of range, dropped
        offset = slots % page_size
        t = k.shape[0]
        if scales is None:
            kv = jnp.stack([k, v], axis=2).reshape(t, 2 * k.shape[1], -1).astype(pages.dtype)
            return pages.at[page, offset].set(kv, mode="drop"), None
        (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
        kv = jnp.stack([kq, vq], axis=2).reshape(t, -1, k.shape[-1])
        sc = jnp.stack([ks, vs], axis=2).reshape(t, -1)
        return pages.at[page, offset].set(kv, mode="drop"), scales.at[page, offset].set(sc, mode="drop")

    def local(pages, scales, k, v, slots):
        if scales is None:
            fn = lambda p, k, v, s: one_shard(p, None, k, v, s)[:1]  # noqa: E731
            return _by_shard(fn, k.shape[0], 1, pages, k, v, slots) + (None,)
        return _by_shard(one_shard, k.shape[0], 2, pages, scales, k, v, slots)

    page_spec = PartitionSpec(seq, None, heads, None)
    scale_spec = PartitionSpec(seq, None, heads)
    token_spec = PartitionSpec(seq, None, heads, None)
    if kv_scales is None:
        out = _sharded(lambda p, k, v, s: local(p, None, k, v, s)[0], mesh,
                       (page_spec, token_spec, token_spec, PartitionSpec(seq, None)), page_spec,
                       kv_pages, k, v, slot_mapping)
        return out, None
    return _sharded(local, mesh, (page_spec, scale_spec, token_spec, token_spec, PartitionSpec(seq, None)),
                    (page_spec, scale_spec), kv_pages, kv_scales, k, v, slot_mapping)


# -------------------------------------------------------------------------------------- attention
def ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
                           sliding_window: int | None = None, kv_scales=None, mesh: Mesh | None = None,
                           implementation: str = "auto") -> jax.Array:
    """Attention of every query token over its own sequence's pages (the layout in the module docstring).
    Returns (S, T, heads, head_dim) in q's dtype; rows past a shard's last sequence are zeros."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown paged attention implementation {implementation!r}; "
                         f"choose from {', '.join(IMPLEMENTATIONS)}")
    if (kv_scales is not None) != (kv_pages.dtype == jnp.int8):
        raise ValueError("int8 pages need kv_scales, and only int8 pages take them")
    n_shards, _, n_heads, head_dim = q.shape
    n_kv = kv_pages.shape[2] // 2
    if kv_pages.shape[0] % n_shards or n_heads % n_kv or kv_pages.shape[3] != head_dim:
        raise ValueError(f"pages {kv_pages.shape} do not fit queries {q.shape} in {n_shards} shards")
    impl = resolve(implementation, q, kv_pages, mesh)
    seq, heads = _specs(n_shards, n_kv, mesh)
    kind = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).device_kind
    kw = dict(sm_scale=float(sm_scale), window=sliding_window, kind=kind)
    one = {"pallas_tpu": _attend_tpu, "pallas_gpu": gpu_rpa.attend}.get(impl, _attend_xla)

    def local(q, pages, scales, kv_lens, page_indices, cu_q_lens, num_seqs):
        if scales is None:
            fn = lambda p, *rest: one(rest[0], p, None, *rest[1:], **kw)  # noqa: E731
            return _by_shard(fn, q.shape[0], 1, pages, q, kv_lens, page_indices, cu_q_lens, num_seqs)
        fn = lambda p, s, *rest: one(rest[0], p, s, *rest[1:], **kw)  # noqa: E731
        return _by_shard(fn, q.shape[0], 2, pages, scales, q, kv_lens, page_indices, cu_q_lens, num_seqs)

    q_spec, page_spec = PartitionSpec(seq, None, heads, None), PartitionSpec(seq, None, heads, None)
    rows = (PartitionSpec(seq, None), PartitionSpec(seq, None, None), PartitionSpec(seq, None), PartitionSpec(seq))
    if kv_scales is None:
        return _sharded(lambda q, p, *r: local(q, p, None, *r), mesh, (q_spec, page_spec, *rows), q_spec,
                        q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    return _sharded(local, mesh, (q_spec, page_spec, PartitionSpec(seq, None, heads), *rows), q_spec,
                    q, kv_pages, kv_scales, kv_lens, page_indices, cu_q_lens, num_seqs)


def _platform(mesh: Mesh | None) -> str:
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def resolve(implementation: str, q, kv_pages, mesh: Mesh | None = None) -> str:
    """`auto`: JAX's kernel on TPU when each device's heads tile for it (see `tpu_fits`), ours on GPU when
    each device's shapes suit Triton (`paged_attention_gpu.fits`), else `xla`."""
    if implementation != "auto":
        return implementation
    platform = _platform(mesh)
    if platform in ("tpu", "gpu", "cuda"):
        n_kv = kv_pages.shape[2] // 2
        heads = _specs(q.shape[0], n_kv, mesh)[1]
        axes = () if heads is None else (heads,) if isinstance(heads, str) else heads
        split = math.prod(mesh.shape[a] for a in axes)
        kv_dtype = q.dtype if kv_pages.dtype == jnp.int8 else kv_pages.dtype
        if platform == "tpu" and tpu_fits(q.shape[2] // split, 2 * n_kv // split, q.shape[3], q.dtype, kv_dtype):
            return "pallas_tpu"
        if platform != "tpu" and gpu_rpa.fits(q.shape[2] // split, n_kv // split, q.shape[3], q.dtype,
                                              kv_pages.dtype):
            return "pallas_gpu"
    return "xla"


def tpu_fits(n_heads: int, n_combined_kv: int, head_dim: int, q_dtype, kv_dtype) -> bool:
    """What the TPU kernel takes per device: lane-aligned heads and a combined-KV-head count it tiles."""
    if head_dim % 128:
        return False
    try:
        tpu_rpa.kernel.get_min_heads_per_blk(n_heads, n_combined_kv, q_dtype, kv_dtype)
    except ValueError:
        return False
    return True


def tpu_block_sizes(device_kind: str, q, pages, pages_per_seq: int) -> tuple[int, int]:
    """(KV pages, queries) per kernel block: JAX's tuned table (`tuned_block_sizes`) looked up for the
    device the program is for, not `jax.devices()[0]` as JAX does (a TPU slice planned on a CPU host)."""
    table = tpu_rpa.tuned_block_sizes
    q_heads, combined = tpu_rpa.kernel.get_min_heads_per_blk(q.shape[1], pages.shape[2], q.dtype, pages.dtype)
    key = table.simplify_key((q.dtype, pages.dtype, q_heads, combined // 2, q.shape[2], pages.shape[1],
                              q.shape[0], pages_per_seq))
    name = " ".join(device_kind.split()[:2])
    kv_blocks, q_blocks = table.TUNED_BLOCK_SIZES.get(name, {}).get(key, (128, 32))
    if name == "TPU v4":
        kv_blocks, q_blocks = 32, 32  # JAX's untuned v4 default, sized to fit VMEM
    # the table stops at 4096-token sequences, and its default (128 pages) overflows v5e's 16 MiB of scoped
    # VMEM for Mixtral's heads (measured: 64 pages of 64 tokens, 16.8 MiB): keep each of the kernel's two
    # KV buffers to TPU_KV_BUFFER_BYTES
    page_bytes = pages.shape[1] * combined * pages.shape[3] * pages.dtype.itemsize
    kv_blocks = min(kv_blocks, max(1, TPU_KV_BUFFER_BYTES // page_bytes))
    return min(pages_per_seq, kv_blocks), min(q.shape[0], q_blocks)


def _token_rows(kv_lens, cu_q_lens, num_seqs, t: int):
    """Per token slot: its sequence, its position, and whether it is a real token (not padding)."""
    b = kv_lens.shape[0]
    end = cu_q_lens[num_seqs]
    cu = jnp.where(jnp.arange(b + 1) <= num_seqs, cu_q_lens, end)          # entries past num_seqs: ignored
    tok = jnp.arange(t, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cu[1:], tok, side="right"), b - 1).astype(jnp.int32)
    real = tok < end
    q_len = cu[seq + 1] - cu[seq]
    pos = kv_lens[seq] - q_len + (tok - cu[seq])
    return seq, pos, real


def _attend_xla(q, pages, scales, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale, window, kind=None):
    """One shard: q (t, h, x), pages (p, ps, 2k, x). The tokens go in tiles of Q_TILE; a tile attends to
    each sequence it holds tokens of in turn, reading that sequence's pages a block at a time under an
    online softmax (rows of other sequences masked), from the first block its window sees to the last it
    holds. A prefill chunk is then (tile x keys) matmuls over its pages read once a tile; a tile of decode
    tokens reads each sequence's pages once, as a token at a time would."""
    t, n_heads, head_dim = q.shape
    page_size, n_kv = pages.shape[1], pages.shape[2] // 2
    g = n_heads // n_kv
    tq = min(Q_TILE, t)
    n_tiles = -(-t // tq)
    qp = jnp.pad(q, ((0, n_tiles * tq - t), (0, 0), (0, 0))).reshape(n_tiles * tq, n_kv, g, head_dim)
    pages_per_seq = page_indices.shape[1]
    block = max(1, min(pages_per_seq, KV_BLOCK_KEYS // page_size))          # pages per inner step
    keys = block * page_size
    table = jnp.pad(page_indices, ((0, 0), (0, -(-pages_per_seq // block) * block - pages_per_seq)))
    seq, pos, real = _token_rows(kv_lens, cu_q_lens, num_seqs, n_tiles * tq)
    dt = q.dtype

    def tile(i, out):
        cut = lambda a: jax.lax.dynamic_slice_in_dim(a, i * tq, tq)  # noqa: E731
        qt, st, pt, rt = cut(qp), cut(seq), cut(pos), cut(real)

        def one_sequence(b, carry):
            mine = rt & (st == b)
            kv_len = kv_lens[b]
            last = (jnp.minimum(kv_len, jnp.max(jnp.where(mine, pt, -1)) + 1) + keys - 1) // keys
            first = 0 if window is None else \
                jnp.maximum(jnp.min(jnp.where(mine, pt, 1 << 30)) - window + 1, 0) // keys
            ids_row = table[b]

            def kv_block(j, carry):
                m, denom, acc = carry
                ids = jax.lax.dynamic_slice_in_dim(ids_row, j * block, block)
                kv = pages[ids].reshape(keys, 2 * n_kv, head_dim)                         # (n, 2k, x)
                sc = jnp.einsum("tkgx,nkx->tkgn", qt, kv[:, 0::2].astype(dt),
                                preferred_element_type=jnp.float32) * sm_scale
                if scales is not None:
                    sv = scales[ids].reshape(keys, 2 * n_kv)
                    sc = sc * sv[:, 0::2].T[None, :, None, :]
                key_pos = j * keys + jnp.arange(keys)
                ok = mine[:, None] & (key_pos[None, :] <= pt[:, None]) & (key_pos[None, :] < kv_len)
                if window is not None:
                    ok &= pt[:, None] - key_pos[None, :] < window
                ok = ok[:, None, None, :]                                                  # (t, 1, 1, n)
                sc = jnp.where(ok, sc, _NEG)
                m_new = jnp.maximum(m, sc.max(-1))
                p = jnp.where(ok, jnp.exp(sc - m_new[..., None]), 0.0)
                correction = jnp.exp(m - m_new)
                denom = denom * correction + p.sum(-1)
                if scales is not None:
                    p = p * sv[:, 1::2].T[None, :, None, :]
                pv = jnp.einsum("tkgn,nkx->tkgx", p.astype(dt), kv[:, 1::2].astype(dt),
                                preferred_element_type=jnp.float32)
                return m_new, denom, acc * correction[..., None] + pv

            return jax.lax.fori_loop(first, jnp.maximum(first, last), kv_block, carry)

        carry = (jnp.full((tq, n_kv, g), _NEG, jnp.float32), jnp.zeros((tq, n_kv, g), jnp.float32),
                 jnp.zeros((tq, n_kv, g, head_dim), jnp.float32))
        s_first = st[0]
        s_last = jnp.max(jnp.where(rt, st, s_first - 1))
        _, denom, acc = jax.lax.fori_loop(s_first, s_last + 1, one_sequence, carry)
        res = acc / jnp.where(denom == 0, 1.0, denom)[..., None]
        res = jnp.where(rt[:, None, None, None], res, 0.0).reshape(tq, n_heads, head_dim).astype(dt)
        return jax.lax.dynamic_update_slice_in_dim(out, res, i * tq, axis=0)

    used = (cu_q_lens[num_seqs] + tq - 1) // tq                                      # tiles holding tokens
    out = jax.lax.fori_loop(0, used, tile, jnp.zeros((n_tiles * tq, n_heads, head_dim), dt))
    return out[:t]


def _attend_tpu(q, pages, scales, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale, window, kind):
    """One shard through JAX's TPU kernel. int8 pages: the kernel takes a scalar scale only, so the pages
    this step's sequences hold are gathered and dequantised to q's dtype (one layer's live pages, a
    temporary), and the page table renumbered onto that copy."""
    if scales is not None:
        n_seqs, per_seq = page_indices.shape
        live = (jnp.arange(n_seqs) < num_seqs)[:, None]
        ids = jnp.where(live, page_indices, 0).reshape(-1)
        kv = pages[ids].astype(jnp.float32) * scales[ids][..., None]
        pages = kv.astype(q.dtype)
        page_indices = jnp.arange(n_seqs * per_seq, dtype=jnp.int32).reshape(n_seqs, per_seq)
    kv_blocks, q_blocks = tpu_block_sizes(kind, q, pages, page_indices.shape[1])
    out = tpu_rpa.ragged_paged_attention(q, pages, kv_lens, page_indices, cu_q_lens, num_seqs.reshape(1),
                                         sm_scale=sm_scale, sliding_window=window,
                                         num_kv_pages_per_block=kv_blocks, num_queries_per_block=q_blocks)
    real = jnp.arange(q.shape[0]) < cu_q_lens[num_seqs]
    return jnp.where(real[:, None, None], out, 0).astype(q.dtype)
