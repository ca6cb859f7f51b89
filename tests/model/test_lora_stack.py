"""Stacked LoRA adapters (multi-adapter serving): a batch whose rows use different adapters (and none), through
the masked wide adapter, gives each row what the model with only that row's adapter (`add_adapters`) gives, in
every MoE strategy and expert-parallel on a mesh (which must equal one device)."""

import jax
import numpy as np
import pytest
from flax import nnx

from mixtral_jax.config import MixtralConfig, RuntimeConfig
from mixtral_jax.errors import ConfigError
from mixtral_jax.model import lora
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.placement import shard_model
from tests.model.test_lora import trained_like, with_runtime

CONFIG = MixtralConfig.tiny()
FIRST = lora.LoRAConfig(rank=4, alpha=8.0, targets=lora.ALL_TARGETS)
SECOND = lora.LoRAConfig(rank=2, alpha=3.0, targets=("q_proj", "v_proj", "w2"))  # other rank, alpha and targets
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (3, 12))
IDS = np.array([1, 0, 2])  # row 0 the first adapter, row 1 the base, row 2 the second


@pytest.fixture(scope="module")
def base():
    return Mixtral(CONFIG, RuntimeConfig(moe_strategy="dense"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def adapters():
    return {"first": (FIRST, trained_like(CONFIG, FIRST, 1)), "second": (SECOND, trained_like(CONFIG, SECOND, 2))}


@pytest.fixture(scope="module")
def alone(base, adapters):
    """Each row's logits from the base alone or the model with only its own adapter."""
    models = [base] + [lora.add_adapters(with_runtime(base), *adapters[n]) for n in ("first", "second")]
    outs = [np.asarray(m(TOKENS)) for m in models]
    assert all(np.abs(outs[i] - outs[0]).max() > 1e-2 for i in (1, 2))  # the adapters act
    return np.stack([outs[i][row] for row, i in enumerate(IDS)])


@pytest.mark.parametrize("strategy", ["auto", "dense", "ragged", "capacity", "gather", "gmm"])
def test_each_row_equals_its_adapter_alone(base, adapters, alone, strategy):
    # capacity_factor 1: 72 copies over 8 experts of capacity 9 can overflow, so the dense fallback is compiled too
    model = lora.stack_adapters(with_runtime(base, moe_strategy=strategy, capacity_factor=1.0), adapters)
    stack = lora.lora_stack(model)
    assert stack.names == ("first", "second") and stack.ranks == (4, 2)
    assert lora.adapter_arrays(model)["layers.0.attn.wq_lora_a"].shape == (CONFIG.dim, 6)
    np.testing.assert_allclose(np.asarray(model(TOKENS, adapter_ids=IDS)), alone, atol=2e-5, rtol=1e-5)


def test_without_ids_every_row_is_the_base(base, adapters):
    model = lora.stack_adapters(with_runtime(base, moe_strategy="ragged"), adapters)
    np.testing.assert_allclose(np.asarray(model(TOKENS)), np.asarray(base(TOKENS)), atol=2e-5, rtol=1e-5)


needs_mesh = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8-device CPU mesh from conftest.py")


@needs_mesh
@pytest.mark.parametrize("spec, rows, length", [
    ("data=2,expert=2,tensor=2", 2, 12),  # tokens split over the experts' devices: the mask rides the all_to_all
    ("expert=4,tensor=2", 1, 5),          # 5 tokens do not split: replicated tokens (and masks) and a psum
])
def test_expert_parallel_equals_one_device(base, adapters, alone, spec, rows, length):
    one = lora.stack_adapters(with_runtime(base, moe_strategy="ragged"), adapters)
    sharded = shard_model(one, spec)
    assert lora.lora_stack(sharded) == lora.lora_stack(one)
    ids, tokens = IDS[[0, 2]][:rows], TOKENS[[0, 2]][:rows, :length]
    out = np.asarray(sharded(tokens, adapter_ids=ids))
    np.testing.assert_allclose(out, np.asarray(one(tokens, adapter_ids=ids)), atol=2e-5, rtol=1e-5)
    if length == TOKENS.shape[1]:
        np.testing.assert_allclose(out, alone[[0, 2]][:rows], atol=2e-5, rtol=1e-5)


def test_bad_stacks(base, adapters):
    model = with_runtime(base)
    with pytest.raises(ConfigError, match="no LoRA adapter 'third'"):
        lora.LoRAStack(("first",), (4,)).index("third")
    bad = dict(adapters["second"][1])
    bad["layers.0.attn.wq_lora_a"] = np.zeros((3, 2), np.float32)
    with pytest.raises(ConfigError, match="adapter 'second'.*shape"):
        lora.stack_adapters(model, {"first": adapters["first"], "second": (SECOND, bad)})
    with pytest.raises(ConfigError, match="at least one"):
        lora.stack_adapters(model, {})
    with pytest.raises(ConfigError, match="stacked"):
        base(TOKENS, adapter_ids=IDS)  # no stack: ids would be silently ignored
    with pytest.raises(ConfigError, match="save each"):
        lora.lora_config(lora.stack_adapters(model, adapters)).to_dict()
