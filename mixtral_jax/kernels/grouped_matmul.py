"""A grouped matmul for the MoE on GPU: `jax.lax.ragged_dot`'s result from a Pallas Triton kernel.

XLA expands `ragged_dot` on CUDA into a masked dense dot over every group (G times the FLOPs and an
(m, G, k) temporary). Here rows sorted by group are laid out so that each group starts a block of rows,
and a block multiplies its own group's weights only: a prefill launches at most ~1.25x the routed rows'
FLOPs. Float or int8 weights (int8 goes into the kernel as int8, cast per tile). The backward pass is the
same kernel on the transposed weights for the input, per-block outer products for the weights. Off GPU
the kernel runs in Pallas' interpreter: exact, slow, for tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap dividing n (at least 16, Triton's smallest dot)."""
    b = cap
    while b > 16 and n % b:
        b //= 2
    if n % b:
        raise ValueError(f"grouped_matmul: dimension {n} is not a multiple of 16")
    return b


def _gmm_kernel(block_group_ref, x_ref, w_ref, o_ref, *, bk: int, bn: int, k_dim: int, compute_dtype):
    g = block_group_ref[pl.program_id(0)]
    n0 = pl.program_id(1) * bn

    @pl.when(g >= 0)
    def _():
        def body(i, acc):
            k0 = pl.multiple_of(i * bk, bk)
            x = x_ref[:, pl.ds(k0, bk)]
            w = w_ref[g, pl.ds(k0, bk), pl.ds(n0, bn)].astype(compute_dtype)
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, k_dim // bk, body, jnp.zeros(o_ref.shape, jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    @pl.when(g < 0)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def _gmm_blocks(m: int, n_groups: int) -> int:
    """Rows per block: the largest of 16, 32, 64 whose worst-case padding (every group starting a block,
    `n_groups * bm` rows) stays within a quarter of the `m` rows, so a prefill's grid launches at most
    1.25x the rows; 16 (Triton's smallest dot) for a decode step's few rows."""
    bm = 64
    while bm > 16 and n_groups * bm * 4 > m:
        bm //= 2
    return bm


def _gmm_padded(xp, w, block_group, bm: int, out_dtype, interpret: bool):
    """The kernel over row blocks: `xp` (blocks * bm, k), block b of group `block_group[b]` (-1: unused)."""
    mp, k = xp.shape
    n = w.shape[-1]
    bn, bk = _pow2_divisor(n, 128), _pow2_divisor(k, 64)
    kernel = functools.partial(_gmm_kernel, bk=bk, bn=bn, k_dim=k, compute_dtype=xp.dtype)
    return pl.pallas_call(
        kernel,
        grid=(mp // bm, n // bn),
        in_specs=[pl.BlockSpec(block_group.shape, lambda i, j: (0,)),
                  pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                  pl.BlockSpec(w.shape, lambda i, j: (0, 0, 0))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),
        cost_estimate=pl.CostEstimate(flops=2 * mp * k * n, transcendentals=0,
                                      bytes_accessed=xp.nbytes + w.nbytes + mp * n * jnp.dtype(out_dtype).itemsize),
        interpret=interpret,
        name="mixtral_gmm",
    )(block_group, xp, w)


def _gmm_layout(group_sizes, m: int, bm: int):
    """Where each sorted row goes when every group starts on a block boundary: (row -> padded row,
    block -> group or -1), for a static `blocks * bm >= m + groups * (bm - 1)`."""
    n_groups = group_sizes.shape[0]
    blocks = -(-m // bm) + n_groups
    padded = -(-group_sizes // bm) * bm
    padded_end = jnp.cumsum(padded)
    start = jnp.cumsum(group_sizes) - group_sizes
    row_group = jnp.repeat(jnp.arange(n_groups, dtype=jnp.int32), group_sizes, total_repeat_length=m)
    dest = (padded_end - padded)[row_group] + jnp.arange(m, dtype=jnp.int32) - start[row_group]
    block_group = jnp.searchsorted(padded_end, jnp.arange(blocks, dtype=jnp.int32) * bm, side="right")
    return dest, jnp.where(block_group < n_groups, block_group, -1).astype(jnp.int32), blocks


def grouped_matmul(x, w, group_sizes, out_dtype=None, interpret: bool | None = None):
    """`jax.lax.ragged_dot(x, w, group_sizes)` as a Pallas Triton kernel: `x` (m, k) rows sorted by group,
    `w` (groups, k, n) (float or int8), float32 accumulation, `out_dtype` default `x`'s. Rows are laid out
    so that each group starts a block; a block multiplies its group's weights only, unused blocks do nothing.
    `interpret=None`: the Triton kernel when lowered for CUDA, Pallas' interpreter elsewhere."""
    return _gmm(x, w, group_sizes, jnp.dtype(out_dtype or x.dtype), interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(x, w, group_sizes, out_dtype, interpret):
    return _gmm_forward(x, w, group_sizes, out_dtype, interpret)[0]


def _gmm_forward(x, w, group_sizes, out_dtype, interpret):
    m = x.shape[0]
    bm = _gmm_blocks(m, w.shape[0])
    dest, block_group, blocks = _gmm_layout(group_sizes.astype(jnp.int32), m, bm)
    xp = jnp.zeros((blocks * bm, x.shape[1]), x.dtype).at[dest].set(x)

    def run(interp):
        return lambda: _gmm_padded(xp, w, block_group, bm, out_dtype, interp)

    if interpret is None:
        out = jax.lax.platform_dependent(cuda=run(False), default=run(True))
    else:
        out = run(interpret)()
    return out[dest], (x, w, group_sizes, xp, dest, block_group, bm)


def _gmm_fwd(x, w, group_sizes, out_dtype, interpret):
    return _gmm_forward(x, w, group_sizes, out_dtype, interpret)


def _gmm_bwd(out_dtype, interpret, res, dy):
    x, w, group_sizes, xp, dest, block_group, bm = res
    dx = _gmm(dy.astype(x.dtype), jnp.swapaxes(w, 1, 2), group_sizes, x.dtype, interpret)
    # each block's outer product, summed into its group (unused blocks into a dropped extra group)
    dyp = jnp.zeros((xp.shape[0], dy.shape[1]), dy.dtype).at[dest].set(dy)
    per_block = jnp.einsum("bmk,bmn->bkn", xp.reshape(-1, bm, xp.shape[1]), dyp.reshape(-1, bm, dy.shape[1]),
                           preferred_element_type=jnp.float32)
    n_groups = w.shape[0]
    dw = jax.ops.segment_sum(per_block, jnp.where(block_group < 0, n_groups, block_group), n_groups + 1)[:n_groups]
    return dx, dw.astype(w.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
