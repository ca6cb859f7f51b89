"""The Flax model: attention, MoE, int8 weights, parameters and their placement on a mesh."""
