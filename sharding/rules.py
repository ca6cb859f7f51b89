"""Logical axis names (carried by every parameter and activation) -> mesh axes: the one table.

Mesh axes: `data` (batch; FSDP for weights where it helps), `expert` (which device holds which experts),
`tensor` (attention heads and the expert hidden dimension). The model only knows logical names;
changing how Mixtral is laid out on a pod means changing this table, nothing else.

Parameters, activations, the KV cache and the expert-parallel `shard_map` specs all take their layout
from here. Sequences (`batch`) split
over `data` and `expert` together: attention has no experts, so without that every expert group would
hold and compute a full copy of the batch's attention and KV cache. Parameters must divide exactly
(`partition_spec`); activations drop the axes a dimension cannot take (`activation_spec`: a decode
batch of 1 stays replicated).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixtral_jax.errors import ShardingError

MESH_AXES = ("data", "expert", "tensor")

Rule = str | tuple[str, ...] | None  # a mesh axis, several (split over their product), or None: replicated

# logical axis -> mesh axes
DEFAULT_RULES: Mapping[str, Rule] = {
    # parameters
    "vocab": "tensor",
    "embed": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "expert": "expert",
    "mlp": "tensor",
    "router": None,
    "norm": None,
    "lora_rank": None,  # LoRA adapters: a few columns, replicated; their other axes follow their weight's
    # activations and the KV cache
    "batch": ("data", "expert"),
    "seq": None,
    "cache_seq": None,
}
# Fully sharded data parallelism for training: every weight's model dimension also splits over `data`
# (XLA gathers a layer's weights before use and reduce-scatters their gradients).
FSDP_RULES: Mapping[str, Rule] = {**DEFAULT_RULES, "embed": "data"}

KV_CACHE_AXES = ("batch", "kv_heads", "cache_seq", "head_dim")   # k, v: (b, k, s, x)
KV_SCALE_AXES = ("batch", "kv_heads", "cache_seq")               # an int8 cache's scales: (b, k, s)
CACHE_ROW_AXES = ("batch", "cache_seq")                           # the cache's positions and valid flags
ACTIVATION_AXES = ("batch", "seq", None)                          # the residual stream (b, t, d)


def _mesh_axes(rule: Rule, mesh: Mesh) -> tuple[str, ...]:
    axes = (rule,) if isinstance(rule, str) else tuple(rule or ())
    return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)


def mesh_axes(logical: str, mesh: Mesh, rules: Mapping[str, Rule] = DEFAULT_RULES) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that `logical` splits over on `mesh`, in the rule's order; () if none."""
    return _mesh_axes(rules.get(logical), mesh)


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def partition_spec(shape, logical_axes, mesh: Mesh, rules: Mapping[str, Rule] = DEFAULT_RULES,
                   name: str = "") -> PartitionSpec:
    """The PartitionSpec for one parameter; a dimension not divisible by its mesh axes is an error."""
    spec = []
    for dim, axis in zip(shape, logical_axes):
        axes = _mesh_axes(rules.get(axis) if axis is not None else None, mesh)
        split = math.prod(mesh.shape[a] for a in axes)
        if dim % split:
            raise ShardingError(
                f"{name or 'array'}: dimension '{axis}' of size {dim} is not divisible by mesh axis "
                f"'{'x'.join(axes)}' of size {split}; change the mesh")
        spec.append(_entry(axes))
    return PartitionSpec(*spec)


def activation_spec(shape, logical_axes, mesh: Mesh, rules: Mapping[str, Rule] = DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec for an activation: each dimension takes the longest prefix of its mesh axes that
    divides it (batch 8 on data=2,expert=8 splits over data only; batch 1 stays replicated)."""
    spec = []
    for dim, axis in zip(shape, logical_axes):
        axes = _mesh_axes(rules.get(axis) if axis is not None else None, mesh)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        spec.append(_entry(axes))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, logical_axes, mesh: Mesh | None, rules: Mapping[str, Rule] = DEFAULT_RULES):
    """Pin an activation's layout inside `jit` as the rules say (unchanged without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, activation_spec(x.shape, logical_axes, mesh, rules)))


def param_shardings(specs: Mapping, mesh: Mesh, rules: Mapping[str, Rule] = DEFAULT_RULES
                    ) -> dict[str, NamedSharding]:
    """`{name: NamedSharding}` for `mixtral_jax.param_specs(...)` on `mesh`."""
    return {name: NamedSharding(mesh, partition_spec(s.shape, s.logical_axes, mesh, rules, name))
            for name, s in specs.items()}
