"""The model against transformers' MixtralForCausalLM: same weights (saved by HF, read by our reader), same logits."""

import numpy as np
import pytest
import torch

import mixtral_jax
from mixtral_jax import MixtralConfig
from tests.helpers.hf_reference import hf_logits, hf_model, save_hf

CONFIGS = {
    "base": MixtralConfig.tiny(),
    "mha_wide_head": MixtralConfig.tiny(n_heads=4, n_kv_heads=4, head_dim=32),   # head_dim != dim / heads
    "mqa_window": MixtralConfig.tiny(n_heads=8, n_kv_heads=1, head_dim=8, sliding_window=7),
    "4experts_top1": MixtralConfig.tiny(n_experts=4, top_k=1, n_layers=3),
    "6experts_top3_window": MixtralConfig.tiny(n_experts=6, top_k=3, sliding_window=16, rope_theta=10000.0),
}
SEQ = 40  # longer than every sliding window above


@pytest.fixture(params=list(CONFIGS))
def pair(request, reference):
    ref = reference(CONFIGS[request.param])
    return ref.config, ref.hf, ref.path


def _tokens(config, batch=2, seq=SEQ, seed=0):
    return np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq))


def test_fp32_logits_match_transformers(pair):
    config, hf, path = pair
    model = mixtral_jax.load_hf(path, dtype="float32", show_progress=False)
    assert model.config == config
    tokens = _tokens(config)
    ours = np.asarray(model(tokens))
    assert ours.dtype == np.float32 and ours.shape == (2, SEQ, config.vocab_size)
    np.testing.assert_allclose(ours, hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_left_padded_batch_matches_transformers(pair):
    config, hf, path = pair
    model = mixtral_jax.load_hf(path, show_progress=False)
    tokens = _tokens(config, batch=3, seed=1)
    mask = np.ones_like(tokens)
    mask[1, :5] = 0
    mask[2, :17] = 0
    ours = np.asarray(model(tokens, attention_mask=mask))
    ref = hf_logits(hf, tokens, attention_mask=mask)
    real = mask.astype(bool)  # padded positions' logits are meaningless in both
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)


def _kl(p_logits, q_logits):
    p = torch.log_softmax(torch.as_tensor(p_logits, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.as_tensor(q_logits, dtype=torch.float64), -1)
    return (p.exp() * (p - q)).sum(-1)


# Stated bounds for bf16 compute against the fp32 reference: mean per-token KL(fp32 || bf16) <= 2e-3, and no
# token above 0.1 (a near-tie in the router can flip one expert under bf16, which moves that token alone).
BF16_MEAN_KL = 2e-3
BF16_MAX_KL = 0.1


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_compute_within_stated_kl(pair, param_dtype):
    config, hf, path = pair
    model = mixtral_jax.load_hf(path, dtype=param_dtype, compute_dtype="bfloat16", show_progress=False)
    tokens = _tokens(config)
    ours = np.asarray(model(tokens))
    assert ours.dtype == np.float32
    kl = _kl(hf_logits(hf, tokens), ours)
    assert float(kl.mean()) < BF16_MEAN_KL, float(kl.mean())
    assert float(kl.max()) < BF16_MAX_KL


def test_bf16_checkpoint_stays_bf16(tmp_path):
    config = CONFIGS["base"]
    hf = hf_model(config).to(torch.bfloat16)
    path = save_hf(hf, tmp_path)
    model = mixtral_jax.load_hf(path, show_progress=False)  # default dtype: the checkpoint's
    assert model.layers[0].moe.w1[...].dtype == np.dtype("bfloat16")
    expert3_w1 = hf.model.layers[1].mlp.experts.gate_up_proj[3, : config.hidden_dim].detach()
    np.testing.assert_array_equal(
        np.asarray(model.layers[1].moe.w1[...][3]).view(np.uint16),
        expert3_w1.T.contiguous().view(torch.int16).numpy().view(np.uint16))


def _hf_forward_with_router(hf, tokens, mask):
    with torch.no_grad():
        return hf(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask),
                  position_ids=torch.as_tensor(np.maximum(np.cumsum(mask, -1) - 1, 0)), output_router_logits=True)


def test_router_and_aux_loss_match_transformers(pair):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    config, hf, path = pair
    model = mixtral_jax.load_hf(path, show_progress=False)
    tokens = _tokens(config, batch=2, seed=3)
    mask = np.ones_like(tokens)
    mask[0, :9] = 0
    real = mask.reshape(-1).astype(bool)
    out = _hf_forward_with_router(hf, tokens, mask)
    _, router_logits = model(tokens, attention_mask=mask, return_router_logits=True)
    router_logits = np.asarray(router_logits)  # (layers, b, t, e)
    assert router_logits.shape == (config.n_layers, 2, SEQ, config.n_experts)
    flat = router_logits.reshape(config.n_layers, -1, config.n_experts)
    for layer, ref in enumerate(out.router_logits):
        ref = ref.float().numpy()
        np.testing.assert_allclose(flat[layer][real], ref[real], atol=1e-4)
        # expert choice and weights: HF's router module on its input vs our `route` on the same input
        x = torch.randn(64, config.dim)
        ref_logits, ref_w, ref_idx = hf.model.layers[layer].mlp.gate(x)
        ours = mixtral_jax.model.moe.route(x.numpy(), np.asarray(model.layers[layer].moe.router[...]), config.top_k)
        np.testing.assert_allclose(np.asarray(ours.logits), ref_logits.detach().numpy(), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(ours.expert_ids), ref_idx.numpy())
        np.testing.assert_allclose(np.asarray(ours.weights), ref_w.detach().numpy(), atol=2e-6)  # jax 0.12: 1.07e-6
    # the aux loss, with HF's attention mask and without
    np.testing.assert_allclose(float(mixtral_jax.load_balancing_loss(flat, config.top_k, mask.reshape(-1))),
                               float(out.aux_loss), rtol=1e-5)
    ref_unmasked = load_balancing_loss_func(tuple(torch.as_tensor(f) for f in flat), config.n_experts, config.top_k)
    np.testing.assert_allclose(float(mixtral_jax.load_balancing_loss(flat, config.top_k)), float(ref_unmasked),
                               rtol=1e-5)


def test_fused_expert_layout_reads_the_same(tmp_path):
    """Files written from transformers' in-memory layout (mlp.experts.gate_up_proj / down_proj, mlp.gate)."""
    import json

    from safetensors.torch import save_file

    config = CONFIGS["base"]
    hf = hf_model(config, seed=11)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    model = mixtral_jax.load_hf(tmp_path, show_progress=False)
    tokens = _tokens(config)
    np.testing.assert_allclose(np.asarray(model(tokens)), hf_logits(hf, tokens), atol=1e-4, rtol=0)
