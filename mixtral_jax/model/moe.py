"""Mixture-of-experts: one router, several ways to run the experts, and the load-balancing loss.

Every strategy takes the same `Routing` (computed once by `route`) and returns the same numbers:

- `dense`:    every expert on every token, then a weighted sum. 4x the FLOPs of top-2; the reference.
- `ragged`:   sort the token copies by expert and run grouped matmuls (`jax.lax.ragged_dot`). Dropless.
              On GPU/TPU this is the grouped kernel; on CPU XLA lowers it to a dense dot over all groups.
- `capacity`: scatter token copies into fixed-size per-expert buckets `[E, C, D]` and run one batched
              matmul. When any bucket would overflow it falls back (inside `jit`, with `lax.cond`) to
              `dense`, so no token is ever dropped.
- `gather`:   gather each token's k experts' weights and run them directly. Reads only the experts that
              are used, but copies them per token.
- `grouped`:  one matmul per expert on exactly the group of tokens routed to it (sorted by expert), in a
              bucket sized to that expert's own load (the smallest of a few static sizes that fits,
              chosen with `lax.switch`), and nothing at all for an expert with no tokens. Each branch
              reads its expert's weights in place, so a decode step reads only the experts it uses and a
              prefill pays ~10% padding instead of `capacity`'s 2x. Dropless by construction.
- `gmm`:      `ragged`'s sorted token copies through a Pallas Triton grouped matmul (`kernels.grouped_matmul`):
              each block of rows of one expert multiplies that expert's weights only, so it is sparse on
              GPU, where XLA expands `ragged_dot` into a masked dense dot over every expert. Int8 weights
              go into the kernel as int8. On other backends the same kernel runs in Pallas' interpreter
              (exact, slow: for tests).

LoRA (`ExpertLoRA`, built by `mixtral_jax.model.lora`): every strategy adds each expert's low-rank term
`(x @ a[e]) @ b[e] * scale` beside its base matmul, in the strategy's own form (einsums over buckets,
grouped `ragged_dot`s, per-expert matmuls): the merged weights `w + a @ b` are never formed, so the base
stays frozen (and int8) and a step costs ~rank/hidden extra FLOPs. Serving several adapters at once, they
are stacked along the rank and `ExpertLoRA.mask` (tokens, l) zeroes each token's columns of the others
(`lora.stack_adapters`): every strategy permutes that mask with its token copies.

Einsum letters: t tokens, d model dim, f expert hidden dim, e experts, r experts per token (top_k), c bucket slot,
l LoRA rank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.kernels import cpu as cpu_kernels
from mixtral_jax.kernels.grouped_matmul import grouped_matmul
from mixtral_jax.model import quant
from mixtral_jax.model.quant import QArray, qeinsum


class Routing(NamedTuple):
    logits: jax.Array      # (t, e) float32, the router's raw output (for the aux loss)
    weights: jax.Array     # (t, r) float32, softmax over the top-k logits
    expert_ids: jax.Array  # (t, r) int32, the chosen experts


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertLoRA:
    """The experts' low-rank adapters: per weight an (a, b) pair with a leading expert axis, or None.

    w1, w3: a (e, d, l), b (e, l, f); w2: a (e, f, l), b (e, l, d). Expert e's weight acts as
    `w[e] + scale * a[e] @ b[e]` (PEFT's `lora_B(lora_A(x)) * alpha / r`), computed as two thin products."""

    w1: tuple | None = None
    w3: tuple | None = None
    w2: tuple | None = None
    scale: float = dataclasses.field(default=1.0, metadata={"static": True})
    mask: jax.Array | None = None  # (tokens, l): which rank columns act on each token (None: all)

    def __getitem__(self, idx) -> ExpertLoRA:
        """Index the expert axis of every a and b (as `QArray` does); the token mask is kept as it is."""
        pick = lambda p: None if p is None else (p[0][idx], p[1][idx])  # noqa: E731
        return ExpertLoRA(pick(self.w1), pick(self.w3), pick(self.w2), self.scale, self.mask)

    def pair(self, name: str):
        return getattr(self, name)

    def rows(self, idx) -> ExpertLoRA:
        """The token mask's rows `idx` (the strategy's own order of token copies); unchanged without a mask."""
        return self if self.mask is None else dataclasses.replace(self, mask=self.mask[idx])

    def with_mask(self, mask) -> ExpertLoRA:
        return dataclasses.replace(self, mask=mask)


def _pair(lora: ExpertLoRA | None, name: str):
    return None if lora is None else lora.pair(name)


def _masked(h, mask):
    """h (..., l) with each token's rank columns outside its own adapter zeroed (`mask` broadcasts onto h)."""
    return h if mask is None else h * mask.astype(h.dtype)


def lora_einsum(spec: str, x: jax.Array, pair, scale: float, mask=None) -> jax.Array:
    """The low-rank term of `qeinsum(spec, x, w)` for a weight spec ending in (contracted, output) letters:
    `(x . a) . b * scale` with a = w's spec with its output letter made `l`, b = with its contracted one.
    `mask`: multiplies `x . a` (several adapters stacked along l, each token using its own columns)."""
    inputs, out = spec.split("->")
    x_spec, w_spec = inputs.split(",")
    o = w_spec[-1]
    mid = out.replace(o, "l")
    a, b = pair
    h = _masked(jnp.einsum(f"{x_spec},{w_spec[:-1]}l->{mid}", x, a.astype(x.dtype)), mask)
    return jnp.einsum(f"{mid},{w_spec[:-2]}l{o}->{out}", h, b.astype(x.dtype)) * jnp.asarray(scale, x.dtype)


def _dot(spec: str, x, w, pair, scale: float, mask=None):
    y = qeinsum(spec, x, w)
    return y if pair is None else y + lora_einsum(spec, x, pair, scale, mask)


def _ragged_lora(xs, pair, group_sizes, scale: float, mask=None):
    """Grouped low-rank term: each row through its group's a then b (two thin `ragged_dot`s)."""
    a, b = pair
    h = _masked(jax.lax.ragged_dot(xs, a.astype(xs.dtype), group_sizes), mask)
    return jax.lax.ragged_dot(h, b.astype(xs.dtype), group_sizes) * jnp.asarray(scale, xs.dtype)


def _with_ragged_lora(y, xs, lora, name, group_sizes):
    """`lora`'s mask (if any) in the rows' order, as `xs`."""
    pair = _pair(lora, name)
    return y if pair is None else y + _ragged_lora(xs, pair, group_sizes, lora.scale, lora.mask)


def route(x: jax.Array, router: jax.Array, top_k: int) -> Routing:
    """Top-k routing in float32. Softmax over the k chosen logits equals HF's softmax-all, top-k, renormalise."""
    logits = jnp.einsum("td,de->te", x.astype(jnp.float32), router.astype(jnp.float32))
    top_logits, expert_ids = jax.lax.top_k(logits, top_k)
    return Routing(logits, jax.nn.softmax(top_logits, axis=-1), expert_ids.astype(jnp.int32))


def without_padding(routing: Routing, valid: jax.Array) -> Routing:
    """Routing in which the padding tokens (`valid` (t,) False) weigh 0 and pick the experts of the first real
    token: a ragged serving step's empty slots then read no expert weights of their own (a decode step is
    bound by the experts it reads; three padding tokens beside one decode read up to twice as many)."""
    first = jnp.argmax(valid)
    ids = jnp.where(valid[:, None], routing.expert_ids, routing.expert_ids[first][None])
    return Routing(routing.logits, jnp.where(valid[:, None], routing.weights, 0), ids)


def _swiglu(x, w1, w3, w2, spec_in: str, spec_w: str, spec_h: str, spec_w2: str, spec_out: str,
            lora: ExpertLoRA | None = None):
    up = f"{spec_in},{spec_w}->{spec_h}"
    scale, mask = (1.0, None) if lora is None else (lora.scale, lora.mask)
    h = jax.nn.silu(_dot(up, x, w1, _pair(lora, "w1"), scale, mask)) * _dot(up, x, w3, _pair(lora, "w3"), scale, mask)
    return _dot(f"{spec_h},{spec_w2}->{spec_out}", h, w2, _pair(lora, "w2"), scale, mask)


def moe_dense(x, routing: Routing, w1, w3, w2, lora: ExpertLoRA | None = None) -> jax.Array:
    y = _swiglu(x, w1, w3, w2, "td", "edf", "etf", "efd", "etd", lora)  # (e, t, d)
    n_experts = w1.shape[0]
    combine = jnp.einsum("tr,tre->te", routing.weights, jax.nn.one_hot(routing.expert_ids, n_experts))  # (t, e)
    return jnp.einsum("te,etd->td", combine.astype(y.dtype), y)


def moe_ragged(x, routing: Routing, w1, w3, w2, lora: ExpertLoRA | None = None) -> jax.Array:
    t, k = routing.expert_ids.shape
    flat_experts = routing.expert_ids.reshape(-1)                            # (t*k,)
    order = jnp.argsort(flat_experts, stable=True)                         # copies grouped by expert
    token_of = order // k
    group_sizes = jnp.bincount(flat_experts, length=w1.shape[0]).astype(jnp.int32)
    xs = x[token_of]                                                       # (t*k, d)
    row_expert = flat_experts[order]                                       # int8: each row's scales
    lora = None if lora is None else lora.rows(token_of)
    up1 = _with_ragged_lora(quant.ragged_dot(xs, w1, group_sizes, row_expert), xs, lora, "w1", group_sizes)
    up3 = _with_ragged_lora(quant.ragged_dot(xs, w3, group_sizes, row_expert), xs, lora, "w3", group_sizes)
    h = jax.nn.silu(up1) * up3
    ys = _with_ragged_lora(quant.ragged_dot(h, w2, group_sizes, row_expert), h, lora, "w2", group_sizes)  # (t*k, d)
    ys = ys * routing.weights.reshape(-1)[order][:, None].astype(ys.dtype)
    return jnp.zeros_like(x).at[token_of].add(ys)


def bucket_capacity(n_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    """Slots per expert: `factor` times the balanced load, never more than every token (the exact bound)."""
    return max(1, min(n_tokens, math.ceil(factor * n_tokens * top_k / n_experts)))


class Buckets(NamedTuple):
    """Items (token copies) placed into fixed-size buckets: the capacity strategy's experts and the
    expert-parallel path's destination devices are both this."""

    bucket: jax.Array  # (c,) int32: which bucket each item goes to
    slot: jax.Array    # (c,) int32: its place in that bucket (arrival order)
    load: jax.Array    # (n,) int32: items per bucket; a bucket of capacity C overflows when load > C

    def overflows(self, capacity: int) -> jax.Array:
        return jnp.max(self.load) > capacity

    def dispatch(self, values: jax.Array, capacity: int, fill=0) -> jax.Array:
        """values (c, ...) -> (n, capacity, ...); items past a full bucket are dropped (check `overflows`)."""
        out = jnp.full((self.load.shape[0], capacity, *values.shape[1:]), fill, values.dtype)
        return out.at[self.bucket, self.slot].set(values, mode="drop")

    def collect(self, buckets: jax.Array) -> jax.Array:
        """(n, capacity, ...) -> (c, ...): each item's result, from where `dispatch` put it."""
        return buckets[self.bucket, self.slot]


def assign_buckets(bucket: jax.Array, n_buckets: int) -> Buckets:
    """Place items (c,) with bucket ids into `n_buckets` buckets, each item after the earlier ones."""
    onehot = jax.nn.one_hot(bucket, n_buckets, dtype=jnp.int32)  # (c, n)
    slot = ((jnp.cumsum(onehot, axis=0) - 1) * onehot).sum(-1)
    return Buckets(bucket.astype(jnp.int32), slot.astype(jnp.int32), onehot.sum(0))


def moe_capacity(x, routing: Routing, w1, w3, w2, capacity_factor: float = 2.0,
                 lora: ExpertLoRA | None = None) -> jax.Array:
    t, k = routing.expert_ids.shape
    n_experts = w1.shape[0]
    capacity = bucket_capacity(t, k, n_experts, capacity_factor)
    buckets = assign_buckets(routing.expert_ids.reshape(-1), n_experts)
    token_of = jnp.arange(t * k) // k

    def in_buckets(x):
        bucket_lora = lora if lora is None or lora.mask is None else lora.with_mask(
            buckets.dispatch(lora.mask[token_of], capacity))                       # (e, c, l) as the tokens
        y = _swiglu(buckets.dispatch(x[token_of], capacity), w1, w3, w2, "ecd", "edf", "ecf", "efd", "ecd",
                    bucket_lora)
        picked = buckets.collect(y).reshape(t, k, -1)                              # (t, r, d)
        return jnp.einsum("tr,trd->td", routing.weights.astype(y.dtype), picked)

    if capacity >= t:  # buckets hold every token: cannot overflow
        return in_buckets(x)
    return jax.lax.cond(buckets.overflows(capacity), lambda x: moe_dense(x, routing, w1, w3, w2, lora), in_buckets, x)


def moe_gather(x, routing: Routing, w1, w3, w2, lora: ExpertLoRA | None = None) -> jax.Array:
    ids = routing.expert_ids
    picked = None if lora is None else lora[ids]
    if picked is not None and picked.mask is not None:
        picked = picked.with_mask(picked.mask[:, None])  # (t, 1, l) onto h (t, k, l)
    y = _swiglu(x, w1[ids], w3[ids], w2[ids], "td", "tkdf", "tkf", "tkfd", "tkd", picked)
    return jnp.einsum("tr,trd->td", routing.weights.astype(y.dtype), y)


def bucket_sizes(n_tokens: int, top_k: int, n_experts: int) -> tuple[int, ...]:
    """The static bucket sizes of `grouped`, ending with `n_tokens` (an expert never gets more: top-k
    picks distinct experts). Each size is one more branch to compile; XLA:CPU multiplies a single row
    ~2x faster than a few (a matrix-vector product against a small-M matmul), so decode-sized inputs get
    powers of two; larger ones (compiled once per layer, in a loop over experts) a fine geometric
    ladder, so skewed routing pads as little as balanced routing does."""
    balanced = n_tokens * top_k / n_experts
    if balanced < 8:  # decode: powers of two, so an expert with one token runs a matrix-vector product
        return tuple(sorted({c for c in (1, 2, 4, 8, 16, 32) if c < n_tokens} | {n_tokens}))
    ladder, size = set(), balanced / 2
    while size < n_tokens:  # 1.25x apart from half the balanced load: pads by ~12%, at most 25%
        ladder.add(min(n_tokens, 8 * math.ceil(size / 8)))
        size *= 1.25
    return tuple(sorted(ladder | {n_tokens}))


def moe_grouped(x, routing: Routing, w1, w3, w2, expert_weights=None, lora: ExpertLoRA | None = None,
                valid: jax.Array | None = None) -> jax.Array:
    """`expert_weights`: optional (w1, w3, w2) as tuples of per-expert arrays (see `expert_views`); the
    decode form reads them in place of static slices of the stacked weights. `valid` (t,): the real tokens;
    the others' copies go to no expert (sorted last, counted nowhere) and their output rows are 0."""
    t, k = routing.expert_ids.shape
    n_experts = w1.shape[0]
    sizes = bucket_sizes(t, k, n_experts)
    flat_experts = routing.expert_ids.reshape(-1)
    if valid is not None:
        flat_experts = jnp.where(jnp.repeat(valid, k), flat_experts, n_experts)
    order = jnp.argsort(flat_experts, stable=True)                      # copies grouped by expert
    counts = jnp.bincount(flat_experts, length=n_experts).astype(jnp.int32)
    starts = jnp.cumsum(counts) - counts
    tail = jnp.full((t,), t, jnp.int32)                                   # row t of `rows`: zeros
    token_of = jnp.concatenate([(order // k).astype(jnp.int32), tail])  # padded so every slice fits
    weight_of = jnp.concatenate([routing.weights.reshape(-1)[order], jnp.zeros((t,), routing.weights.dtype)])
    rows = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
    out = jnp.zeros_like(rows)
    masks = None if lora is None or lora.mask is None else jnp.concatenate(
        [lora.mask, jnp.zeros((1, lora.mask.shape[1]), lora.mask.dtype)])     # padded as `rows`

    def expert_branch(e, size: int):
        def run(out, start, count):
            tokens = jax.lax.dynamic_slice_in_dim(token_of, start, size)
            weights = jax.lax.dynamic_slice_in_dim(weight_of, start, size)
            weights = jnp.where(jnp.arange(size) < count, weights, 0).astype(x.dtype)  # other experts' rows
            xs = rows[tokens]
            if lora is None:
                y = quant.matmul(jax.nn.silu(quant.matmul(xs, w1[e])) * quant.matmul(xs, w3[e]), w2[e])
            else:  # this expert's adapters: (s, d) @ (d, l) @ (l, f) beside the base (s, d) @ (d, f)
                mine = lora[e] if masks is None else lora[e].with_mask(masks[tokens])
                y = _swiglu(xs, w1[e], w3[e], w2[e], "sd", "df", "sf", "fd", "sd", mine)
            return out.at[tokens].add(y * weights[:, None])
        return run

    size_arr = jnp.asarray(sizes, jnp.int32)

    def one_expert(e, out):
        branch = jnp.where(counts[e] == 0, 0, 1 + jnp.searchsorted(size_arr, counts[e]))
        return jax.lax.switch(branch, [lambda out, start, count: out, *(expert_branch(e, c) for c in sizes)],
                              out, starts[e], counts[e])

    if sizes[0] == 1:  # decode-sized: unrolled, so `w[e]` is a static slice (or a view) read in place
        if expert_weights is not None:
            w1, w3, w2 = expert_weights
        for e in range(n_experts):
            out = one_expert(e, out)
    else:  # prefill-sized: one loop body instead of one per expert (compiles ~8x less; the
        out = jax.lax.fori_loop(0, n_experts, one_expert, out)  # dynamic `w[e]` copy is ~5% of a layer)
    return out[:t]


def expert_views(w) -> tuple | None:
    """One array per expert sharing `w`'s memory, or None where that is not possible.

    XLA:CPU copies a slice `w[e]` before a matmul can use it; a decode step that reads two experts then
    spends more time copying than multiplying. Separate arrays that alias the stacked parameter (a CPU
    buffer seen through numpy, put back without a copy) let each `grouped` branch read its expert in
    place. Anything that would need a copy (accelerators, sharded arrays) returns None: never 2x memory.
    An int8 `QArray` gives per-expert `QArray`s (views of its values and of its scales).
    """
    if isinstance(w, QArray):
        q, scale = expert_views(w.q), expert_views(w.scale)
        return None if q is None or scale is None else tuple(QArray(a, b) for a, b in zip(q, scale, strict=True))
    devices = w.devices() if isinstance(w, jax.Array) else ()
    if len(devices) != 1 or next(iter(devices)).platform != "cpu":
        return None
    host = np.asarray(w)
    base = w.unsafe_buffer_pointer()
    if host.ctypes.data != base:
        return None
    device = next(iter(devices))
    views = tuple(jax.device_put(host[e], device) for e in range(host.shape[0]))
    if any(v.unsafe_buffer_pointer() != base + e * host[0].nbytes for e, v in enumerate(views)):
        return None
    return views


# ------------------------------------------------------------------------------------------- gmm
def _gmm_dot(x, w, group_sizes, row_group):
    if w.shape[0] == 1:  # one local expert (expert-parallel over every expert): a plain dot, no blocks to pad
        return quant.ragged_dot(x, w, group_sizes, row_group)
    if not isinstance(w, QArray):
        return grouped_matmul(x, w, group_sizes)
    y = grouped_matmul(x, w.q, group_sizes, out_dtype=jnp.float32)  # int8 into the kernel
    return (y * w.scale[row_group]).astype(x.dtype)


def moe_gmm(x, routing: Routing, w1, w3, w2, lora: ExpertLoRA | None = None) -> jax.Array:
    """`moe_ragged` with `grouped_matmul` for the three grouped matmuls (LoRA's thin terms through
    `ragged_dot`: rank-wide, they cost ~l/f of the base even where XLA runs them densely)."""
    t, k = routing.expert_ids.shape
    flat_experts = routing.expert_ids.reshape(-1)
    order = jnp.argsort(flat_experts, stable=True)
    token_of = order // k
    group_sizes = jnp.bincount(flat_experts, length=w1.shape[0]).astype(jnp.int32)
    xs = x[token_of]
    row_expert = flat_experts[order]
    lora = None if lora is None else lora.rows(token_of)
    up1 = _with_ragged_lora(_gmm_dot(xs, w1, group_sizes, row_expert), xs, lora, "w1", group_sizes)
    up3 = _with_ragged_lora(_gmm_dot(xs, w3, group_sizes, row_expert), xs, lora, "w3", group_sizes)
    h = jax.nn.silu(up1) * up3
    ys = _with_ragged_lora(_gmm_dot(h, w2, group_sizes, row_expert), h, lora, "w2", group_sizes)
    ys = ys * routing.weights.reshape(-1)[order][:, None].astype(ys.dtype)
    return jnp.zeros_like(x).at[token_of].add(ys)


STRATEGIES: dict[str, Callable] = {
    "dense": moe_dense, "ragged": moe_ragged, "capacity": moe_capacity, "gather": moe_gather,
    "grouped": moe_grouped, "gmm": moe_gmm,
}


def resolve_strategy(strategy: str, backend: str | None = None) -> str:
    """Turn 'auto' into a concrete strategy for this backend (default: JAX's default backend).

    Chosen by `python -m bench.moe_strategies` (figures in docs/performance.md): on CPU `grouped` is fastest from
    one decode token to a 1024-token prefill; on TPU `ragged_dot` is a grouped kernel that touches only
    the experts in use; on GPU XLA expands `ragged_dot` into a masked dense dot over every expert, so
    `gmm` (the Pallas Triton grouped matmul) is the sparse one.
    """
    if strategy != "auto":
        return strategy
    backend = backend or jax.default_backend()
    return {"cpu": "grouped", "gpu": "gmm", "cuda": "gmm"}.get(backend, "ragged")


def run_experts(x, routing: Routing, w1, w3, w2, strategy: str = "auto", capacity_factor: float = 2.0,
                expert_weights=None, cpu_kernel: bool = False, lora: ExpertLoRA | None = None, valid=None):
    """Apply the experts to `x` (t, d) with the chosen strategy; `expert_weights` (see `expert_views`)
    serve `grouped` and are ignored by the others. `cpu_kernel`: `x` is on one device; `grouped` then
    runs a decode-sized `x` through `cpu_kernels.moe` where the kernels are usable (not with `lora`:
    the kernel has no low-rank terms). `lora`: the experts' adapters, added inside the strategy. `valid`
    (t,): the real tokens, for `grouped` (padding computes nothing; see `without_padding` for the rest)."""
    strategy = resolve_strategy(strategy)
    if cpu_kernel and lora is None and strategy == "grouped" and cpu_kernels.usable(x.shape[0], w1, w3, w2):
        return moe_kernel(x, routing, w1, w3, w2)
    # Eagerly, jit: `lax.switch` would otherwise compile its branches on every call. Under an outer jit,
    # call straight through: a nested jit boundary costs the decode step ~20% on XLA:CPU.
    run = _run_experts if isinstance(x, jax.core.Tracer) else _run_experts_jit
    return run(x, routing, w1, w3, w2, strategy, capacity_factor, expert_weights, lora, valid)


def _run_experts(x, routing, w1, w3, w2, strategy, capacity_factor, expert_weights, lora=None, valid=None):
    if strategy == "capacity":
        return moe_capacity(x, routing, w1, w3, w2, capacity_factor, lora)
    if strategy == "grouped":
        return moe_grouped(x, routing, w1, w3, w2, expert_weights, lora, valid)
    return STRATEGIES[strategy](x, routing, w1, w3, w2, lora)


@jax.custom_jvp
def moe_kernel(x, routing: Routing, w1, w3, w2) -> jax.Array:
    """`cpu_kernels.moe`: one custom call per layer that reads only the experts in use (no conditional
    per expert, no copies); its derivative is `moe_gather`'s, which computes the same function."""
    return cpu_kernels.moe(x, routing.expert_ids, routing.weights, w1, w3, w2)


@moe_kernel.defjvp
def _moe_kernel_jvp(primals, tangents):
    _, tangent = jax.jvp(moe_gather, primals, tangents)
    return moe_kernel(*primals), tangent


_run_experts_jit = jax.jit(_run_experts, static_argnames=("strategy", "capacity_factor"))


def load_balancing_loss(router_logits: jax.Array, top_k: int, mask: jax.Array | None = None) -> jax.Array:
    """Switch/HF auxiliary loss `E * sum_e f_e * P_e`, pooled over all layers and tokens.

    router_logits: (layers, tokens, e); mask: (tokens,) with 1 for real tokens, as HF's attention_mask.
    f_e is the fraction of top-k assignments that went to expert e (summed over the k slots, as HF does),
    P_e the mean router probability of e.
    """
    n_layers, n_tokens, n_experts = router_logits.shape
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    _, chosen = jax.lax.top_k(probs, top_k)
    assigned = jax.nn.one_hot(chosen, n_experts, dtype=jnp.float32).sum(-2)  # (layers, tokens, e)
    weight = jnp.ones((n_tokens,), jnp.float32) if mask is None else mask.reshape(-1).astype(jnp.float32)
    rows = n_layers * weight.sum()
    f = jnp.einsum("lte,t->e", assigned, weight) / rows
    p = jnp.einsum("lte,t->e", probs, weight) / rows
    return n_experts * jnp.sum(f * p)
