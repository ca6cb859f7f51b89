"""Device meshes and logical-axis -> mesh-axis rules. Installed as `mixtral_jax.sharding`."""
