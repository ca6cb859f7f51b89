"""Configs from both formats, validation, full-size shapes without allocation, and the reader's clear errors."""

import json
import os
import shutil

import numpy as np
import pytest

import mixtral_jax
from mixtral_jax import CheckpointError, ConfigError, MixtralConfig, RuntimeConfig
from tests.helpers.hf_reference import hf_model, save_hf


def test_defaults_are_mixtral_8x7b_and_count_46_7b_params_without_allocating():
    config = MixtralConfig()
    assert config.param_count() == 46_702_792_704
    specs = mixtral_jax.param_specs(config, RuntimeConfig(param_dtype="bfloat16"))  # eval_shape: nothing allocated
    assert sum(int(np.prod(s.shape)) for s in specs.values()) == 46_702_792_704
    assert specs["layers.31.moe.w1"].shape == (8, 4096, 14336)
    assert specs["layers.0.moe.w1"].logical_axes == ("expert", "embed", "mlp")
    assert specs["embed"].dtype == np.dtype("bfloat16")
    assert 12.8e9 < config.active_param_count() < 13.0e9  # "12.9B active per token"


def test_from_hf_reads_both_rope_shapes_and_aux_coefficient():
    base = MixtralConfig.tiny().to_hf()
    hub = dict(base, rope_theta=1e6)
    v5 = {k: v for k, v in base.items() if k != "rope_theta"} | {"rope_parameters": {"rope_type": "default",
                                                                                      "rope_theta": 5e5}}
    assert MixtralConfig.from_hf(hub).rope_theta == 1e6
    assert MixtralConfig.from_hf(v5).rope_theta == 5e5
    assert MixtralConfig.from_hf(dict(base, router_aux_loss_coef=0.001)).router_aux_loss_coef == 0.001


def test_from_transformers_own_config_json(tmp_path):
    import transformers

    transformers.MixtralConfig(**MixtralConfig.tiny(sliding_window=9).to_hf()).save_pretrained(tmp_path)
    assert MixtralConfig.from_hf(tmp_path) == MixtralConfig.tiny(sliding_window=9)


def test_from_mistral_params_json_defaults_rope_theta_to_1e6():
    params = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32, "n_kv_heads": 8,
              "norm_eps": 1e-05, "vocab_size": 32000, "moe": {"num_experts_per_tok": 2, "num_experts": 8}}
    config = MixtralConfig.from_mistral(params)
    assert config.rope_theta == 1e6
    assert config == MixtralConfig()


@pytest.mark.parametrize("overrides,message", [
    (dict(n_heads=6, n_kv_heads=4), "divisible by n_kv_heads"),
    (dict(top_k=9), "cannot exceed n_experts"),
    (dict(head_dim=15), "even"),
    (dict(dim=0), "positive integer"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(eos_id=500), "outside the vocabulary"),
])
def test_invalid_configs_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        MixtralConfig.tiny(**overrides)


def test_runtime_config_validation():
    with pytest.raises(ConfigError, match="moe_strategy"):
        RuntimeConfig(moe_strategy="fast")
    with pytest.raises(ConfigError, match="dtype"):
        RuntimeConfig(param_dtype="int8")
    assert RuntimeConfig(param_dtype="bf16").dtype == np.dtype("bfloat16")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_hf(hf_model(MixtralConfig.tiny()), tmp_path_factory.mktemp("hf"))


def _copy(saved, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(saved, dst)
    return dst


def test_missing_directory():
    with pytest.raises(CheckpointError, match="not found"):
        mixtral_jax.load_hf("/nonexistent/mixtral")


def test_missing_config_json(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    os.remove(dst / "config.json")
    with pytest.raises(ConfigError, match="config.json not found"):
        mixtral_jax.load_hf(dst)


def test_malformed_config_json(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    (dst / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        mixtral_jax.load_hf(dst)
    (dst / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="lacks required field"):
        mixtral_jax.load_hf(dst)


def _rewrite_safetensors(dst, edit):
    from safetensors.numpy import load_file, save_file

    path = dst / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    _rewrite_safetensors(dst, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.5.w3.weight"))
    with pytest.raises(CheckpointError, match=r"missing slices \[5\] of parameter layers.1.moe.w3"):
        mixtral_jax.load_hf(dst)
    _rewrite_safetensors(dst, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError, match="missing"):
        mixtral_jax.load_hf(dst)


def test_tensor_of_wrong_shape(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    _rewrite_safetensors(dst, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 64),
                                                                                                     np.float32)}))
    with pytest.raises(CheckpointError, match=r"k_proj.weight' has shape \(8, 64\), expected \(32, 64\)"):
        mixtral_jax.load_hf(dst)


def test_unknown_tensor(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    _rewrite_safetensors(dst, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        mixtral_jax.load_hf(dst)


def test_truncated_safetensors(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    path = dst / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        mixtral_jax.load_hf(dst)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        mixtral_jax.load_hf(dst)


def test_unknown_format(saved, tmp_path):
    dst = _copy(saved, tmp_path)
    os.rename(dst / "model.safetensors", dst / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        mixtral_jax.load_hf(dst)
    (dst / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="not Mixtral"):
        mixtral_jax.load_hf(dst)


def test_sharded_checkpoint_with_missing_shard(tmp_path):
    model = hf_model(MixtralConfig.tiny())
    path = save_hf(model, tmp_path / "sharded", max_shard_size="100KB")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    assert len(files) > 1 and os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    loaded = mixtral_jax.load_hf(path, show_progress=False)  # many shards + index: loads
    assert loaded.layers[1].moe.w2[...].shape == (8, 96, 64)
    os.remove(os.path.join(path, files[-1]))
    with pytest.raises(CheckpointError, match=f"missing shard.*{files[-1]}"):
        mixtral_jax.load_hf(path)
