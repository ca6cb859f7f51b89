"""Checkpoint readers (Hugging Face safetensors; Mistral originals to come) and the key maps into our layout.

Installed as `mixtral_jax.convert` (setuptools `package-dir`), so it claims no global import name.
"""
