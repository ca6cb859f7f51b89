"""Checkpoint readers (Hugging Face safetensors, Mistral originals), key maps, the Orbax writer and verify.

Installed as `mixtral_jax.convert` (setuptools `package-dir`), so it claims no global import name.
`mixtral_jax.convert.convert(src, dst)` converts; `mixtral_jax.convert.verify(src, dst)` checks.
"""

from .convert import convert
from .verify import verify

__all__ = ["convert", "verify"]
