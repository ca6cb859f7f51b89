"""mixtral-jax: Mixtral sparse mixture-of-experts models in JAX/Flax.

    import mixtral_jax
    model = mixtral_jax.load_hf("path/to/Mixtral-8x7B-v0.1", dtype="bfloat16")
    logits = model(tokens)  # (batch, seq, vocab) float32
"""

from .config import ConfigError, MixtralConfig, RuntimeConfig
from .convert.hf import load_hf
from .convert.safetensors_file import CheckpointError
from .data import PackedDataset
from .generate import chat, generate
from .loading import load
from .model import Mixtral
from .moe import load_balancing_loss
from .params import ParamSpec, assemble_model, model_arrays, param_specs
from .sampler import Sampler, SamplingError
from .tokenizer import load_tokenizer
from .train import TrainConfig, Trainer, loss_terms

__all__ = [
    "CheckpointError", "ConfigError", "Mixtral", "PackedDataset", "TrainConfig", "Trainer", "loss_terms",
    "MixtralConfig", "ParamSpec", "RuntimeConfig",
    "Sampler", "SamplingError", "assemble_model", "chat", "generate", "load", "load_balancing_loss", "load_hf",
    "load_tokenizer", "model_arrays", "param_specs",
]
__version__ = "0.1.0"
