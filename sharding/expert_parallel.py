"""Expert parallelism: the MoE layer as an explicit `jax.shard_map` over the mesh, dropless and exact.

Tokens are split over every device of a data group (`data` x `expert`); each device routes its own
tokens, packs the token copies into one fixed-size bucket per expert shard, and `all_to_all` sends each
bucket to the devices holding those experts. They run their local experts (the hidden dimension split
over `tensor`, summed with `psum`), and a second `all_to_all` brings results home, where each token adds
its k weighted results. A bucket that would overflow (skewed routing) makes every device take, together,
the exact path whose buckets hold all of a device's token copies: no token is ever dropped.

When the tokens do not split evenly over the devices (a decode step with batch 1 on 8 devices), the
tokens stay replicated over `expert`: each device runs its local experts on the tokens routed to them
and a `psum` over `expert` adds the results. Same numbers, no all_to_all.

Letters: c token copies (tokens x k), n expert shards, r received rows, e local experts, d, f as usual.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mixtral_jax.moe import Routing, bucket_capacity, route, run_experts


def _local_experts(x, local_expert, weight, w1, w3, w2, strategy, capacity_factor):
    """Each row of x (r, d) through its one local expert, times `weight` (r,); hidden dim may be split."""
    routing = Routing(None, weight[:, None], local_expert[:, None])
    return run_experts(x, routing, w1, w3, w2, strategy, capacity_factor)


def _token_axes(mesh: Mesh, n_tokens: int):
    """The mesh axes the flattened tokens split over, or None if they must stay replicated."""
    for axes in (("data", "expert"), ("data",)):
        if n_tokens % math.prod(mesh.shape[a] for a in axes) == 0:
            return axes
    return None


def moe_expert_parallel(x, router, w1, w3, w2, *, top_k: int, mesh: Mesh, strategy: str = "auto",
                        capacity_factor: float = 2.0) -> tuple[jax.Array, jax.Array]:
    """x (t, d) -> (output (t, d), router logits (t, E)) with experts sharded over `mesh`'s `expert` axis."""
    n_tokens = x.shape[0]
    n_experts = w1.shape[0]
    n_shards = mesh.shape["expert"]
    local = n_experts // n_shards
    token_axes = _token_axes(mesh, n_tokens)
    tok = P(token_axes, None)
    w_in, w_out = P("expert", None, "tensor"), P("expert", "tensor", None)
    all_axes = tuple(mesh.axis_names)

    def replicated_tokens(x, router, w1, w3, w2):
        routing = route(x, router, top_k)
        shard = jax.lax.axis_index("expert")
        mine = routing.experts // local == shard                                   # (t, k)
        # rows for copies that are not ours get weight 0 (and a spread-out expert, to keep buckets even)
        local_expert = jnp.where(mine, routing.experts % local, jnp.arange(mine.size).reshape(mine.shape) % local)
        ys = _local_experts(jnp.repeat(x, top_k, axis=0), local_expert.reshape(-1),
                            jnp.where(mine, routing.weights, 0.0).reshape(-1), w1, w3, w2, strategy,
                            capacity_factor)
        y = ys.reshape(x.shape[0], top_k, -1).sum(1)
        return jax.lax.psum(y, ("expert", "tensor")), routing.logits

    def all_to_all(x, router, w1, w3, w2):
        routing = route(x, router, top_k)
        t, d = x.shape
        copies = t * top_k
        dest = routing.experts.reshape(-1) // local                                 # (c,) expert shard
        onehot = jax.nn.one_hot(dest, n_shards, dtype=jnp.int32)
        slot = ((jnp.cumsum(onehot, axis=0) - 1) * onehot).sum(-1)                  # place in its bucket
        token_of = jnp.arange(copies) // top_k

        def exchange(capacity):
            def run(x):
                send = jnp.zeros((n_shards, capacity, d), x.dtype).at[dest, slot].set(x[token_of], mode="drop")
                send_e = jnp.full((n_shards, capacity), -1, jnp.int32).at[dest, slot].set(
                    routing.experts.reshape(-1) % local, mode="drop")
                recv = jax.lax.all_to_all(send.reshape(-1, d), "expert", 0, 0, tiled=True)      # (r, d)
                recv_e = jax.lax.all_to_all(send_e.reshape(-1), "expert", 0, 0, tiled=True)    # (r,)
                valid = recv_e >= 0
                spread = jnp.arange(recv_e.shape[0]) % local
                y = _local_experts(recv, jnp.where(valid, recv_e, spread), valid.astype(jnp.float32),
                                   w1, w3, w2, strategy, capacity_factor)
                y = jax.lax.psum(y, "tensor")
                back = jax.lax.all_to_all(y, "expert", 0, 0, tiled=True).reshape(n_shards, capacity, d)
                picked = back[dest, slot].reshape(t, top_k, d)
                return jnp.einsum("tk,tkd->td", routing.weights.astype(picked.dtype), picked)
            return run

        capacity = bucket_capacity(copies, 1, n_shards, capacity_factor)
        if capacity >= copies:
            return exchange(copies)(x), routing.logits
        overflow = jax.lax.pmax(jnp.max(onehot.sum(0)) > capacity, all_axes)
        return jax.lax.cond(overflow, exchange(copies), exchange(capacity), x), routing.logits

    body = all_to_all if token_axes == ("data", "expert") else replicated_tokens
    fn = jax.shard_map(body, mesh=mesh, in_specs=(tok, P(None, None), w_in, w_in, w_out), out_specs=(tok, tok),
                       check_vma=False)
    return fn(x, router, w1, w3, w2)
