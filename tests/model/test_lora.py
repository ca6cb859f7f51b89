"""LoRA adapters: every MoE strategy, int8 bases and the expert-parallel shard_map equal the merged weights.

The reference is the plain model whose weights are `W + alpha / rank * a @ b` (numpy, `merge_adapters`) run
with the dense strategy; the adapted models never form those weights. Gradients with respect to the adapters
are checked against the gradient through merged weights built in JAX, and against a central difference.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax.config import MixtralConfig, RuntimeConfig
from mixtral_jax.errors import ConfigError
from mixtral_jax.model import lora
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.params import assemble_model, model_arrays, param_specs, quantized_weights
from mixtral_jax.model.placement import merge_adapters, quantize_model, shard_model
from mixtral_jax.model.quant import dequantize

CONFIG = MixtralConfig.tiny()
FULL = lora.LoRAConfig(rank=4, alpha=8.0, targets=lora.ALL_TARGETS)
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 12))


def trained_like(config, lc, seed=1):
    """Adapters as after some training: a as initialised, b random (a fresh b is zero)."""
    rng = np.random.default_rng(seed)
    return {k: v if k.endswith(lora.A_SUFFIX) else rng.normal(0, 0.05, v.shape).astype(np.float32)
            for k, v in lora.init_adapters(config, lc, seed).items()}


@pytest.fixture(scope="module")
def base():
    return Mixtral(CONFIG, RuntimeConfig(moe_strategy="dense"), rngs=nnx.Rngs(0))


def with_runtime(model, **changes):
    """The same weights under another runtime (strategy); no adapters."""
    arrays = {k: v for k, v in model_arrays(model).items() if "_lora_" not in k}
    return assemble_model(model.config, dataclasses.replace(model.runtime, **changes), lambda n, s: arrays[n])


def test_fresh_adapters_leave_the_model_unchanged(base):
    model = lora.add_adapters(with_runtime(base), FULL, seed=3)
    np.testing.assert_array_equal(np.asarray(model(TOKENS)), np.asarray(base(TOKENS)))
    assert len(lora.adapter_arrays(model)) == 2 * len(FULL.targets) * CONFIG.n_layers
    assert len(jax.tree.leaves(nnx.state(model, lora.LoRAParam))) == len(lora.adapter_arrays(model))


@pytest.mark.parametrize("strategy", ["dense", "ragged", "capacity", "gather", "grouped", "gmm"])
def test_every_strategy_equals_the_merged_weights(base, strategy):
    # capacity_factor 1: 24 copies over 8 experts of capacity 3, so the overflow fallback is compiled too
    model = lora.add_adapters(with_runtime(base, moe_strategy=strategy, capacity_factor=1.0), FULL,
                              trained_like(CONFIG, FULL))
    merged = merge_adapters(lora.add_adapters(with_runtime(base), FULL, trained_like(CONFIG, FULL)))
    assert lora.lora_config(merged) is None and not lora.adapter_arrays(merged)
    out, ref = np.asarray(model(TOKENS)), np.asarray(merged(TOKENS))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    assert np.abs(ref - np.asarray(base(TOKENS))).max() > 1e-2  # the adapters change the output


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("w2",), ("o_proj", "w1", "w3")])
def test_target_subsets(base, targets):
    lc = lora.LoRAConfig(rank=2, alpha=4.0, targets=targets)
    model = lora.add_adapters(with_runtime(base, moe_strategy="grouped"), lc, trained_like(CONFIG, lc))
    ref = merge_adapters(lora.add_adapters(with_runtime(base), lc, trained_like(CONFIG, lc)))
    np.testing.assert_allclose(np.asarray(model(TOKENS)), np.asarray(ref(TOKENS)), atol=2e-5, rtol=1e-5)


def test_int8_base_with_float_adapters(base):
    """QLoRA-style: the int8 base as stored (values times scales) plus float adapters."""
    q = quantize_model(with_runtime(base, moe_strategy="ragged"))
    arrays = model_arrays(q)
    contract = quantized_weights(param_specs(CONFIG, q.runtime))
    dequant = {name: dequantize(np.asarray(v), np.asarray(arrays[name + "_scale"]), contract[name])
               if name in contract else np.asarray(v) for name, v in arrays.items() if not name.endswith("_scale")}
    float_base = assemble_model(CONFIG, RuntimeConfig(moe_strategy="dense"), lambda n, s: jnp.asarray(dequant[n]))
    adapters = trained_like(CONFIG, FULL)
    ours = lora.add_adapters(q, FULL, adapters)
    assert lora.adapter_arrays(ours)["layers.0.moe.w1_lora_a"].dtype == jnp.float32
    assert model_arrays(ours)["layers.0.moe.w1"].dtype == jnp.int8
    ref = merge_adapters(lora.add_adapters(float_base, FULL, adapters))
    np.testing.assert_allclose(np.asarray(ours(TOKENS)), np.asarray(ref(TOKENS)), atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="int8"):
        merge_adapters(ours)


def _loss_fn(model, cotangent):
    graphdef, adapters, rest = nnx.split(model, lora.LoRAParam, ...)

    def loss(adapters):
        return jnp.sum(nnx.merge(graphdef, adapters, rest)(TOKENS) * cotangent)

    return loss, adapters


def _merged_loss_fn(base, lc, cotangent):
    """The loss as a function of the adapters through weights merged in JAX (independent of our LoRA path)."""
    graphdef, state = nnx.split(base)

    def loss(adapters):
        flat = dict(nnx.to_flat_state(state))
        new = []
        for path, var in flat.items():
            name = ".".join(map(str, path))
            value = var.get_value()
            for i in range(CONFIG.n_layers):
                for target in lc.targets:
                    weight = lora.WEIGHT_OF[target]
                    if name == f"layers.{i}.{lora.MODULE_OF[target]}.{weight}":
                        a = adapters[lora.adapter_name(i, target, "a")]
                        b = adapters[lora.adapter_name(i, target, "b")]
                        value = value + jnp.einsum(lora._MERGE_SPECS[weight], a, b) * lc.scale
            new.append((path, var.replace(value)))
        return jnp.sum(nnx.merge(graphdef, nnx.from_flat_state(new))(TOKENS) * cotangent)

    return loss


@pytest.mark.parametrize("strategy", ["ragged", "gather", pytest.param("grouped", marks=pytest.mark.slow)])
def test_adapter_gradients(base, strategy):
    cotangent = jnp.asarray(np.random.default_rng(5).normal(size=(2, 12, CONFIG.vocab_size)), jnp.float32)
    adapters = trained_like(CONFIG, FULL)
    model = lora.add_adapters(with_runtime(base, moe_strategy=strategy), FULL, adapters)
    loss, state = _loss_fn(model, cotangent)
    grads = jax.jit(jax.grad(loss))(state)
    ours = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(grads)}
    ref = jax.jit(jax.grad(_merged_loss_fn(base, FULL, cotangent)))({k: jnp.asarray(v) for k, v in adapters.items()})
    for name in ref:
        np.testing.assert_allclose(np.asarray(ours[name]), np.asarray(ref[name]), atol=1e-4, rtol=1e-4,
                                   err_msg=name)
    assert all(np.abs(np.asarray(g)).max() > 0 for g in ref.values())  # every adapter gets a gradient
    # a central difference along a random direction of the last layer's expert adapters (which act after its
    # routing: the loss is smooth there, while a step in earlier adapters may flip a top-2 choice)
    rng = np.random.default_rng(7)
    direction = nnx.from_flat_state([
        (p, v.replace(jnp.asarray(rng.normal(size=v.get_value().shape) * (f"layers.{CONFIG.n_layers - 1}.moe" in
                                                                          ".".join(map(str, p))), jnp.float32)))
        for p, v in nnx.to_flat_state(state)])
    eps = 3e-3
    plus = loss(jax.tree.map(lambda v, d: v + eps * d, state, direction))
    minus = loss(jax.tree.map(lambda v, d: v - eps * d, state, direction))
    along = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True))
    np.testing.assert_allclose(float((plus - minus) / (2 * eps)), float(along), rtol=2e-3)


needs_mesh = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8-device CPU mesh from conftest.py")


@needs_mesh
@pytest.mark.parametrize("spec, shape", [
    ("expert=8", (2, 12)),                 # tokens split over the experts' devices: all_to_all
    ("data=2,expert=2,tensor=2", (2, 12)),  # the expert hidden dimension (and b of w1/w3, a of w2) split too
    ("expert=4,tensor=2", (1, 5)),          # 5 tokens do not split: replicated tokens and a psum
])
def test_expert_parallel_equals_one_device(base, spec, shape):
    adapters = trained_like(CONFIG, FULL)
    one = lora.add_adapters(with_runtime(base, moe_strategy="ragged"), FULL, adapters)
    sharded = shard_model(one, spec)
    a1 = lora.adapter_arrays(sharded)["layers.0.moe.w1_lora_a"]
    assert a1.sharding.spec[0] == "expert"
    b1 = lora.adapter_arrays(sharded)["layers.0.moe.w1_lora_b"]
    if "tensor" in spec:
        assert b1.sharding.spec[2] == "tensor"
    tokens = TOKENS[: shape[0], : shape[1]]
    np.testing.assert_allclose(np.asarray(sharded(tokens)), np.asarray(one(tokens)), atol=2e-5, rtol=1e-5)


@needs_mesh
def test_expert_parallel_gradients_equal_one_device(base):
    cotangent = jnp.asarray(np.random.default_rng(5).normal(size=(2, 12, CONFIG.vocab_size)), jnp.float32)
    one = lora.add_adapters(with_runtime(base, moe_strategy="ragged"), FULL, trained_like(CONFIG, FULL))
    sharded = shard_model(one, "data=2,expert=2,tensor=2")
    grads = []
    for model in (one, sharded):
        loss, state = _loss_fn(model, cotangent)
        grads.append({".".join(map(str, p)): np.asarray(v.get_value())
                      for p, v in nnx.to_flat_state(jax.jit(jax.grad(loss))(state))})
    for name, g in grads[0].items():
        np.testing.assert_allclose(grads[1][name], g, atol=1e-4, rtol=1e-4, err_msg=name)


def test_bad_configs():
    with pytest.raises(ConfigError, match="targets"):
        lora.LoRAConfig(targets=("gate_proj",))
    with pytest.raises(ConfigError, match="rank"):
        lora.LoRAConfig(rank=0)
    assert lora.LoRAConfig(targets=("w2", "q_proj")).targets == ("q_proj", "w2")
    with pytest.raises(ConfigError, match="shape"):
        bad = trained_like(CONFIG, FULL)
        bad["layers.0.attn.wq_lora_a"] = np.zeros((3, 3), np.float32)
        lora.add_adapters(Mixtral(CONFIG, rngs=nnx.Rngs(0)), FULL, bad)


def test_decoding_with_a_kv_cache_equals_the_full_forward_pass(base):
    """Prefill then one-token steps through `extend` (the sampler's path: decode-sized `grouped`, expert views,
    the CPU kernels' fallback for adapted layers) give the full forward pass's logits."""
    from mixtral_jax.model.kv_cache import KVCache

    model = lora.add_adapters(with_runtime(base, moe_strategy="grouped"), FULL, trained_like(CONFIG, FULL))
    full = np.asarray(model(TOKENS))
    cache = KVCache.empty(CONFIG, 2, 16, jnp.float32)
    logits, cache = model.extend(cache, jnp.asarray(TOKENS[:, :8]))
    steps = [np.asarray(logits)]
    for i in range(8, 12):
        logits, cache = model.extend(cache, jnp.asarray(TOKENS[:, i:i + 1]), expert_weights=model.expert_views(2))
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)
