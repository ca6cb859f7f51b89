"""Logical axis names (carried by every parameter) -> mesh axes: the one table, and what follows from it.

Mesh axes: `data` (batch; FSDP for weights where it helps), `expert` (which device holds which experts),
`tensor` (attention heads and the expert hidden dimension). The model only knows logical names;
changing how Mixtral is laid out on a pod means changing this table, nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "tensor")

# logical axis -> mesh axis (or None: replicated)
DEFAULT_RULES: Mapping[str, str | None] = {
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


def partition_spec(shape, logical_axes, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES,
                   name: str = "") -> PartitionSpec:
    """The PartitionSpec for one array; a dimension not divisible by its mesh axis is an error."""
    spec = []
    for dim, axis in zip(shape, logical_axes):
        mesh_axis = rules.get(axis) if axis is not None else None
        if mesh_axis is not None and mesh_axis not in mesh.shape:
            mesh_axis = None
        if mesh_axis is not None and dim % mesh.shape[mesh_axis]:
            raise ShardingError(
                f"{name or 'array'}: dimension '{axis}' of size {dim} is not divisible by mesh axis "
                f"'{mesh_axis}' of size {mesh.shape[mesh_axis]}; change the mesh")
        spec.append(mesh_axis if mesh_axis is not None and mesh.shape[mesh_axis] > 1 else None)
    return PartitionSpec(*spec)


def param_shardings(specs: Mapping, mesh: Mesh, rules: Mapping[str, str | None] = DEFAULT_RULES
                    ) -> dict[str, NamedSharding]:
    """`{name: NamedSharding}` for `mixtral_jax.param_specs(...)` on `mesh`."""
    return {name: NamedSharding(mesh, partition_spec(s.shape, s.logical_axes, mesh, rules, name))
            for name, s in specs.items()}


def single_device_shardings(specs: Mapping, device: jax.Device | None = None) -> dict[str, jax.sharding.Sharding]:
    device = device or jax.devices()[0]
    return {name: jax.sharding.SingleDeviceSharding(device) for name in specs}
