"""Write a `transformers` Mixtral in Mistral's original layouts, for the converter's tests.

The inverse of HF's `convert_mixtral_weights_to_hf.py`: HF rows of q/k are permuted back to Mistral's
interleaved RoPE order with `w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2)`, keys get
their original names, and for the pre-release torrent layout each layer's experts are stacked into
`block_sparse_moe.w1/w3/w2` of shape `[E*F, D]` (w2 slices transposed) and the keys are spread over
several `consolidated.NN.pt` files.
"""

from __future__ import annotations

import json
import os

import torch

from mixtral_jax import MixtralConfig


def hf_to_mistral_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def params_json(config: MixtralConfig) -> dict:
    return {"dim": config.dim, "n_layers": config.n_layers, "head_dim": config.head_dim,
            "hidden_dim": config.hidden_dim, "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
            "norm_eps": config.norm_eps, "vocab_size": config.vocab_size, "rope_theta": config.rope_theta,
            "max_seq_len": config.max_seq_len,
            "moe": {"num_experts_per_tok": config.top_k, "num_experts": config.n_experts}}


def _experts(sd: dict, i: int, config: MixtralConfig):
    """Per-expert torch weights (w1 [F, D], w2 [D, F], w3 [F, D]) from either HF layout."""
    p = f"model.layers.{i}."
    f = config.hidden_dim
    if p + "mlp.experts.gate_up_proj" in sd:  # transformers 5 in memory: fused
        gate_up, down = sd[p + "mlp.experts.gate_up_proj"], sd[p + "mlp.experts.down_proj"]
        return [(gate_up[e, :f], down[e], gate_up[e, f:]) for e in range(config.n_experts)]
    return [tuple(sd[f"{p}block_sparse_moe.experts.{e}.w{k}.weight"] for k in (1, 2, 3))
            for e in range(config.n_experts)]


def mistral_state_dict(model, config: MixtralConfig, layout: str = "release", dtype=None) -> dict:
    """`layout`: 'release' (per-expert `feed_forward.experts.E.wN.weight`) or 'torrent' (stacked)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(config.n_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        out[q + "attention.wq.weight"] = hf_to_mistral_rows(sd[p + "self_attn.q_proj.weight"], config.n_heads)
        out[q + "attention.wk.weight"] = hf_to_mistral_rows(sd[p + "self_attn.k_proj.weight"], config.n_kv_heads)
        out[q + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        router = sd.get(p + "mlp.gate.weight", sd.get(p + "block_sparse_moe.gate.weight"))
        experts = _experts(sd, i, config)
        if layout == "release":
            out[q + "feed_forward.gate.weight"] = router
            for e, (w1, w2, w3) in enumerate(experts):
                for k, w in (("w1", w1), ("w2", w2), ("w3", w3)):
                    out[f"{q}feed_forward.experts.{e}.{k}.weight"] = w
        elif layout == "torrent":
            out[q + "block_sparse_moe.gate.weight"] = router
            out[q + "block_sparse_moe.w1"] = torch.cat([w1 for w1, _, _ in experts])
            out[q + "block_sparse_moe.w2"] = torch.cat([w2.T for _, w2, _ in experts])
            out[q + "block_sparse_moe.w3"] = torch.cat([w3 for _, _, w3 in experts])
        else:
            raise ValueError(f"unknown layout {layout!r}")
    return {k: (v.to(dtype) if dtype is not None else v).contiguous().clone() for k, v in out.items()}


def save_mistral(model, config: MixtralConfig, path, *, layout: str = "release", file_format: str = "pth",
                 n_files: int = 1, dtype=None) -> str:
    """Write `params.json` and the weights: `consolidated.00.pth` (release), `consolidated.NN.pt` split
    into `n_files` disjoint key sets (torrent), or `consolidated.safetensors`."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params_json(config), f)
    sd = mistral_state_dict(model, config, layout, dtype)
    if file_format == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, os.path.join(path, "consolidated.safetensors"))
        return path
    ext = "pth" if layout == "release" else "pt"
    keys = list(sd)
    for n in range(n_files):
        part = {k: sd[k] for k in keys[n::n_files]}
        torch.save(part, os.path.join(path, f"consolidated.{n:02d}.{ext}"))
    return path
