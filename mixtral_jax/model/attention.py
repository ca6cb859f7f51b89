"""Attention, one entry point: `attention(q, k, v, span, ...)`, computed the way the backend does best.

All implementations give the plain one's numbers (causal by position, left padding, sliding window, grouped
query heads, an int8 KV cache's scales); they differ in memory and speed:

- `plain`:     the whole (queries x keys) score matrix at once. For decode (a few queries).
- `blockwise`: an online softmax over key tiles inside a `lax` loop (per query tile, a `lax.map`), so
               temporaries are one (query tile x key tile), never (t x s). From each tile's position
               summary a `lax.switch` skips a tile that the causal mask, the window, padding or unwritten
               cache slots hide entirely, and drops the mask where the tile is fully visible. Any
               backend; differentiable (tiles are recomputed in the backward pass).
- `splash`:    Pallas splash attention on TPU (`jax.experimental.pallas.ops.tpu.splash_attention`) for a
               sequence attending to itself (the full forward pass, training). Runs under `shard_map` on a
               mesh (batch and heads split as the rules say). `interpret=True` runs it on CPU for tests.
- `cudnn`:     `jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs for the same case;
               falls back to `blockwise` where cuDNN refuses the dtype or shape.

`span` gives positions, not a mask: the mask is built one tile at a time (a 32k x 32k boolean mask alone
is 1 GiB per sequence). Letters: b batch, t queries, s keys, h query heads, k KV heads, g query heads per KV
head, x head dim.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import Mesh, PartitionSpec

from mixtral_jax.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS
from mixtral_jax.kernels import cpu as cpu_kernels
from mixtral_jax.sharding.rules import activation_spec

Q_BLOCK: int | None = None   # queries per tile (blockwise); None: `tile_sizes`
KV_BLOCK: int | None = None  # keys per tile (blockwise); None: `tile_sizes`
PLAIN_MAX_QUERIES = 16       # `auto` takes `plain` for decode-sized calls (up to this many queries) ...
PLAIN_MAX_KEYS = 4096        # ... over caches up to this long (beyond, blockwise skips the unwritten slots)
CPU_TILE_BYTES = 3 << 20     # a CPU tile's float32 scores, all heads (measured best: 128 x 1024 for 6 heads)
_NEG = float(jnp.finfo(jnp.float32).min)


class Span(NamedTuple):
    """Where the queries and keys sit. q_pos (b, t), kv_pos (b, s) int32; kv_valid (b, s) bool (False for
    padding and for cache slots not written yet)."""

    q_pos: jax.Array
    kv_pos: jax.Array
    kv_valid: jax.Array


def make_mask(q_pos, kv_pos, kv_valid, window: int | None) -> jax.Array:
    """(b, t, s) boolean: causal by position, padding removed, and at most `window` keys back."""
    allowed = (kv_pos[:, None, :] <= q_pos[:, :, None]) & kv_valid[:, None, :]
    if window is not None:
        allowed &= q_pos[:, :, None] - kv_pos[:, None, :] < window
    return allowed


def attention(q, k, v, span: Span, *, window: int | None = None, k_scale=None, v_scale=None,
              self_attention: bool = False, impl: str = "auto", mesh: Mesh | None = None) -> jax.Array:
    """Grouped-query attention. q (b, t, h, x); k, v (b, k, s, x) in the cache layout (KV heads ahead of
    positions, so every implementation reads a cache as it lies); returns (b, t, h, x) in q's dtype.

    k_scale, v_scale (b, k, s): an int8 cache's per-token scales (k, v hold int8; the scales multiply the
    scores and the probabilities, so no dequantised copy of the cache is made). `self_attention`: k and v
    are the queries' own tokens, slot for slot (the full forward pass) - what splash and cuDNN take. `impl`:
    see `resolve`."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    if impl == "auto" and mesh is None and _cpu_kernel_takes(q, k):
        return attend_cpu_kernel(q, k, v, make_mask(*span, window), k_scale, v_scale)
    impl = resolve(impl, q.shape, k.shape, q.dtype, self_attention and k_scale is None, mesh)
    if impl == "blockwise":
        return attend_blockwise(q, k, v, span, window, k_scale, v_scale, platform=_platform(mesh))
    if impl == "splash":
        return attend_splash(q, k, v, span, window, mesh=mesh)
    if impl == "cudnn":
        out = attend_cudnn(q, k, v, span, window)
        if out is not None:
            return out
        impl = "blockwise"
    if impl == "blockwise":
        return attend_blockwise(q, k, v, span, window, k_scale, v_scale, platform=_platform(mesh))
    return attend_plain(q, k, v, span, window, k_scale, v_scale)


