"""Checkpoint formats: readers (Hugging Face safetensors, Mistral originals), key maps, the one Orbax
checkpoint writer (`orbax_io`, installed atomically by `atomic`), the converter and verify.

Installed as `mixtral_jax.convert` (setuptools `package-dir`), so it claims no global import name.
`mixtral_jax.convert.convert(src, dst)` converts; `mixtral_jax.convert.verify(src, dst)` checks.
"""

from .converter import ConversionReport, convert
from .verify import VerificationError, verify

__all__ = ["ConversionReport", "VerificationError", "convert", "verify"]
