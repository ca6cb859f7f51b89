"""Every MoE strategy equals the dense all-experts reference, including when one expert gets every token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mixtral_jax.model import moe
from mixtral_jax.model.moe import Routing, route, run_experts

SPARSE = ["ragged", "capacity", "gather", "grouped"]


def _weights(e=8, d=32, f=48, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(k[0], (d, e)), 0.1 * jax.random.normal(k[1], (e, d, f)),
            0.1 * jax.random.normal(k[2], (e, d, f)), 0.1 * jax.random.normal(k[3], (e, f, d)))


@pytest.mark.parametrize("strategy", SPARSE)
@pytest.mark.parametrize("tokens,top_k,e", [(1, 2, 8), (3, 2, 8), (64, 2, 8), (50, 1, 4), (33, 3, 6)])
def test_strategy_equals_dense(strategy, tokens, top_k, e):
    router, w1, w3, w2 = _weights(e=e)
    x = jax.random.normal(jax.random.key(tokens), (tokens, router.shape[0]))
    routing = route(x, router, top_k)
    expect = moe.moe_dense(x, routing, w1, w3, w2)
    got = run_experts(x, routing, w1, w3, w2, strategy)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expect), atol=1e-5, rtol=0)


def _all_to_one(tokens, top_k, x, router):
    """Routing where every token picks experts 0..k-1: the worst overflow for bucketed strategies."""
    experts = jnp.broadcast_to(jnp.arange(top_k, dtype=jnp.int32), (tokens, top_k))
    weights = jax.nn.softmax(jax.random.normal(jax.random.key(7), (tokens, top_k)), -1)
    return Routing(x @ router, weights, experts)


@pytest.mark.parametrize("strategy", SPARSE)
@pytest.mark.parametrize("capacity_factor", [1.0, 2.0])
def test_overflow_every_token_to_the_same_experts(strategy, capacity_factor):
    router, w1, w3, w2 = _weights()
    x = jax.random.normal(jax.random.key(1), (64, router.shape[0]))
    routing = _all_to_one(64, 2, x, router)
    assert moe.bucket_capacity(64, 2, 8, capacity_factor) < 64  # the buckets really overflow
    expect = moe.moe_dense(x, routing, w1, w3, w2)
    got = jax.jit(lambda x: run_experts(x, routing, w1, w3, w2, strategy, capacity_factor))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expect), atol=1e-5, rtol=0)


@pytest.mark.parametrize("skew", [0.05, 0.5, 5.0])
def test_grouped_every_bucket_size_on_skewed_routing(skew):
    """Loads from nearly one-hot to balanced: experts land on many rungs of the size ladder (and at 0)."""
    router, w1, w3, w2 = _weights()
    t = 256
    x = jax.random.normal(jax.random.key(3), (t, router.shape[0]))
    rng = np.random.default_rng(int(skew * 100))
    popularity = rng.dirichlet(np.full(8, skew))
    scores = np.log(popularity + 1e-12) + rng.gumbel(size=(t, 8))  # distinct top-2 per token
    experts = jnp.asarray(np.argsort(-scores, axis=1)[:, :2], jnp.int32)
    routing = Routing(x @ router, jax.nn.softmax(jax.random.normal(jax.random.key(4), (t, 2)), -1), experts)
    loads = np.bincount(np.asarray(experts).ravel(), minlength=8)
    sizes = moe.bucket_sizes(t, 2, 8)
    assert sizes[-1] == t and len(sizes) > 3
    got = jax.jit(lambda x: moe.moe_grouped(x, routing, w1, w3, w2))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(moe.moe_dense(x, routing, w1, w3, w2)), atol=1e-5,
                               err_msg=f"loads {loads}")


def test_capacity_without_overflow_takes_the_bucket_path():
    """The overflow fallback is a real branch: with balanced routing the bucket result is used and exact."""
    router, w1, w3, w2 = _weights()
    x = jax.random.normal(jax.random.key(2), (64, router.shape[0]))
    experts = (jnp.arange(128, dtype=jnp.int32) % 8).reshape(64, 2)
    routing = Routing(x @ router, jnp.full((64, 2), 0.5), experts)
    got = moe.moe_capacity(x, routing, w1, w3, w2, capacity_factor=1.0)  # exactly 16 slots, 16 per expert
    np.testing.assert_allclose(np.asarray(got), np.asarray(moe.moe_dense(x, routing, w1, w3, w2)), atol=1e-5)


def test_dense_equals_hf_expert_loop():
    """The dense reference itself against transformers' MixtralExperts (its per-expert gather/index_add loop)."""
    import transformers
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    e, d, f = 8, 32, 48
    router, w1, w3, w2 = _weights(e=e, d=d, f=f)
    cfg = transformers.MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=e)
    experts = MixtralExperts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.as_tensor(np.concatenate(
            [np.asarray(w1).transpose(0, 2, 1), np.asarray(w3).transpose(0, 2, 1)], axis=1)))
        experts.down_proj.copy_(torch.as_tensor(np.asarray(w2).transpose(0, 2, 1)))
    x = jax.random.normal(jax.random.key(5), (40, d))
    routing = route(x, router, 2)
    with torch.no_grad():
        ref = experts(torch.as_tensor(np.asarray(x)), torch.as_tensor(np.asarray(routing.expert_ids)).long(),
                      torch.as_tensor(np.asarray(routing.weights)))
    np.testing.assert_allclose(np.asarray(moe.moe_dense(x, routing, w1, w3, w2)), ref.numpy(), atol=1e-5)


def test_route_softmax_over_topk_equals_softmax_all_then_renormalise():
    router, *_ = _weights()
    x = jax.random.normal(jax.random.key(3), (20, router.shape[0]))
    r = route(x, router, 2)
    probs = jax.nn.softmax(x @ router, -1)
    top, idx = jax.lax.top_k(probs, 2)
    np.testing.assert_array_equal(np.asarray(r.expert_ids), np.asarray(idx))
    # the same numbers by two roundings: a few float32 ulps apart (1.07e-6 seen with jax 0.12)
    np.testing.assert_allclose(np.asarray(r.weights), np.asarray(top / top.sum(-1, keepdims=True)), atol=3e-6)
    assert r.logits.dtype == jnp.float32 and r.weights.dtype == jnp.float32


def test_auto_strategy_is_sparse_and_exact():
    assert moe.resolve_strategy("auto", "cpu") == "grouped"
    assert moe.resolve_strategy("auto", "gpu") == "gmm"  # ragged_dot is a masked dense dot on CUDA
    assert moe.resolve_strategy("dense", "cpu") == "dense"


@pytest.mark.slow
def test_model_level_strategies_agree_when_router_is_zero(tmp_path):
    """A zero router sends every token to the same experts (ties break to the lowest index) in every layer."""
    from flax import nnx

    import mixtral_jax

    config = mixtral_jax.MixtralConfig.tiny()
    models = {}
    for strategy in ["dense", *SPARSE]:
        m = mixtral_jax.Mixtral(config, mixtral_jax.RuntimeConfig(moe_strategy=strategy, capacity_factor=1.0),
                                rngs=nnx.Rngs(0))
        for layer in m.layers:
            layer.moe.router[...] = jnp.zeros_like(layer.moe.router[...])
        models[strategy] = m
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 24))
    ref = np.asarray(models["dense"](tokens))
    for strategy in SPARSE:
        np.testing.assert_allclose(np.asarray(models[strategy](tokens)), ref, atol=1e-5, err_msg=strategy)
