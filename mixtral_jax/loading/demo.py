"""The embedded default model: what `mixtral-jax generate` runs when no checkpoint is given.

A small Mixtral-architecture model (Mixtral's real tokenizer, 8 experts, top-2) trained by
`mixtral-jax train` on the Python standard library's source files (`python -m bench.train_demo`); its
weights ship as a bf16 mixtral-jax checkpoint in `assets/demo_model/` (under 20 MB). It writes
Python-flavoured text, enough to see the whole pipeline (tokenizer, MoE routing, KV cache, sampler) work
on any machine. Where the checkpoint is absent (a source tree without it), the same architecture with
random weights from a fixed seed stands in, and its text is noise.
"""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from mixtral_jax.config import MixtralConfig, RuntimeConfig
from mixtral_jax.convert.orbax_io import is_complete
from mixtral_jax.loading.checkpoint import load
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.placement import shard_model

DEMO_CONFIG = MixtralConfig(vocab_size=32000, dim=112, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=28,
                            hidden_dim=160, n_experts=8, top_k=2, max_seq_len=2048)
DEMO_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "demo_model")


def has_trained_model() -> bool:
    return is_complete(DEMO_CHECKPOINT)


def default_model(runtime: RuntimeConfig | None = None, seed: int = 0, trained: bool | None = None) -> Mixtral:
    """The trained demo model (`trained=None`: when its checkpoint is present), else random weights; on
    `runtime.mesh` when it names one (checked as for any checkpoint)."""
    runtime = runtime or RuntimeConfig()
    if trained or (trained is None and has_trained_model()):
        return load(DEMO_CHECKPOINT, mesh=runtime.mesh, dtype=runtime.param_dtype, moe_strategy=runtime.moe_strategy,
                    compute_dtype=runtime.compute_dtype, quantize=runtime.quantize)
    if runtime.mesh is None:
        return Mixtral(DEMO_CONFIG, runtime, rngs=nnx.Rngs(seed))
    return shard_model(Mixtral(DEMO_CONFIG, dataclasses.replace(runtime, mesh=None), rngs=nnx.Rngs(seed)), runtime.mesh)
