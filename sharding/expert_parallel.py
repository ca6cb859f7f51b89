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

LoRA adapters of the experts (`ExpertLoRA`) travel with their experts: each a and b is split over the
expert axis, and the hidden dimension's side (b of w1/w3, a of w2) over the hidden axes, so every device
adds its local experts' low-rank terms inside the same strategy call (w2's partial sums join the `psum`).
Stacked adapters' per-token rank mask (`ExpertLoRA.mask`) is split as the tokens are and travels with them:
repeated with the copies, or sent through the all_to_all as extra feature columns and split off after.

The mesh axes come from the rules table (`sharding/rules.py`): none is named here.

Letters: c token copies (tokens x k), n expert shards, r received rows, e local experts, d, f as usual.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mixtral_jax.model.moe import ExpertLoRA, Routing, assign_buckets, bucket_capacity, route, run_experts
from mixtral_jax.model.quant import QArray

from .rules import DEFAULT_RULES, Rule, ShardingError, mesh_axes


def _local_experts(x, local_expert, weight, w1, w3, w2, strategy, capacity_factor, lora=None):
    """Each row of x (r, d) through its one local expert, times `weight` (r,); hidden dim may be split."""
    routing = Routing(None, weight[:, None], local_expert[:, None])
    return run_experts(x, routing, w1, w3, w2, strategy, capacity_factor, lora=lora)


def lora_specs(lora: ExpertLoRA | None, expert_axis, hidden) -> ExpertLoRA | None:
    """The shard_map specs of the experts' adapters: (e, d, l) / (e, l, f) for w1 and w3, (e, f, l) /
    (e, l, d) for w2, the expert axis first and `hidden` on f."""
    if lora is None:
        return None
    up = (P(expert_axis, None, None), P(expert_axis, None, hidden))
    down = (P(expert_axis, hidden, None), P(expert_axis, None, None))
    pick = lambda pair, spec: None if pair is None else spec  # noqa: E731
    return ExpertLoRA(pick(lora.w1, up), pick(lora.w3, up), pick(lora.w2, down), lora.scale)


def _with_token_spec(specs: ExpertLoRA | None, lora: ExpertLoRA | None, tok) -> ExpertLoRA | None:
    """`specs` plus the token mask's (split as the tokens are), when `lora` has a mask."""
    return specs if lora is None or lora.mask is None else specs.with_mask(tok)


def _token_axes(mesh: Mesh, n_tokens: int, batch_axes: tuple[str, ...]):
    """The longest prefix of the batch's mesh axes that the flattened tokens split over evenly, or None
    (replicated), as `rules.activation_spec` lays out the activations around the MoE."""
    axes = batch_axes
    while axes and n_tokens % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return axes or None


