"""The library's error types, at the bottom of the import graph so every layer can raise them.

Each is a `ValueError` whose message is one line saying what is wrong and what to change; the CLI prints
that line and exits with status 2.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot describe a Mixtral model, or a bad run setting."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, malformed or does not match the model."""


class SamplingError(ValueError):
    """Bad sampling parameters or prompts: raised before anything compiles."""
