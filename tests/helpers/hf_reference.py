"""Tiny random `transformers` Mixtral models: the reference our parity tests compare against."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from mixtral_jax import MixtralConfig


def hf_model(config: MixtralConfig, seed: int = 0) -> transformers.MixtralForCausalLM:
    """A random fp32 HF model with non-trivial norm weights and routers spread enough to matter."""
    torch.manual_seed(seed)
    hf_config = transformers.MixtralConfig(**config.to_hf())
    hf_config._attn_implementation = "eager"
    model = transformers.MixtralForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "gate" in name and "experts" not in name:  # the router: larger so routing is decisive
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.08)
    return model


def save_hf(model, path, **kwargs) -> str:
    model.save_pretrained(path, **kwargs)
    return str(path)


def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.as_tensor(attention_mask)
            kwargs["position_ids"] = torch.as_tensor(np.maximum(np.cumsum(attention_mask, -1) - 1, 0))
        out = model(torch.as_tensor(tokens), **kwargs)
    return out.logits.float().numpy()