def _platform(mesh: Mesh | None) -> str:
    """The platform the program is for: the mesh's devices (a TPU slice planned on a CPU machine), else
    the default backend."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def resolve(impl: str, q_shape, k_shape, dtype, self_attention: bool, mesh: Mesh | None = None) -> str:
    """The implementation a call uses. `plain` and `blockwise` are taken as asked. `auto` means the
    platform's kernel (splash on TPU, cuDNN on GPU); a kernel serves self-attention where it takes the
    shape, and everything else (a cache, an odd shape) gets `plain` while the score matrix is small and
    `blockwise` beyond (which is also faster on CPU beyond a few queries)."""
    if impl in ("plain", "blockwise"):
        return impl
    t, s, head_dim = q_shape[1], k_shape[2], q_shape[3]
    if impl == "auto":
        impl = {"tpu": "splash", "gpu": "cudnn"}.get(_platform(mesh), "")
    if impl == "splash" and self_attention and splash_fits(t, head_dim):
        return "splash"
    if impl == "cudnn" and self_attention and cudnn_fits(dtype, head_dim):
        return "cudnn"
    if t <= PLAIN_MAX_QUERIES and (s <= PLAIN_MAX_KEYS or _platform(mesh) != "cpu"):
        return "plain"  # decode: one score row per query; an accelerator's loop steps cost more than it saves
    return "blockwise"


def tile_sizes(n_heads: int, platform: str) -> tuple[int, int]:
    """(queries, keys) per blockwise tile. On CPU a tile's scores (all heads) are ~3 MiB: for 512 queries
    over 16k keys, 6 heads of 16, 128 x 1024 tiles run ~1.3x faster than 64 x 512 (fewer loop steps) and
    2x faster than 512 x 512 (which spill out of cache); `plain` is 5-10x slower still (its score
    matrix streams through memory on every pass). Elsewhere, larger tiles (fewer loop steps for the
    accelerator)."""
    if platform != "cpu":
        return 512, 512
    queries = CPU_TILE_BYTES // (4 * n_heads * 1024)
    return max(16, min(512, 1 << max(0, queries.bit_length() - 1))), 1024


# ------------------------------------------------------------------------------------------ plain
def _cpu_kernel_takes(q, k) -> bool:
    """Decode on one CPU device in float32: `cpu_kernels.attend` (one call, no copy of the keys, the
    cache's unwritten slots skipped) where the kernels are built."""
    return q.dtype == jnp.float32 and q.shape[2] % k.shape[1] == 0 and cpu_kernels.usable(q.shape[1], k)


@jax.custom_jvp
def attend_cpu_kernel(q, k, v, mask, k_scale=None, v_scale=None) -> jax.Array:
    return cpu_kernels.attend(q, k, v, mask, k_scale, v_scale)


@attend_cpu_kernel.defjvp
def _attend_cpu_kernel_jvp(primals, tangents):  # XLA's tangent: training through a short sequence
    q, k, v, mask, k_scale, v_scale = primals
    dq, dk, dv, _, dks, dvs = tangents
    out = attend_cpu_kernel(*primals)
    _, dout = jax.jvp(lambda q, k, v, ks, vs: _attend_masked(q, k, v, mask, ks, vs), (q, k, v, k_scale, v_scale),
                      (dq, dk, dv, dks, dvs))
    return out, dout


def attend_plain(q, k, v, span: Span, window=None, k_scale=None, v_scale=None) -> jax.Array:
    return _attend_masked(q, k, v, make_mask(*span, window), k_scale, v_scale)


def _attend_masked(q, k, v, mask, k_scale=None, v_scale=None) -> jax.Array:
    b, t, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    dt = q.dtype
    qg = q.reshape(b, t, n_kv, n_heads // n_kv, head_dim)
    scores = jnp.einsum("btkgx,bksx->bkgts", qg, k.astype(dt), preferred_element_type=jnp.float32) * head_dim**-0.5
    if k_scale is not None:
        scores = scores * k_scale[:, :, None, None, :].astype(jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    if v_scale is not None:
        probs = probs * v_scale[:, :, None, None, :].astype(jnp.float32)
    out = jnp.einsum("bkgts,bksx->btkgx", probs.astype(dt), v.astype(dt))
    return out.reshape(b, t, n_heads, head_dim)


# -------------------------------------------------------------------------------------- blockwise
def _divisor_block(n: int, target: int) -> int:
    """The largest power of two <= target dividing n (n itself when it is small or odd-sized)."""
    if n <= target:
        return n
    block = 1 << int(math.log2(target))
    while block > 1 and n % block:
        block //= 2
    return block if block >= 16 else n


def attend_blockwise(q, k, v, span: Span, window=None, k_scale=None, v_scale=None, *,
                     q_block: int | None = None, kv_block: int | None = None, platform: str = "cpu") -> jax.Array:
    b, t, n_heads, head_dim = q.shape
    n_kv, s = k.shape[1], k.shape[2]
    g = n_heads // n_kv
    dt = q.dtype
    q_pos, kv_pos, kv_valid = span

    auto_q, auto_kv = tile_sizes(n_heads, platform)
    qb = min(q_block or Q_BLOCK or auto_q, t)
    n_qb = -(-t // qb)
    if n_qb * qb != t:  # pad the queries (cheap: O(t)); the padded rows are cut off at the end
        pad = n_qb * qb - t
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q_pos = jnp.pad(q_pos, ((0, 0), (0, pad)), mode="edge")
    kb = min(kv_block or KV_BLOCK or auto_kv, s)
    n_kb, tail = divmod(s, kb)  # whole key tiles in the loop; a shorter last one (a cache of 8192 + 16) after it

    # what each key tile holds: the smallest and largest position among its valid keys
    big = jnp.iinfo(jnp.int32).max
    held = jnp.where(kv_valid, kv_pos, big), jnp.where(kv_valid, kv_pos, -big)
    k_min = held[0][:, :n_kb * kb].reshape(b, n_kb, kb).min(-1)                       # (b, n_kb)
    k_max = held[1][:, :n_kb * kb].reshape(b, n_kb, kb).max(-1)
    k_all = kv_valid[:, :n_kb * kb].reshape(b, n_kb, kb).all(-1)                         # no padding, no empty slot

    scale = head_dim**-0.5
    q_tiles = q.reshape(b, n_qb, qb, n_kv, g, head_dim).transpose(1, 0, 2, 3, 4, 5)  # (n_qb, b, qb, k, g, x)
    pos_tiles = q_pos.reshape(b, n_qb, qb).transpose(1, 0, 2)                       # (n_qb, b, qb)

    def query_tile(args):
        qt, qp = args
        q_max, q_min = qp.max(-1), qp.min(-1)                                         # (b,)

        def key_tile(carry, start, size, lo, hi, complete):
            """Fold keys [start, start + size) into the online softmax: skipped when none of them is
            visible, unmasked when all are (every key valid, at or before every query, inside the window)."""
            needed = lo <= q_max
            whole = complete & (hi <= q_min)
            if window is not None:
                needed &= hi > q_min - window
                whole &= lo > q_max - window

            def compute(carry, masked: bool):
                m, denom, acc = carry
                cut = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, start, size, axis=axis)  # noqa: E731
                sc = jnp.einsum("btkgx,bksx->bkgts", qt, cut(k, 2).astype(dt), preferred_element_type=jnp.float32)
                sc = sc * scale if k_scale is None else sc * (scale * cut(k_scale, 2)[:, :, None, None, :])
                if masked:
                    ok = make_mask(qp, cut(kv_pos, 1), cut(kv_valid, 1), window)[:, None, None]  # (b, 1, 1, qb, kb)
                    sc = jnp.where(ok, sc, _NEG)
                m_new = jnp.maximum(m, sc.max(-1))
                p = jnp.exp(sc - m_new[..., None])
                if masked:
                    p = jnp.where(ok, p, 0.0)
                correction = jnp.exp(m - m_new)
                denom = denom * correction + p.sum(-1)
                if v_scale is not None:
                    p = p * cut(v_scale, 2)[:, :, None, None, :]
                pv = jnp.einsum("bkgts,bksx->bkgtx", p.astype(dt), cut(v, 2).astype(dt),
                                preferred_element_type=jnp.float32)
                return m_new, denom, acc * correction[..., None] + pv

            # recomputed in the backward pass: the loop then saves one carry per tile, not the tile's scores
            branches = (lambda c: c, jax.checkpoint(functools.partial(compute, masked=True)),
                        jax.checkpoint(functools.partial(compute, masked=False)))
            which = jnp.where(jnp.all(whole), 2, jnp.where(jnp.any(needed), 1, 0))
            return jax.lax.switch(which, branches, carry)

        carry = (jnp.full((b, n_kv, g, qb), _NEG, jnp.float32), jnp.zeros((b, n_kv, g, qb), jnp.float32),
                 jnp.zeros((b, n_kv, g, qb, head_dim), jnp.float32))
        carry = jax.lax.fori_loop(
            0, n_kb, lambda j, c: key_tile(c, j * kb, kb, k_min[:, j], k_max[:, j], k_all[:, j]), carry)
        if tail:
            rest = slice(n_kb * kb, None)
            carry = key_tile(carry, n_kb * kb, tail, held[0][:, rest].min(-1), held[1][:, rest].max(-1),
                             kv_valid[:, rest].all(-1))
        _, denom, acc = carry
        out = acc / jnp.where(denom == 0, 1.0, denom)[..., None]                     # (b, k, g, qb, x)
        return out.transpose(0, 3, 1, 2, 4).astype(dt)                                # (b, qb, k, g, x)

    if n_qb == 1:
        out = query_tile((q_tiles[0], pos_tiles[0]))[None]
    else:
        out = jax.lax.map(query_tile, (q_tiles, pos_tiles))                           # (n_qb, b, qb, k, g, x)
    out = out.transpose(1, 0, 2, 3, 4, 5).reshape(b, n_qb * qb, n_heads, head_dim)
    return out[:, :t]


# ----------------------------------------------------------------------------------------- splash
def splash_fits(t: int, head_dim: int) -> bool:
    """What the TPU kernel takes: sequences in whole 128-row tiles, lane-aligned heads."""
    return t % 128 == 0 and head_dim % 128 == 0


@functools.lru_cache(maxsize=32)
def _splash_kernel(t: int, g: int, window: int | None, interpret: bool):
    mask = splash_mask.CausalMask((t, t)) if window is None else splash_mask.LocalMask((t, t), (window - 1, 0), 0)
    block = _divisor_block(t, 512)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa_single_device(splash_mask.MultiHeadMask([mask] * g), block_sizes=sizes,
                                                interpret=interpret)


def attend_splash(q, k, v, span: Span, window=None, *, mesh: Mesh | None = None,
                  interpret: bool | None = None) -> jax.Array:
    """Splash attention for self-attention: causal (or local) by slot, which equals causal by position
    because padding is on the left; padding is a segment of its own (`SegmentIds`)."""
    if interpret is None:
        interpret = _platform(mesh) != "tpu"
    b, t, n_heads, head_dim = q.shape
    n_kv = k.shape[1]
    g = n_heads // n_kv
    kernel = _splash_kernel(t, g, window, interpret)

    def local(q, k, v, valid):
        lb = q.shape[0]
        qg = (q * head_dim**-0.5).reshape(lb, t, -1, g, head_dim).transpose(0, 2, 3, 1, 4)  # (b, k, g, t, x)
        seg = valid.astype(jnp.int32)

        def one_sequence(qs, ks, vs, seg):
            ids = splash.SegmentIds(q=seg, kv=seg)
            return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qs, ks, vs)

        out = jax.vmap(one_sequence)(qg, k, v, seg)                                   # (b, k, g, t, x)
        return out.transpose(0, 3, 1, 2, 4).reshape(lb, t, -1, head_dim).astype(q.dtype)

    if mesh is None:
        return local(q, k, v, span.kv_valid)
    q_spec = activation_spec(q.shape, ("batch", None, "q_heads", None), mesh)
    kv_spec = PartitionSpec(q_spec[0], q_spec[2], None, None)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0], None)),
                       out_specs=q_spec, check_vma=False)
    return fn(q, k, v, span.kv_valid)


