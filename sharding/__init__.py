"""Device meshes and logical-axis -> mesh-axis rules. Installed as `mixtral_jax.sharding`."""

from .mesh import make_mesh, parse_mesh_spec
from .rules import DEFAULT_RULES, MESH_AXES, ShardingError, param_shardings, partition_spec

__all__ = ["DEFAULT_RULES", "MESH_AXES", "ShardingError", "make_mesh", "param_shardings", "parse_mesh_spec",
           "partition_spec"]
