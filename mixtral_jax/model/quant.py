"""Weight-only int8: symmetric, one scale per output channel, applied after the dot.

A quantized weight is stored as two parameters: `w` (int8, the weight's own shape and logical axes) and
`w_scale` (float32, the weight's shape without its contracted axes, with their logical axes), so the
sharding rules lay the scales out with their weights and checkpoints hold them like any parameter.
`w ~= q * scale` with `scale = max|w| / 127` over the contracted axes (the inputs of one output channel).

In a matmul the int8 values are cast to the compute dtype *inside* the jitted step and the product is
multiplied by the scale afterwards (`qeinsum`): the whole weight is never dequantized into a stored
array. (On GPU and TPU XLA fuses the cast into the dot; XLA:CPU casts into a temporary first, see the
int8 section of docs/model.md for what that costs.)

`quantize` (numpy) is the one definition every path uses: the converter, verify, and quantizing while
loading, so a converted int8 checkpoint and one quantized on load hold the same bits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.kernels import cpu as cpu_kernels

SCALE_SUFFIX = "_scale"
_INV_127 = np.float32(1 / 127)  # a multiplication, as XLA would rewrite a division, so numpy and jax agree


def quantize(w: np.ndarray, contract: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values of w's shape, float32 scales of w's shape without `contract`): per output channel,
    symmetric, round to nearest. A channel of zeros gets scale 1 (its values are 0 either way). Stacked
    experts go one at a time, so the float32 temporaries are one expert's, not the whole stack's."""
    if w.ndim > 1 and 0 not in contract:
        parts = [quantize(w[i], tuple(a - 1 for a in contract)) for i in range(w.shape[0])]
        return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
    wf = np.asarray(w, dtype=np.float32)
    amax = np.max(np.abs(wf), axis=contract, keepdims=True)
    scale = np.where(amax > 0, amax * _INV_127, np.float32(1)).astype(np.float32)
    q = np.clip(np.rint(wf / scale), -127, 127).astype(np.int8)
    return q, np.squeeze(scale, axis=contract)


def quantize_jax(w: jax.Array, contract: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """`quantize` in jax (traceable: random initialisation under `nnx.eval_shape`); same formula."""
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=contract, keepdims=True)
    scale = jnp.where(amax > 0, amax * _INV_127, 1).astype(jnp.float32)
    q = jnp.clip(jnp.rint(wf / scale), -127, 127).astype(jnp.int8)
    return q, jnp.squeeze(scale, axis=contract)


def dequantize(q: np.ndarray, scale: np.ndarray, contract: tuple[int, ...]) -> np.ndarray:
    """float32 `q * scale` (for tests and error bounds; the model never does this)."""
    return q.astype(np.float32) * np.expand_dims(np.asarray(scale, np.float32), contract)


