"""Device meshes, logical-axis -> mesh-axis rules, expert-parallel MoE. Installed as `mixtral_jax.sharding`.

Import `placement` (which needs the model) as `mixtral_jax.sharding.placement`; this package's top level
stays free of model imports so the model itself can use the expert-parallel MoE.
"""

from .mesh import make_mesh, parse_mesh_spec
from .rules import DEFAULT_RULES, MESH_AXES, ShardingError, param_shardings, partition_spec

__all__ = ["DEFAULT_RULES", "MESH_AXES", "ShardingError", "make_mesh", "param_shardings", "parse_mesh_spec",
           "partition_spec"]
