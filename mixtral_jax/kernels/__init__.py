"""Kernels: native code XLA calls on CPU."""