def contracted_axes(weight_axes, scale_axes) -> tuple[int, ...]:
    """Positions of the weight's logical axes that its scale lacks: the axes a matmul contracts."""
    return tuple(i for i, a in enumerate(weight_axes) if a not in scale_axes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """An int8 weight and its per-output-channel scales, passed to matmuls in place of a float array.

    Indexing with leading indices (experts) indexes both; `scale` has `q`'s axes minus the contracted
    ones, which are never leading, so the leading axes are shared."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.q.shape

    @property
    def ndim(self):
        return self.q.ndim

    def __getitem__(self, idx) -> QArray:
        return QArray(self.q[idx], self.scale[idx])


def read(w, scale=None, dtype=None):
    """A weight for the matmul helpers: `QArray(w, scale)` when quantized, else `w` cast to `dtype`."""
    if scale is not None:
        return QArray(w, scale)
    return w if dtype is None else w.astype(dtype)


def qeinsum(spec: str, x: jax.Array, w, *, cpu_kernel: bool = False, **kwargs) -> jax.Array:
    """`jnp.einsum(spec, x, w)` where `w` may be a `QArray`: int8 cast to x's dtype in the jitted step,
    scales applied to the product (every scale letter is an output letter). `cpu_kernel`: the caller runs
    on one device; a decode-sized product then goes through `cpu_kernels` where they are usable."""
    if cpu_kernel and (y := cpu_kernels.einsum(spec, x, w, **kwargs)) is not None:
        return y
    if not isinstance(w, QArray):
        return jnp.einsum(spec, x, w, **kwargs)
    inputs, out = spec.split("->")
    w_letters = inputs.split(",")[1]
    scale_letters = "".join(c for c in w_letters if c in out)
    y = jnp.einsum(spec, x, w.q.astype(x.dtype), **kwargs)
    scale = w.scale.astype(y.dtype)
    return jnp.einsum(f"{out},{scale_letters}->{out}", y, scale)


def qeinsums(specs, x: jax.Array, ws, *, cpu_kernel: bool = False) -> list[jax.Array]:
    """`[qeinsum(spec, x, w, cpu_kernel=cpu_kernel) ...]`, in one kernel call where `cpu_kernel` and the
    kernels take them all (`cpu_kernels.einsums`): the attention's q, k and v from one x."""
    if cpu_kernel and (ys := cpu_kernels.einsums(specs, x, ws)) is not None:
        return ys
    return [qeinsum(spec, x, w, cpu_kernel=cpu_kernel) for spec, w in zip(specs, ws, strict=True)]


def matmul(x: jax.Array, w) -> jax.Array:
    """`x @ w` for x (..., d) and a 2-D w (d, f), float or `QArray`."""
    if not isinstance(w, QArray):
        return x @ w
    return (x @ w.q.astype(x.dtype)) * w.scale.astype(x.dtype)


def ragged_dot(x: jax.Array, w, group_sizes: jax.Array, row_group: jax.Array | None = None) -> jax.Array:
    """`jax.lax.ragged_dot(x, w, group_sizes)`; for a `QArray`, each row's product times its group's
    scales (`row_group` (rows,): the group of each row, sorted as the groups are)."""
    if not isinstance(w, QArray):
        return jax.lax.ragged_dot(x, w, group_sizes)
    return _ragged_dot_int8(x, w.q, w.scale, group_sizes, row_group)


@jax.custom_vjp
def _ragged_dot_int8(x, q, scale, group_sizes, row_group):
    """`ragged_dot` of an int8 `QArray`, whose backward pass gives x's gradient only.

    int8 straight into the grouped matmul: a cast first would write a float copy of every local expert per
    step (XLA:TPU's ragged-dot kernel does not fuse it). The weights are frozen (LoRA on an int8 base), so
    the VJP is one grouped matmul of the scaled cotangent with the transposed int8 experts, in x's dtype:
    jax's own transpose keeps the float32 product and its float32 cotangent, rows x hidden each (in a
    Mixtral-8x7B LoRA step, ~0.9 GiB apiece per layer and device), and would differentiate the scales too.
    The scales count as constants (zero gradient), as the int8 values are."""
    y = jax.lax.ragged_dot(x, q, group_sizes, preferred_element_type=jnp.float32)
    return (y * _row_scales(scale, row_group)).astype(x.dtype)


def _row_scales(scale, row_group):
    """Each row's group's scales (rows, out), as selects that XLA fuses into their consumer: the gather
    `scale[row_group]` is written out whole (float32 rows x hidden, 1.75 GiB per matmul in a Mixtral-8x7B
    LoRA step with two local experts per device). Exact: every row's value is picked, not computed."""
    rows = jnp.broadcast_to(scale[0], (row_group.shape[0], scale.shape[1]))
    for g in range(1, scale.shape[0]):
        rows = jnp.where((row_group == g)[:, None], scale[g], rows)
    return rows


def _ragged_dot_int8_fwd(x, q, scale, group_sizes, row_group):
    # x's dtype travels as a zero-size array (residuals must be arrays)
    return _ragged_dot_int8(x, q, scale, group_sizes, row_group), (q, scale, group_sizes, row_group,
                                                                   jnp.zeros((0,), x.dtype))


def _ragged_dot_int8_bwd(res, ct):
    q, scale, group_sizes, row_group, like = res
    scaled = (ct.astype(jnp.float32) * _row_scales(scale, row_group)).astype(like.dtype)  # the output's scales
    dx = jax.lax.ragged_dot(scaled, jnp.swapaxes(q, 1, 2), group_sizes, preferred_element_type=like.dtype)
    return dx, None, jnp.zeros_like(scale), None, None


_ragged_dot_int8.defvjp(_ragged_dot_int8_fwd, _ragged_dot_int8_bwd)
