"""PEFT adapters against `peft` itself: the same adapter in a tiny transformers Mixtral + peft and in ours gives the
same fp32 logits (<= 1e-4), whichever side wrote it; merging agrees with peft's `merge_and_unload`."""

import copy
import json
import os

import numpy as np
import pytest
import torch

import mixtral_jax
from mixtral_jax import MixtralConfig
from mixtral_jax.convert import peft as peft_io
from mixtral_jax.errors import CheckpointError
from mixtral_jax.model import lora
from mixtral_jax.model.placement import merge_adapters
from tests.helpers.hf_reference import hf_logits

peft = pytest.importorskip("peft")

CONFIG = MixtralConfig.tiny(n_layers=2)
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 16))
ATTENTION = lora.LoRAConfig(rank=4, alpha=8.0, targets=lora.ATTENTION_TARGETS)
FULL = lora.LoRAConfig(rank=4, alpha=16.0, targets=lora.ALL_TARGETS)


def trained_like(lc, seed=1):
    rng = np.random.default_rng(seed)
    return {k: v if k.endswith(lora.A_SUFFIX) else rng.normal(0, 0.1, v.shape).astype(np.float32)
            for k, v in lora.init_adapters(CONFIG, lc, seed).items()}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    from tests.helpers.hf_reference import hf_model, save_hf

    hf = hf_model(CONFIG, seed=3)
    path = save_hf(hf, tmp_path_factory.mktemp("hf"))
    return hf, path


def ours(path, strategy="auto"):
    return mixtral_jax.load_hf(path, dtype="float32", moe_strategy=strategy, show_progress=False)


@pytest.mark.parametrize("lc", [ATTENTION, FULL], ids=["attention", "attention+experts"])
def test_our_adapter_in_peft_gives_our_logits(ref, tmp_path, lc):
    hf, path = ref
    model = lora.add_adapters(ours(path), lc, trained_like(lc))
    peft_io.save_peft(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / peft_io.CONFIG_FILE).read_text())
    assert cfg["r"] == 4 and cfg["target_modules"] == list(lc.targets)
    wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "adapter")).eval()
    theirs = hf_logits(wrapped, TOKENS)
    base = hf_logits(hf, TOKENS)
    assert np.abs(theirs - base).max() > 1e-2  # peft applied the adapter (experts' too: checked below)
    np.testing.assert_allclose(np.asarray(model(TOKENS)), theirs, atol=1e-4, rtol=0)
    # merging: ours into the weights equals peft's merge_and_unload
    merged_theirs = hf_logits(wrapped.merge_and_unload(), TOKENS)
    np.testing.assert_allclose(np.asarray(merge_adapters(model)(TOKENS)), merged_theirs, atol=1e-4, rtol=0)
    # and reading back what we wrote gives the same arrays
    back_cfg, back = peft_io.read_peft(tmp_path / "adapter", CONFIG)
    assert back_cfg == lc
    for name, value in lora.adapter_arrays(model).items():
        np.testing.assert_array_equal(back[name], np.asarray(value))


def test_experts_alone_change_peft_logits(ref, tmp_path):
    """The expert adapters reach peft's fused transformers 5 experts (not silently dropped on its side)."""
    hf, path = ref
    lc = lora.LoRAConfig(rank=2, alpha=4.0, targets=("w1", "w2", "w3"))
    model = lora.add_adapters(ours(path, "ragged"), lc, trained_like(lc))
    peft_io.save_peft(model, tmp_path / "experts")
    wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "experts")).eval()
    theirs = hf_logits(wrapped, TOKENS)
    assert np.abs(theirs - hf_logits(hf, TOKENS)).max() > 1e-2
    np.testing.assert_allclose(np.asarray(model(TOKENS)), theirs, atol=1e-4, rtol=0)


def test_peft_native_adapter_loads_into_ours(ref, tmp_path):
    """An adapter made and saved by peft on transformers 5 (LoRA on the attention modules and on the fused expert
    parameters through `target_parameters`) read into ours."""
    hf, path = ref
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    wrapped = peft.get_peft_model(copy.deepcopy(hf), config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: give it values
                p.normal_(0.0, 0.1)
    wrapped.eval()
    wrapped.save_pretrained(str(tmp_path / "native"))
    theirs = hf_logits(wrapped, TOKENS)
    assert np.abs(theirs - hf_logits(hf, TOKENS)).max() > 1e-2
    model = peft_io.load_peft(ours(path), tmp_path / "native")
    assert set(lora.lora_config(model).targets) == set(lora.ALL_TARGETS)
    np.testing.assert_allclose(np.asarray(model(TOKENS)), theirs, atol=1e-4, rtol=0)


def test_refused_adapters(ref, tmp_path):
    hf, path = ref
    model = lora.add_adapters(ours(path), ATTENTION, trained_like(ATTENTION))
    peft_io.save_peft(model, tmp_path / "a")
    cfg_file = tmp_path / "a" / peft_io.CONFIG_FILE
    cfg = json.loads(cfg_file.read_text())
    cfg["use_dora"] = True
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="use_dora"):
        peft_io.read_peft(tmp_path / "a", CONFIG)
    with pytest.raises(CheckpointError, match="expected"):  # another model's adapter
        peft_io.save_peft(model, tmp_path / "b")
        peft_io.read_peft(tmp_path / "b", MixtralConfig.tiny(n_layers=2, dim=32, n_heads=2, n_kv_heads=1))
    with pytest.raises(CheckpointError, match="not a PEFT adapter"):
        peft_io.read_peft(tmp_path / "missing", CONFIG)
    with pytest.raises(CheckpointError, match="already exists"):
        peft_io.save_peft(model, tmp_path / "b")
    assert os.path.isfile(tmp_path / "b" / peft_io.WEIGHTS_FILE)
