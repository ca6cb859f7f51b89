"""The `mixtral-jax` command line: one module per command."""
