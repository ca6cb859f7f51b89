"""What makes a LoRA step on an int8 base fit: the same gradients from the memory-saving paths.

- `quant.ragged_dot` on int8 experts has its own VJP (the input's gradient only, in the input's dtype);
- `remat_in_order` recomputes each layer only once the backward pass reaches it;
- the expert-parallel exchange takes an overflowing bucket's copies in further rounds of the same size.

Each is compared with a path that nobody changed: the `dense` strategy (jax's own autodiff through the int8
einsums), no remat, one device.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mixtral_jax.config import MixtralConfig, RuntimeConfig
from mixtral_jax.model import lora, quant
from mixtral_jax.model.mixtral import Mixtral
from mixtral_jax.model.params import assemble_model, model_arrays
from mixtral_jax.model.placement import quantize_model, shard_model

CONFIG = MixtralConfig.tiny()
FULL = lora.LoRAConfig(rank=4, alpha=8.0, targets=lora.ALL_TARGETS)
TOKENS = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 12))
COTANGENT = np.random.default_rng(5).normal(size=(2, 12, CONFIG.vocab_size)).astype(np.float32)


def _adapters():
    """Adapters as after some training (b random: a fresh b is zero and would hide the a gradients)."""
    rng = np.random.default_rng(1)
    return {k: v if k.endswith(lora.A_SUFFIX) else rng.normal(0, 0.05, v.shape).astype(np.float32)
            for k, v in lora.init_adapters(CONFIG, FULL, 1).items()}


def _variant(model, *, zero_router=False, **runtime):
    """The same (int8) weights under another runtime, optionally with every router zeroed (all tokens then
    pick experts 0 and 1: one expert shard gets every copy), with the test adapters."""
    arrays = {k: v for k, v in model_arrays(model).items() if "_lora_" not in k}
    if zero_router:
        arrays = {k: jnp.zeros_like(v) if k.endswith("moe.router") else v for k, v in arrays.items()}
    out = assemble_model(model.config, dataclasses.replace(model.runtime, **runtime), lambda n, s: arrays[n])
    return lora.add_adapters(out, FULL, _adapters())


def _grads(model, remat=False):
    graphdef, adapters, rest = nnx.split(model, lora.LoRAParam, ...)

    def loss(adapters):
        m = nnx.merge(graphdef, adapters, rest)
        m.remat = remat
        return jnp.sum(m(TOKENS) * COTANGENT)

    grads = jax.jit(jax.grad(loss))(adapters)
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}


def _assert_close(ours, ref):
    assert ours.keys() == ref.keys()
    for name in ref:
        np.testing.assert_allclose(ours[name], ref[name], atol=1e-4, rtol=1e-4, err_msg=name)
    assert all(np.abs(g).max() > 0 for g in ref.values())  # every adapter gets a gradient


@pytest.fixture(scope="module")
def int8_base():
    return quantize_model(Mixtral(CONFIG, RuntimeConfig(moe_strategy="dense"), rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def dense_grads(int8_base):
    return _grads(_variant(int8_base))


def test_int8_ragged_dot_vjp_is_the_input_gradient():
    rng = np.random.default_rng(0)
    q, scale = quant.quantize(rng.normal(size=(3, 6, 5)).astype(np.float32), (1,))
    w = quant.QArray(jnp.asarray(q), jnp.asarray(scale))
    sizes = np.array([3, 0, 7])
    group_sizes, rows = jnp.asarray(sizes, jnp.int32), jnp.repeat(jnp.arange(3), sizes)
    x, ct = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((10, 6), (10, 5)))

    def autodiff(x):  # the forward pass as written, differentiated by jax
        y = jax.lax.ragged_dot(x, w.q, group_sizes, preferred_element_type=jnp.float32)
        return jnp.sum((y * w.scale[rows]).astype(x.dtype) * ct)

    ours = jax.grad(lambda x: jnp.sum(quant.ragged_dot(x, w, group_sizes, rows) * ct))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(jax.grad(autodiff)(x)), rtol=1e-6, atol=1e-6)


def test_ragged_int8_remat_gradients_equal_dense_autodiff(int8_base, dense_grads):
    """The ragged strategy (our int8 VJP) under `remat_in_order` against dense einsums without remat."""
    _assert_close(_grads(_variant(int8_base, moe_strategy="ragged"), remat=True), dense_grads)


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8-device CPU mesh from conftest.py")
def test_overflowing_buckets_take_further_rounds_with_exact_gradients(int8_base):
    """expert=8 with every token on experts 0 and 1: their device's buckets overflow (capacity 2x the
    balanced load, 4x needed), so the exchange runs further rounds; logits and adapter gradients equal one
    device's, with remat as training uses it."""
    one = _variant(int8_base, zero_router=True, moe_strategy="ragged")
    sharded = shard_model(_variant(int8_base, zero_router=True, moe_strategy="ragged"), "expert=8")
    np.testing.assert_allclose(np.asarray(sharded(TOKENS)), np.asarray(one(TOKENS)), atol=2e-5, rtol=1e-5)
    _assert_close(_grads(sharded, remat=True), _grads(one))


def test_remat_in_order_gradients_of_every_weight():
    """Full training differentiates every weight through `remat_in_order`: the same gradients as no remat."""
    model = Mixtral(CONFIG, RuntimeConfig(moe_strategy="ragged"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def grads(remat):
        def loss(params):
            m = nnx.merge(graphdef, params)
            m.remat = remat
            return jnp.sum(m(TOKENS) * COTANGENT)
        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    for ours, ref in zip(grads(True), grads(False), strict=True):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.tpu
def test_plan_of_a_lora_step_keeps_about_one_layers_expert_buffers():
    """A 4-layer int8 LoRA step compiled for v5e-8 (`expert=8`, remat): XLA's temporaries stay within a few
    of one layer's rows x hidden expert buffers (here 2048 received rows per device x 1024, 8 MiB in
    float32). Before the three changes above: 275 MiB (buckets for every copy in the overflow branch, float32
    products and cotangents, several layers' buffers held at once); after: 44 MiB."""
    pytest.importorskip("libtpu")
    from mixtral_jax.planning import planner as plan_lib

    config = MixtralConfig.tiny(dim=128, head_dim=64, n_heads=2, n_kv_heads=1, hidden_dim=1024, vocab_size=512,
                                n_layers=4, max_seq_len=512)
    (report,) = plan_lib.plan(config, "v5e-8", "expert=8", [plan_lib.train(8, 512, remat=True, lora_rank=8)],
                              quantize="int8")
    rows_by_hidden = 2048 * config.hidden_dim * 4
    assert report.temp_bytes < 12 * rows_by_hidden, report.temp_bytes / 2**20
