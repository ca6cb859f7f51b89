"""The library's error types, at the bottom of the import graph so every layer can raise them.

Each is a `ValueError` whose message is one line saying what is wrong and what to change; the CLI prints
that line and exits with status 2. Every error type of the library is defined here (the modules that raise
them re-export theirs, e.g. `mixtral_jax.sharding.ShardingError`).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot describe a Mixtral model, or a bad run setting."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, malformed or does not match the model."""


class VerificationError(CheckpointError):
    """A converted checkpoint that differs from its source (`mixtral-jax verify`)."""


class SamplingError(ValueError):
    """Bad sampling parameters or prompts: raised before anything compiles."""


class RequestError(SamplingError):
    """A request the serving engine cannot take (bad prompt or sampling parameters, or the engine is
    stopping): raised by `Engine.submit`, answered as HTTP 400 (503 when stopping) by the server."""


class ShardingError(ValueError):
    """A mesh or sharding rule that cannot lay out this model."""


class TopologyError(ValueError):
    """An unknown TPU/GPU slice name, or a mesh that does not match the slice."""


class PlanError(ValueError):
    """An ahead-of-time plan that cannot be made: a mesh that does not fit the slice or the model."""


class DataError(ValueError):
    """Training data that cannot be read or is too small to train on."""
