"""Ragged paged attention as a Pallas kernel for NVIDIA GPUs (Pallas' Triton backend), over the page layout of
`paged_attention` (read its module docstring): one shard's ragged batch of prefill chunks and decode tokens,
each query attending to its own sequence's pages through the page table, causal, optional sliding window.

JAX's own GPU kernel (`jax.experimental.pallas.ops.gpu.paged_attention`) is decode-only and wants separate K
and V pages with heads first; reading our pages with it would copy the whole cache every step. This kernel
reads our pages where they lie.

- Grid: (query block, KV head). A query block is up to `bq` consecutive query tokens of ONE sequence; its
  rows are those tokens x the query heads of the KV head (`g` of them, padded to a power of two `group`),
  so the `g` heads that share a KV head share each K/V block read. Sequence i's blocks start at
  cu_q_lens[i] // bq + i, so t // bq + b blocks cover any batch of t tokens and b sequences (the spare ones
  are empty and return at once); `_blocks` maps each to its sequence in XLA before the kernel.
- A program walks its sequence's keys BLOCK_KEYS at a time, from the first its window can see to its last
  query's position, under an online softmax in float32 (the order `_attend_xla` uses). Each key's page comes
  from the page table (position // page_size), so a block need not be whole pages and page_size need not be
  a power of two; pages are gathered a row (one token's K or V of one head) at a time, never copied densely.
- Matmuls take q's dtype (bf16 pages: bf16 x bf16 with float32 accumulation; float32: IEEE float32, not
  TF32); int8 pages are cast to q's dtype and their per-(token, head) scales applied to the scores (K) and to
  the probabilities (V), as `_attend_xla` does.
- Rows past the shard's last sequence come back zero.

Block sizes are untuned (no GPU was measured): BLOCK_ROWS for steps with prefill chunks, DECODE_BLOCK_ROWS
when a step has no more tokens than sequences. Triton wants power-of-two block shapes and matmul sides of at
least 16: `fits` says which shapes the kernel takes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCK_ROWS = 64         # query rows (tokens x query heads of one KV head) a program, steps with prefill
DECODE_BLOCK_ROWS = 16  # the same when a step has no more tokens than sequences (decode: ~1 token a sequence)
BLOCK_KEYS = 64         # keys a step of the online softmax
NUM_WARPS = 4
NUM_STAGES = 2
INTERPRET = False       # tests: run through the Pallas interpreter (on CPU) when the caller does not say
_NEG = float(jnp.finfo(jnp.float32).min)
_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
_META = 7               # per block: sequence, first and end token, ctx (position - token), kv_len, key blocks lo, hi


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def fits(n_heads: int, n_kv: int, head_dim: int, q_dtype, kv_dtype) -> bool:
    """Whether the kernel takes these per-device shapes: a power-of-two head_dim of 16..256 (Triton block
    shapes are powers of two, its matmuls at least 16 a side), whole query groups, float queries, and
    bf16/f16/f32 or int8 pages."""
    return (16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0 and n_kv > 0 and n_heads % n_kv == 0
            and jnp.dtype(q_dtype) in _FLOATS and (jnp.dtype(kv_dtype) in _FLOATS or kv_dtype == jnp.int8))


def block_shape(t: int, b: int, g: int) -> tuple[int, int]:
    """(query heads a group, padded to a power of two; query tokens a block) for t tokens of b sequences."""
    group = _pow2(g)
    rows = _pow2(max(16, group, DECODE_BLOCK_ROWS if t <= b else BLOCK_ROWS))
    return group, rows // group


def _blocks(kv_lens, cu_q_lens, num_seqs, t: int, bq: int, window: int | None):
    """(t // bq + b, _META) int32: each query block's sequence, its tokens [q0, q1) in the shard's block,
    ctx (a token's position is ctx + token), kv_len and the key blocks [lo, hi) it reads; empty blocks
    (past a sequence's tokens, sequences with none, past num_seqs) have q0 = q1 = lo = hi = 0."""
    b = kv_lens.shape[0]
    cu = jnp.where(jnp.arange(b + 1) <= num_seqs, cu_q_lens, cu_q_lens[num_seqs])     # ignore past num_seqs
    start = cu[:-1] // bq + jnp.arange(b, dtype=jnp.int32)                              # strictly increasing
    blk = jnp.arange(t // bq + b, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(start, blk, side="right") - 1, 0, b - 1).astype(jnp.int32)
    q0 = cu[seq] + (blk - start[seq]) * bq
    q1 = jnp.minimum(q0 + bq, cu[seq + 1])
    empty = (q0 >= q1) | (blk < start[seq])
    kv_len = kv_lens[seq]
    ctx = kv_len - cu[seq + 1]
    hi = (jnp.maximum(ctx + q1, 0) + BLOCK_KEYS - 1) // BLOCK_KEYS                   # keys <= last position
    lo = jnp.zeros_like(hi) if window is None else jnp.maximum(ctx + q0 - window + 1, 0) // BLOCK_KEYS
    zero = lambda a: jnp.where(empty, 0, a)  # noqa: E731
    return jnp.stack([seq, zero(q0), zero(q1), ctx, kv_len, zero(lo), zero(jnp.maximum(hi, lo))],
                     axis=1).astype(jnp.int32)


def _dot(a, b, b_contract: int, precision):
    """a (m, c) with b (n, c) (b_contract 1) or (c, n) (0), accumulated in float32 (Triton's tl.dot)."""
    return lax.dot_general(a, b, (((1,), (b_contract,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _kernel(meta_ref, table_ref, q_ref, kv_ref, *rest, sm_scale, window, group, rows, page_size, int8):
    """One (query block, KV head): q_ref (k, t * group, x) rows token * group + head; kv_ref
    (pages * page_size, 2k, x); scales (pages * page_size, 2k) for int8; o_ref as q_ref."""
    scale_ref, o_ref = rest if int8 else (None, rest[0])
    blk, h = pl.program_id(0), pl.program_id(1)
    seq, q0, q1, ctx, kv_len, lo, hi = (meta_ref[blk, c] for c in range(_META))
    x, pages_per_seq, keys = q_ref.shape[-1], table_ref.shape[1], BLOCK_KEYS
    dt = q_ref.dtype
    precision = lax.Precision.HIGHEST if dt == jnp.float32 else None   # float32: IEEE, not TF32

    tok = q0 + lax.div(lax.iota(jnp.int32, rows), group)
    row_ok = tok < q1
    q_pos = ctx + tok
    row_mask = jnp.broadcast_to(row_ok[:, None], (rows, x))
    q_rows = q_ref.at[h, pl.ds(q0 * group, rows), :]
    qb = plgpu.load(q_rows, mask=row_mask, other=0)
    cols = lax.broadcasted_iota(jnp.int32, (keys, x), 1)

    def kv_block(j, carry):
        m, denom, acc = carry
        key_pos = j * keys + lax.iota(jnp.int32, keys)
        key_ok = key_pos < kv_len
        page = table_ref[seq, jnp.minimum(lax.div(key_pos, page_size), pages_per_seq - 1)]
        slot = jnp.where(key_ok, page * page_size + lax.rem(key_pos, page_size), 0)
        slots = jnp.broadcast_to(slot[:, None], (keys, x))
        key_mask = jnp.broadcast_to(key_ok[:, None], (keys, x))
        k = plgpu.load(kv_ref.at[slots, 2 * h, cols], mask=key_mask, other=0)
        sc = _dot(qb, k.astype(dt), 1, precision) * sm_scale                             # (rows, keys) f32
        if int8:
            sc = sc * plgpu.load(scale_ref.at[slot, 2 * h], mask=key_ok, other=0.0)[None, :]
        ok = row_ok[:, None] & (key_pos[None, :] <= q_pos[:, None]) & key_ok[None, :]
        if window is not None:
            ok &= q_pos[:, None] - key_pos[None, :] < window
        sc = jnp.where(ok, sc, _NEG)
        m_new = jnp.maximum(m, sc.max(axis=1))
        p = jnp.where(ok, jnp.exp(sc - m_new[:, None]), 0.0)
        correction = jnp.exp(m - m_new)
        denom = denom * correction + p.sum(axis=1)
        if int8:
            p = p * plgpu.load(scale_ref.at[slot, 2 * h + 1], mask=key_ok, other=0.0)[None, :]
        v = plgpu.load(kv_ref.at[slots, 2 * h + 1, cols], mask=key_mask, other=0)
        pv = _dot(p.astype(dt), v.astype(dt), 0, precision)
        return m_new, denom, acc * correction[:, None] + pv

    carry = (jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32),
             jnp.zeros((rows, x), jnp.float32))
    _, denom, acc = lax.fori_loop(lo, hi, kv_block, carry)
    out = acc / jnp.where(denom == 0, 1.0, denom)[:, None]
    plgpu.store(o_ref.at[h, pl.ds(q0 * group, rows), :], out.astype(o_ref.dtype), mask=row_mask)


def attend(q, pages, scales, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
           window: int | None, kind=None, interpret: bool | None = None):
    """One shard, as `paged_attention._attend_xla`: q (t, h, x), pages (p, ps, 2k, x), scales (p, ps, 2k)
    float32 for int8 pages or None, kv_lens (b,), page_indices (b, pages_per_seq), cu_q_lens (b + 1,),
    num_seqs (). Returns (t, h, x) in q's dtype. `interpret`: the Pallas interpreter (default INTERPRET)."""
    del kind
    t, n_heads, x = q.shape
    num_pages, page_size, two_k, _ = pages.shape
    n_kv = two_k // 2
    if not fits(n_heads, n_kv, x, q.dtype, pages.dtype):
        raise ValueError(f"the GPU paged attention kernel does not take heads {n_heads}/{n_kv} of {x} "
                         f"({q.dtype} queries, {pages.dtype} pages)")
    g = n_heads // n_kv
    b = page_indices.shape[0]
    group, bq = block_shape(t, b, g)
    meta = _blocks(kv_lens.astype(jnp.int32), cu_q_lens.astype(jnp.int32), num_seqs.astype(jnp.int32),
                   t, bq, window)
    # (k, t * group, x): a block's rows (its tokens x the KV head's query heads) are contiguous
    qt = jnp.pad(q.reshape(t, n_kv, g, x), ((0, 0), (0, 0), (0, group - g), (0, 0)))
    qt = qt.transpose(1, 0, 2, 3).reshape(n_kv, t * group, x)
    args = [meta, page_indices.astype(jnp.int32), qt, pages.reshape(num_pages * page_size, two_k, x)]
    int8 = scales is not None
    if int8:
        args.append(scales.reshape(num_pages * page_size, two_k))
    kernel = functools.partial(_kernel, sm_scale=float(sm_scale), window=window, group=group, rows=bq * group,
                               page_size=page_size, int8=int8)
    out = pl.pallas_call(
        kernel, grid=(meta.shape[0], n_kv), out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=INTERPRET if interpret is None else interpret, name="ragged_paged_attention_gpu",
    )(*args)
    out = out.reshape(n_kv, t, group, x)[:, :, :g].transpose(1, 0, 2, 3).reshape(t, n_heads, x)
    real = jnp.arange(t) < cu_q_lens[num_seqs]
    return jnp.where(real[:, None, None], out, 0).astype(q.dtype)
