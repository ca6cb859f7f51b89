"""Logical axis names (carried by every parameter and activation) -> mesh axes: the one table.

Mesh axes: `data` (batch; FSDP for weights where it helps), `expert` (which device holds which experts),
`tensor` (attention heads and the expert hidden dimension). The model only knows logical names; the
parameter shardings and the expert-parallel `shard_map` specs both come from this table, so changing how
Mixtral is laid out on a pod means changing this table, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping

from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "tensor")

# logical axis -> mesh axis (or None: replicated)
DEFAULT_RULES: Mapping[str, str | None] = {
    "batch": "data",
    "vocab": "tensor",
    "embed": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "expert": "expert",
    "mlp": "tensor",
    "router": None,
    "norm": None,
}


class ShardingError(ValueError):
    """A mesh or rule that cannot lay out this model."""


def mesh_axis(logical: str, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES) -> str | None:
    """The mesh axis `logical` maps to, or None where the rules replicate it or the mesh lacks that axis."""
    axis = rules.get(logical)
    return axis if axis is not None and axis in mesh.shape else None


def partition_spec(shape, logical_axes, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES,
                   name: str = "") -> PartitionSpec:
    """The PartitionSpec for one array; a dimension not divisible by its mesh axis is an error."""
    spec = []
    for dim, axis in zip(shape, logical_axes):
        target = mesh_axis(axis, mesh, rules) if axis is not None else None
        if target is not None and dim % mesh.shape[target]:
            raise ShardingError(
                f"{name or 'array'}: dimension '{axis}' of size {dim} is not divisible by mesh axis "
                f"'{target}' of size {mesh.shape[target]}; change the mesh")
        spec.append(target if target is not None and mesh.shape[target] > 1 else None)
    return PartitionSpec(*spec)


def param_shardings(specs: Mapping, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES
                    ) -> dict[str, NamedSharding]:
    """`{name: NamedSharding}` for `mixtral_jax.param_specs(...)` on `mesh`."""
    return {name: NamedSharding(mesh, partition_spec(s.shape, s.logical_axes, mesh, rules, name))
            for name, s in specs.items()}
