"""Mixtral-8x22B: the preset's size, its checkpoints in both layouts, and parity at its 32768-token vocabulary.

The full model (281 GB in bf16) is described, never allocated; parity runs on a tiny random config with 8x22B's
vocabulary and v3 tokenizer against `transformers`.
"""

import json
import os

import numpy as np
import pytest
import torch

import mixtral_jax
from mixtral_jax import CheckpointError, ConfigError, MixtralConfig, RuntimeConfig
from mixtral_jax.convert import orbax_io
from mixtral_jax.convert.converter import convert, open_source
from mixtral_jax.loading.checkpoint import load
from mixtral_jax.text.tokenizer import load_tokenizer, tokenizer_for
from tests.helpers.hf_reference import hf_logits
from tests.helpers.mistral_reference import save_mistral

CONFIG = MixtralConfig.tiny(vocab_size=32768)  # 8x22B's vocabulary at a tiny width
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bonjour, ça va ?"}]

# The architecture fields of mistralai/Mixtral-8x22B-v0.1's config.json (Hugging Face) and of the params.json of
# Mistral's original release, which does not state the context length.
HUB_CONFIG = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32768,
              "hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 56, "num_attention_heads": 48,
              "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-05,
              "rope_theta": 1000000, "max_position_embeddings": 65536, "sliding_window": None, "hidden_act": "silu",
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "router_aux_loss_coef": 0.001,
              "torch_dtype": "bfloat16"}
PARAMS_JSON = {"dim": 6144, "n_layers": 56, "head_dim": 128, "hidden_dim": 16384, "n_heads": 48, "n_kv_heads": 8,
               "norm_eps": 1e-05, "vocab_size": 32768, "rope_theta": 1000000.0,
               "moe": {"num_experts": 8, "num_experts_per_tok": 2}}


def test_preset_counts_140_6b_parameters_without_allocating():
    config = MixtralConfig.from_preset("8x22b")
    specs = mixtral_jax.param_specs(config, RuntimeConfig(param_dtype="bfloat16"))  # eval_shape: nothing allocated
    assert sum(int(np.prod(s.shape)) for s in specs.values()) == config.param_count() == 140_630_071_296
    assert 39.1e9 < config.active_param_count() < 39.2e9  # "39B active"
    assert specs["layers.55.moe.w1"].shape == (8, 6144, 16384) and specs["embed"].shape == (32768, 6144)
    assert (config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim, config.max_seq_len,
            config.rope_theta) == (56, 48, 8, 128, 65536, 1e6)


def test_presets_by_name():
    assert MixtralConfig.from_preset("8x7b") == MixtralConfig()
    assert MixtralConfig.from_preset("Mixtral-8x22B") == MixtralConfig.from_preset("8x22b")
    assert MixtralConfig().preset_name() == "8x7b" and MixtralConfig.tiny().preset_name() is None
    assert MixtralConfig.from_preset("8x22b").preset_name() == "8x22b"
    with pytest.raises(ConfigError, match="8x7b, 8x22b"):
        MixtralConfig.from_preset("8x13b")


def test_both_config_files_give_the_preset():
    preset = MixtralConfig.from_preset("8x22b")
    assert MixtralConfig.from_hf(HUB_CONFIG) == MixtralConfig(**{**preset.to_dict(), "router_aux_loss_coef": 0.001})
    assert MixtralConfig.from_mistral(PARAMS_JSON) == preset  # context: the preset's 65536, not 32768
    assert MixtralConfig.from_mistral({**PARAMS_JSON, "vocab_size": 32000}).max_seq_len == 32768  # not a preset


def _empty_safetensors(path):
    header = b"{}"
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)