def moe_expert_parallel(x, router, w1, w3, w2, *, top_k: int, mesh: Mesh, strategy: str = "auto",
                        capacity_factor: float = 2.0, rules: Mapping[str, Rule] = DEFAULT_RULES,
                        lora: ExpertLoRA | None = None) -> tuple[jax.Array, jax.Array]:
    """x (t, d) -> (output (t, d), router logits (t, E)), with the experts laid out as `rules` say: the
    `expert` logical axis over its mesh axis, the expert hidden dimension (`mlp`) over its own, tokens
    over `batch` (and the expert axis, where they split evenly). `lora`: the experts' adapters."""
    n_tokens = x.shape[0]
    n_experts = w1.shape[0]
    expert_axes, hidden_axes = mesh_axes("expert", mesh, rules), mesh_axes("mlp", mesh, rules)
    if len(expert_axes) > 1:
        raise ShardingError(f"the rules split experts over several mesh axes {expert_axes}; use one")
    expert_axis = expert_axes[0] if expert_axes else None
    hidden = hidden_axes or None  # the expert hidden dimension's mesh axes, summed over with psum
    n_shards = mesh.shape[expert_axis] if expert_axis is not None else 1
    local = n_experts // n_shards
    token_axes = _token_axes(mesh, n_tokens, mesh_axes("batch", mesh, rules))
    tok = P(token_axes, None)
    w_in, w_out = P(expert_axis, None, hidden), P(expert_axis, hidden, None)
    if isinstance(w1, QArray):  # int8 experts: the scales (e, f) / (e, d) split with their output channels
        w_in, w_out = QArray(w_in, P(expert_axis, hidden)), QArray(w_out, P(expert_axis, None))
    summed = (*expert_axes, *hidden_axes)
    all_axes = tuple(mesh.axis_names)

    def replicated_tokens(x, router, w1, w3, w2, lora):
        routing = route(x, router, top_k)
        shard = jax.lax.axis_index(expert_axis) if expert_axis is not None else 0
        mine = routing.expert_ids // local == shard                                # (t, k)
        # rows for copies that are not ours get weight 0 (and a spread-out expert, to keep buckets even)
        spread = jnp.arange(mine.size).reshape(mine.shape) % local
        local_expert = jnp.where(mine, routing.expert_ids % local, spread)
        copies = None if lora is None else lora.rows(jnp.arange(x.shape[0] * top_k) // top_k)
        ys = _local_experts(jnp.repeat(x, top_k, axis=0), local_expert.reshape(-1),
                            jnp.where(mine, routing.weights, 0.0).reshape(-1), w1, w3, w2, strategy,
                            capacity_factor, copies)
        y = ys.reshape(x.shape[0], top_k, -1).sum(1)
        return (jax.lax.psum(y, summed) if summed else y), routing.logits

    def all_to_all(x, router, w1, w3, w2, lora):
        routing = route(x, router, top_k)
        t, d = x.shape
        copies = t * top_k
        buckets = assign_buckets(routing.expert_ids.reshape(-1) // local, n_shards)  # bucket = expert shard
        token_of = jnp.arange(copies) // top_k

        masked = lora is not None and lora.mask is not None
        # stacked adapters: each copy's rank mask (0 / 1, exact in any float dtype) rides on its features
        rows = jnp.concatenate([x, lora.mask.astype(x.dtype)], axis=1) if masked else x

        def exchange(capacity, first=0):
            """The copies in slots [first, first + capacity) of their buckets: one round of the exchange."""
            slot = buckets.slot - first
            in_round = (slot >= 0) & (slot < capacity)
            part = buckets._replace(slot=jnp.where(in_round, slot, capacity))  # the other copies are dropped

            def run(rows):
                width = rows.shape[1]
                send = part.dispatch(rows[token_of], capacity)                                  # (n, C, d [+ l])
                send_e = part.dispatch(routing.expert_ids.reshape(-1) % local, capacity, fill=-1)  # (n, C)
                recv = jax.lax.all_to_all(send.reshape(-1, width), expert_axis, 0, 0, tiled=True)  # (r, d [+ l])
                recv_e = jax.lax.all_to_all(send_e.reshape(-1), expert_axis, 0, 0, tiled=True)   # (r,)
                valid = recv_e >= 0
                spread = jnp.arange(recv_e.shape[0]) % local
                mine = lora.with_mask(recv[:, d:]) if masked else lora
                y = _local_experts(recv[:, :d], jnp.where(valid, recv_e, spread), valid.astype(jnp.float32),
                                   w1, w3, w2, strategy, capacity_factor, mine)
                if hidden_axes:
                    y = jax.lax.psum(y, hidden_axes)
                back = jax.lax.all_to_all(y, expert_axis, 0, 0, tiled=True).reshape(n_shards, capacity, d)
                picked = jnp.where(in_round[:, None], part.collect(back), 0).reshape(t, top_k, d)
                return jnp.einsum("tr,trd->td", routing.weights.astype(picked.dtype), picked)
            return run

        most = t * min(top_k, local)  # copies one bucket can get (a token's k experts are distinct)
        capacity = min(bucket_capacity(copies, 1, n_shards, capacity_factor), most)
        # Skewed routing: the copies past a full bucket go in further rounds of the same size, each taken
        # only when some device needs it and recomputed in the backward pass (one round's memory at a time;
        # the first round runs last, so its saved activations are freed before the later rounds recompute).
        later = jnp.zeros((t, d), x.dtype)
        for j in range(1, -(-most // capacity)):
            needed = jax.lax.pmax(jnp.max(buckets.load) > j * capacity, all_axes)
            later = later + jax.lax.cond(needed, jax.checkpoint(exchange(capacity, j * capacity)),
                                         lambda rows: jnp.zeros((t, d), x.dtype), rows)
        return later + exchange(capacity)(rows), routing.logits

    splits_over_experts = expert_axis is not None and token_axes is not None and expert_axis in token_axes
    body = all_to_all if splits_over_experts else replicated_tokens
    specs = (tok, P(None, None), w_in, w_in, w_out, _with_token_spec(lora_specs(lora, expert_axis, hidden), lora, tok))
    fn = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(tok, tok), check_vma=False)
    return fn(x, router, w1, w3, w2, lora)
