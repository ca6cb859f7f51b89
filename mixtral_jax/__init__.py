"""mixtral-jax: Mixtral sparse mixture-of-experts models in JAX/Flax.

    import mixtral_jax
    model = mixtral_jax.load_hf("path/to/Mixtral-8x7B-v0.1", dtype="bfloat16")
    logits = model(tokens)  # (batch, seq, vocab) float32
"""

from .config import MixtralConfig, RuntimeConfig
from .data import PackedDataset
from .errors import CheckpointError, ConfigError
from .generate import chat, generate
from .loading import load, load_checkpoint, load_hf
from .model import Mixtral
from .moe import load_balancing_loss
from .params import ParamSpec, assemble_model, model_arrays, param_specs
from .placement import quantize_model, shard_model
from .sampler import Sampler, SamplingError
from .tokenizer import load_tokenizer
from .train import TrainConfig, Trainer, loss_terms
from .version import __version__

__all__ = [
    "CheckpointError", "ConfigError", "Mixtral", "PackedDataset", "TrainConfig", "Trainer", "loss_terms",
    "MixtralConfig", "ParamSpec", "RuntimeConfig",
    "Sampler", "SamplingError", "__version__", "assemble_model", "chat", "generate", "load", "load_balancing_loss",
    "load_checkpoint", "load_hf", "load_tokenizer", "model_arrays", "param_specs", "quantize_model", "shard_model",
]