# ------------------------------------------------------------------------------------------ cuDNN
def cudnn_fits(dtype, head_dim: int) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim <= 128 \
        and head_dim % 8 == 0


def attend_cudnn(q, k, v, span: Span, window=None, *, implementation: str | None = "cudnn") -> jax.Array | None:
    """cuDNN's fused attention for self-attention, or None where it refuses (the caller falls back).

    cuDNN masks padding by sequence length (padding on the right), so each row is rotated to put its
    left padding at the end and rotated back after: causal by slot is then causal by position."""
    t = q.shape[1]
    lengths = span.kv_valid.sum(-1).astype(jnp.int32)                                 # (b,)
    idx = (jnp.arange(t)[None, :] + (t - lengths)[:, None]) % t                       # real tokens first
    take = lambda a, axis: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2))  # noqa: E731
                                               if axis == 1 else idx[:, None, :, None], axis=axis)
    qr, kr, vr = take(q, 1), take(k, 2), take(v, 2)
    kr, vr = (jnp.swapaxes(a, 1, 2) for a in (kr, vr))                                # (b, t, k, x)
    try:
        out = jax.nn.dot_product_attention(
            qr, kr.astype(q.dtype), vr.astype(q.dtype), is_causal=True, query_seq_lengths=lengths,
            key_value_seq_lengths=lengths, local_window_size=None if window is None else (window - 1, 0),
            implementation=implementation)
    except (ValueError, NotImplementedError, RuntimeError, TypeError):
        return None
    back = (jnp.arange(t)[None, :] - (t - lengths)[:, None]) % t                      # undo the rotation
    return jnp.take_along_axis(out, back[:, :, None, None], axis=1)
