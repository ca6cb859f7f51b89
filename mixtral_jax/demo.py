"""The embedded default model: what `mixtral-jax generate` runs when no checkpoint is given.

Until a trained demo model ships (fine-tuning issue), this is a small Mixtral-architecture model with
Mixtral's real tokenizer and random weights from a fixed seed: it exercises the whole pipeline
(tokenizer, MoE routing, KV cache, sampler) on any machine, but its text is noise.
"""

from __future__ import annotations

from flax import nnx

from .config import MixtralConfig, RuntimeConfig
from .model import Mixtral

DEMO_CONFIG = MixtralConfig(vocab_size=32000, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                            hidden_dim=256, n_experts=8, top_k=2, max_seq_len=2048)


def default_model(runtime: RuntimeConfig | None = None, seed: int = 0) -> Mixtral:
    return Mixtral(DEMO_CONFIG, runtime, rngs=nnx.Rngs(seed))
