"""Device meshes, the logical-axis -> mesh-axis rules, the expert-parallel MoE and multi-host start-up.

Installed as `mixtral_jax.sharding`. It sits below the model in the import graph (the model's MoE layer
calls `expert_parallel`), so nothing here imports the model; placing a model's parameters on a mesh is
`mixtral_jax.model.placement.shard_model`.
"""

from .distributed import initialize
from .expert_parallel import moe_expert_parallel
from .mesh import make_mesh, parse_mesh_spec
from .rules import (
    DEFAULT_RULES,
    FSDP_RULES,
    MESH_AXES,
    Rule,
    ShardingError,
    activation_spec,
    constrain,
    mesh_axes,
    param_shardings,
    partition_spec,
)

__all__ = ["DEFAULT_RULES", "FSDP_RULES", "MESH_AXES", "Rule", "ShardingError", "activation_spec", "constrain",
           "initialize", "make_mesh", "mesh_axes", "moe_expert_parallel", "param_shardings", "parse_mesh_spec",
           "partition_spec"]
