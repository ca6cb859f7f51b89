"""LoRA dropout (PEFT's `lora_dropout`: `lora_B(lora_A(dropout(x)))` while training, nothing at inference)
on the attention targets; refused with the experts, as PEFT refuses it on Mixtral's fused experts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax import MixtralConfig, RuntimeConfig
from mixtral_jax.config import ConfigError
from mixtral_jax.model import lora
from mixtral_jax.training.trainer import TrainConfig, Trainer

SMALL = MixtralConfig.tiny(n_layers=1)
DROPOUT = lora.LoRAConfig(rank=4, alpha=8.0, dropout=0.25, targets=lora.ATTENTION_TARGETS)


def _adapted(config=DROPOUT, seed=0):
    model = mixtral_jax.Mixtral(SMALL, RuntimeConfig(moe_strategy="dense"), rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 1)
    specs = lora.adapter_specs(SMALL, config)
    arrays = {n: rng.normal(size=s.shape).astype(np.float32) * 0.1 for n, s in specs.items()}
    return lora.add_adapters(model, config, arrays)


def test_dropout_is_unbiased_noise_on_the_adapters_input():
    attn = _adapted().layers[0].attn
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 5, SMALL.dim)), jnp.float32)
    zero = jnp.zeros((2, 5, SMALL.n_heads, SMALL.head_dim), jnp.float32)
    plain = np.asarray(lora.plus(attn, "wq", x, zero))  # no key: inference
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    drawn = np.asarray(jax.vmap(lambda k: lora.plus(attn, "wq", x, zero, None, k))(keys))
    assert np.abs(drawn[0] - plain).max() > 0.1 * np.abs(plain).max()  # a draw is not the plain term
    np.testing.assert_array_equal(drawn[0], np.asarray(lora.plus(attn, "wq", x, zero, None, keys[0])))  # same key
    # E[dropout(x)] = x, and the term is linear in x: the mean of the draws is the plain term
    spread = drawn.std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(drawn.mean(0) - plain) < 5 * spread + 1e-6)
    # a fraction `dropout` of x's entries is zeroed: the term of x's first feature alone vanishes that often
    one = x.at[..., 1:].set(0.0)
    firsts = np.asarray(jax.vmap(lambda k: lora.plus(attn, "wq", one, zero, None, k))(keys[:2000]))[:, 0, 0, 0, 0]
    assert abs(np.mean(firsts == 0.0) - DROPOUT.dropout) < 0.04


def test_the_forward_pass_drops_only_with_a_key():
    model = _adapted()
    tokens = np.random.default_rng(3).integers(0, SMALL.vocab_size, (2, 9))
    key = jax.random.PRNGKey(7)
    inference = np.asarray(model(tokens))
    dropped = np.asarray(model(tokens, lora_dropout_key=key))
    assert np.abs(dropped - inference).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(model(tokens, lora_dropout_key=key)), dropped)
    no_dropout = _adapted(dataclasses.replace(DROPOUT, dropout=0.0))
    np.testing.assert_array_equal(np.asarray(no_dropout(tokens, lora_dropout_key=key)), inference)


def _train(lc, remat=False, steps=4):
    tc = TrainConfig(steps=steps, batch_size=4, seq_len=16, lr=5e-2, warmup_steps=1, lora=lc, remat=remat,
                     grad_accum=2)
    trainer = Trainer(mixtral_jax.Mixtral(SMALL, RuntimeConfig(moe_strategy="dense"), rngs=nnx.Rngs(0)), tc)
    tokens = np.random.default_rng(0).integers(0, 128, (steps * 4 * 16,)).astype(np.int32)
    history = trainer.fit(mixtral_jax.PackedDataset.from_tokens(tokens, 16, shuffle=False))
    return trainer, history


def test_training_draws_a_reproducible_mask_per_step_through_remat():
    (a, hist_a), (b, _), (plain, hist_plain) = (_train(DROPOUT, remat=True), _train(DROPOUT, remat=True),
                                                 _train(dataclasses.replace(DROPOUT, dropout=0.0), remat=True))
    for name, value in a.params.items():  # the same seed draws the same masks
        np.testing.assert_array_equal(np.asarray(value), np.asarray(b.params[name]), err_msg=name)
    # the first step's loss is the base model's either way (b = 0 at the start is PEFT's and ours, so only
    # the gradient sees the dropout); the adapters then train differently
    assert hist_a[0]["ce"] == pytest.approx(hist_plain[0]["ce"], rel=1e-6)
    assert max(float(jnp.abs(a.params[n] - plain.params[n]).max()) for n in a.params) > 1e-4
    assert all(np.isfinite(h["loss"]) for h in hist_a)


def test_dropout_with_expert_targets_is_refused_as_peft_refuses_it():
    with pytest.raises(ConfigError, match="attention targets only"):
        TrainConfig(lora=lora.LoRAConfig(rank=4, dropout=0.1, targets=lora.ALL_TARGETS))
    TrainConfig(lora=lora.LoRAConfig(rank=4, dropout=0.1, targets=("q_proj", "v_proj")))  # accepted
