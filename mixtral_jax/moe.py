"""Mixture-of-experts: one router, several ways to run the experts, and the load-balancing loss.

Every strategy takes the same `Routing` (computed once by `route`) and returns the same numbers:

- `dense`:    every expert on every token, then a weighted sum. 4x the FLOPs of top-2; the reference.
- `ragged`:   sort the token copies by expert and run grouped matmuls (`jax.lax.ragged_dot`). Dropless.
              On GPU/TPU this is the grouped kernel; on CPU XLA lowers it to a dense dot over all groups.
- `capacity`: scatter token copies into fixed-size per-expert buckets `[E, C, D]` and run one batched
              matmul. When any bucket would overflow it falls back (inside `jit`, with `lax.cond`) to
              `dense`, so no token is ever dropped.
- `gather`:   gather each token's k experts' weights and run them directly. Reads only the experts that
              are used, which is what a small decode batch wants.

Einsum letters: t tokens, d model dim, f expert hidden dim, e experts, k experts per token, c bucket slot.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    logits: jax.Array   # (t, e) float32, the router's raw output (for the aux loss)
    weights: jax.Array  # (t, k) float32, softmax over the top-k logits
    experts: jax.Array  # (t, k) int32


def route(x: jax.Array, router: jax.Array, top_k: int) -> Routing:
    """Top-k routing in float32. Softmax over the k chosen logits equals HF's softmax-all, top-k, renormalise."""
    logits = jnp.einsum("td,de->te", x.astype(jnp.float32), router.astype(jnp.float32))
    top_logits, experts = jax.lax.top_k(logits, top_k)
    return Routing(logits, jax.nn.softmax(top_logits, axis=-1), experts.astype(jnp.int32))


def _swiglu(x, w1, w3, w2, spec_in: str, spec_w: str, spec_h: str, spec_w2: str, spec_out: str):
    h = jax.nn.silu(jnp.einsum(f"{spec_in},{spec_w}->{spec_h}", x, w1)) * jnp.einsum(f"{spec_in},{spec_w}->{spec_h}", x, w3)
    return jnp.einsum(f"{spec_h},{spec_w2}->{spec_out}", h, w2)


def moe_dense(x, routing: Routing, w1, w3, w2) -> jax.Array:
    y = _swiglu(x, w1, w3, w2, "td", "edf", "etf", "efd", "etd")  # (e, t, d)
    n_experts = w1.shape[0]
    combine = jnp.einsum("tk,tke->te", routing.weights, jax.nn.one_hot(routing.experts, n_experts))  # (t, e)
    return jnp.einsum("te,etd->td", combine.astype(y.dtype), y)


def moe_ragged(x, routing: Routing, w1, w3, w2) -> jax.Array:
    t, k = routing.experts.shape
    flat_experts = routing.experts.reshape(-1)                            # (t*k,)
    order = jnp.argsort(flat_experts, stable=True)                         # copies grouped by expert
    token_of = order // k
    group_sizes = jnp.bincount(flat_experts, length=w1.shape[0]).astype(jnp.int32)
    xs = x[token_of]                                                       # (t*k, d)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w1, group_sizes)) * jax.lax.ragged_dot(xs, w3, group_sizes)
    ys = jax.lax.ragged_dot(h, w2, group_sizes)                            # (t*k, d)
    ys = ys * routing.weights.reshape(-1)[order][:, None].astype(ys.dtype)
    return jnp.zeros_like(x).at[token_of].add(ys)


def bucket_capacity(n_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    """Slots per expert: `factor` times the balanced load, never more than every token (the exact bound)."""
    return max(1, min(n_tokens, math.ceil(factor * n_tokens * top_k / n_experts)))


def moe_capacity(x, routing: Routing, w1, w3, w2, capacity_factor: float = 2.0) -> jax.Array:
    t, k = routing.experts.shape
    n_experts = w1.shape[0]
    capacity = bucket_capacity(t, k, n_experts, capacity_factor)
    onehot = jax.nn.one_hot(routing.experts.reshape(-1), n_experts, dtype=jnp.int32)  # (t*k, e)
    slot = (jnp.cumsum(onehot, axis=0) - 1) * onehot                                   # position in its bucket
    slot = slot.sum(-1).reshape(t, k)
    overflow = jnp.max(onehot.sum(0)) > capacity

    def buckets(x):
        token_ids = jnp.broadcast_to(jnp.arange(t)[:, None], (t, k))
        dispatched = jnp.zeros((n_experts, capacity, x.shape[-1]), x.dtype)
        dispatched = dispatched.at[routing.experts, slot].set(x[token_ids], mode="drop")
        y = _swiglu(dispatched, w1, w3, w2, "ecd", "edf", "ecf", "efd", "ecd")  # (e, c, d)
        picked = y[routing.experts, slot]                                          # (t, k, d)
        return jnp.einsum("tk,tkd->td", routing.weights.astype(y.dtype), picked)

    if capacity >= t:  # buckets hold every token: cannot overflow
        return buckets(x)
    return jax.lax.cond(overflow, lambda x: moe_dense(x, routing, w1, w3, w2), buckets, x)


def moe_gather(x, routing: Routing, w1, w3, w2) -> jax.Array:
    y = _swiglu(x, w1[routing.experts], w3[routing.experts], w2[routing.experts],
                "td", "tkdf", "tkf", "tkfd", "tkd")
    return jnp.einsum("tk,tkd->td", routing.weights.astype(y.dtype), y)


STRATEGIES: dict[str, Callable] = {
    "dense": moe_dense, "ragged": moe_ragged, "capacity": moe_capacity, "gather": moe_gather,
}


def resolve_strategy(strategy: str, n_tokens: int, top_k: int, n_experts: int, backend: str | None = None) -> str:
    """Turn 'auto' into a concrete strategy for this backend and (static) token count.

    Chosen by `python -m bench.moe_strategies` (figures in the README): on CPU `capacity` is fastest from
    one decode token to a 1024-token prefill (5x dense at prefill, level with `gather` at batch 1); on GPU
    and TPU `ragged_dot` is a grouped kernel that touches only the experts in use.
    """
    if strategy != "auto":
        return strategy
    backend = backend or jax.default_backend()
    return "capacity" if backend == "cpu" else "ragged"


def run_experts(x, routing: Routing, w1, w3, w2, strategy: str = "auto", capacity_factor: float = 2.0):
    """Apply the experts to `x` (t, d) with the chosen strategy."""
    t, k = routing.experts.shape
    strategy = resolve_strategy(strategy, t, k, w1.shape[0])
    if strategy == "capacity":
        return moe_capacity(x, routing, w1, w3, w2, capacity_factor)
    return STRATEGIES[strategy](x, routing, w1, w3, w2)


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