@pytest.mark.parametrize("layout", ["hf", "mistral"])
def test_converter_recognises_8x22b_in_both_layouts(tmp_path, layout):
    src = tmp_path / "src"
    src.mkdir()
    name, content = ("config.json", HUB_CONFIG) if layout == "hf" else ("params.json", PARAMS_JSON)
    (src / name).write_text(json.dumps(content))
    _empty_safetensors(src / ("model.safetensors" if layout == "hf" else "consolidated.safetensors"))
    source = open_source(src)
    assert source.format == layout and source.description.endswith("(Mixtral-8x22B)")
    assert source.config.max_seq_len == 65536 and source.config.vocab_size == 32768
    if layout == "mistral":  # (planning traces the 56-layer model: seconds, so one layout only)
        with pytest.raises(CheckpointError, match="embed"):  # the weights are missing: refused before writing
            convert(src, tmp_path / "dst", show_progress=False)
        assert not os.path.exists(tmp_path / "dst")


# ------------------------------------------------------------------------------ parity at 32768 tokens
@pytest.fixture
def pair(reference):
    ref = reference(CONFIG)
    return ref.hf, ref.model(), ref.path


def test_logits_equal_transformers(pair):
    hf, model, _ = pair
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 13))
    np.testing.assert_allclose(np.asarray(model(tokens)), hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_greedy_chat_equals_transformers_in_the_v3_template(pair):
    hf, model, _ = pair
    tok = tokenizer_for(model)
    assert tok.version == "v3"
    prompt = tok.encode_chat(MESSAGES)
    assert prompt == load_tokenizer("v3").encode_chat(MESSAGES) and prompt[-1] == tok.control_id("[/INST]")
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(prompt):].tolist()
    assert mixtral_jax.generate(model, [prompt], 12, stop_tokens=[]) == [ref]
    assert mixtral_jax.chat(model, MESSAGES, 12, stop_tokens=[]) == tok.decode(ref)


def test_mistral_layout_converts_records_v3_and_generates_with_it(pair, tmp_path):
    hf, _, hf_path = pair
    src = save_mistral(hf, CONFIG, tmp_path / "mistral")
    report = convert(src, tmp_path / "ckpt", show_progress=False)
    assert report.format == "mistral"
    assert orbax_io.read_info(tmp_path / "ckpt").tokenizer == "mistral-common:tokenizer.model.v3"
    model = load(tmp_path / "ckpt")
    assert model.tokenizer_name == "mistral-common:tokenizer.model.v3" and tokenizer_for(model).version == "v3"
    tokens = np.random.default_rng(2).integers(0, CONFIG.vocab_size, (1, 9))
    np.testing.assert_allclose(np.asarray(model(tokens)), hf_logits(hf, tokens), atol=1e-4, rtol=0)
    # the recorded tokenizer wins over the vocabulary
    model.tokenizer_name = "mistral-common:tokenizer.model.v1"
    assert tokenizer_for(model).version == "v1"


def test_plan_knows_the_preset_and_h100_arithmetic_matches_the_rules():
    from bench.sharding_plan import H100_MESH, h100_arithmetic
    from mixtral_jax.cli.model_flags import model_config
    from mixtral_jax.planning.topologies import H100

    config = MixtralConfig.from_preset("8x22b")
    assert model_config("8x22b") == config and model_config("8x7b") == MixtralConfig()
    row = h100_arithmetic(config, H100_MESH["8x22b"], batch=8, context=8192)
    # by hand, from the rules table on expert=8: experts split 8 ways, everything else whole (bf16: 2 bytes)
    d, f, v, L = config.dim, config.hidden_dim, config.vocab_size, config.n_layers
    attn = L * d * config.head_dim * (2 * config.n_heads + 2 * config.n_kv_heads)
    assert row["weights"] == 2 * (L * 3 * 8 * d * f // 8 + attn + 2 * v * d + L * (8 * d + 2 * d) + d)
    assert row["kv"] == 2 * L * 2 * 1 * config.n_kv_heads * 8192 * config.head_dim  # one sequence per GPU
    assert row["fits"] and row["total"] < H100.hbm_bytes
