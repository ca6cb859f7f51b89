"""mixtral-jax: Mixtral sparse mixture-of-experts models in JAX/Flax.

    import mixtral_jax
    model = mixtral_jax.load_hf("path/to/Mixtral-8x7B-v0.1", dtype="bfloat16")
    logits = model(tokens)  # (batch, seq, vocab) float32
"""

from mixtral_jax.config import MixtralConfig, RuntimeConfig
from mixtral_jax.errors import CheckpointError, ConfigError
from mixtral_jax.inference.generate import chat, generate
from mixtral_jax.inference.sampler import Sampler, SamplingError
from mixtral_jax.loading.checkpoint import load, load_checkpoint, load_hf
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.moe import load_balancing_loss
from mixtral_jax.model.params import ParamSpec, assemble_model, model_arrays, param_specs
from mixtral_jax.model.placement import quantize_model, shard_model
from mixtral_jax.text.tokenizer import load_tokenizer
from mixtral_jax.training.data import PackedDataset
from mixtral_jax.training.trainer import TrainConfig, Trainer, loss_terms
from mixtral_jax.version import __version__

__all__ = [
    "CheckpointError", "ConfigError", "Mixtral", "PackedDataset", "TrainConfig", "Trainer", "loss_terms",
    "MixtralConfig", "ParamSpec", "RuntimeConfig",
    "Sampler", "SamplingError", "__version__", "assemble_model", "chat", "generate", "load", "load_balancing_loss",
    "load_checkpoint", "load_hf", "load_tokenizer", "model_arrays", "param_specs", "quantize_model", "shard_model",
]
