"""Expert, tensor and data parallelism on a simulated 8-device CPU mesh: equal to one device, really sharded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax import MixtralConfig
from mixtral_jax.model.placement import shard_model
from mixtral_jax.sharding import ShardingError, make_mesh, parse_mesh_spec

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8-device CPU mesh from conftest.py")

MESHES = ["expert=8", "expert=4,tensor=2", "data=2,expert=4", "data=2,expert=2,tensor=2", "data=8"]
CONFIG = MixtralConfig.tiny(sliding_window=10)


@pytest.fixture(scope="module")
def model():
    return mixtral_jax.Mixtral(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward():
    return nnx.jit(lambda m, t: m(t, return_router_logits=True))


def _zero_router(model):
    from mixtral_jax.model.params import assemble_model, model_arrays

    arrays = dict(model_arrays(model))
    for name in arrays:
        if name.endswith("moe.router"):
            arrays[name] = jnp.zeros_like(arrays[name])
    return assemble_model(model.config, model.runtime, lambda name, spec: arrays[name])


@pytest.mark.parametrize("spec", MESHES)
@pytest.mark.parametrize("shape", [(4, 16), (1, 3)], ids=["all_to_all", "replicated_tokens"])
def test_sharded_logits_equal_single_device(model, forward, spec, shape):
    tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, shape)
    ref, ref_router = forward(model, tokens)
    out, router = forward(shard_model(model, spec), tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(router), np.asarray(ref_router), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", MESHES)
def test_every_token_to_the_same_experts_overflows_and_stays_exact(model, forward, spec):
    skewed = _zero_router(model)  # every token picks experts 0 and 1: one expert shard gets everything
    tokens = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (4, 16))
    ref, _ = forward(skewed, tokens)
    out, _ = forward(shard_model(skewed, spec), tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec,expert,tensor", [("expert=8", 8, 1), ("expert=4,tensor=2", 4, 2),
                                                ("data=2,expert=2,tensor=2", 2, 2), ("data=8", 1, 1)])
def test_parameters_are_sharded_as_the_rules_say(model, spec, expert, tensor):
    sharded = shard_model(model, spec)
    mesh = make_mesh(spec)
    w1 = sharded.layers[0].moe.w1[...]
    e, d, f = w1.shape
    shard_shapes = {s.data.shape for s in w1.addressable_shards}
    assert shard_shapes == {(e // expert, d, f // tensor)}  # checked on the arrays themselves
    assert w1.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
            "expert" if expert > 1 else None, None, "tensor" if tensor > 1 else None)), 3)
    per_device = max(s.data.nbytes for s in w1.addressable_shards)
    assert per_device * expert * tensor == w1.nbytes  # expert memory per device drops by expert x tensor
    wq = sharded.layers[0].attn.wq[...]
    assert {s.data.shape for s in wq.addressable_shards} == {(CONFIG.dim, CONFIG.n_heads // tensor,
                                                               CONFIG.head_dim)}
    # every device holds exactly the expert slices its mesh coordinates say
    for s in w1.addressable_shards:
        coords = {a: int(i) for a, i in zip(mesh.axis_names, np.argwhere(mesh.devices == s.device)[0])}
        start = coords["expert"] * (e // expert)
        np.testing.assert_array_equal(np.asarray(s.data)[:, :, :1], np.asarray(model.layers[0].moe.w1[...])[
            start:start + e // expert, :, coords["tensor"] * (f // tensor):][:, :, :1])


@pytest.mark.parametrize("spec,message", [
    ("expert=3", "needs 3 devices but 8 are available"),
    ("expert=16", "needs 16 devices"),
    ("data=2,expert=-1,tensor=-1", "only one axis may be -1"),
    ("pipeline=8", "AXIS one of data, expert, tensor"),
    ("expert=two", "not an integer"),
    ("data=3,expert=-1", "not divisible by 3"),
])
def test_impossible_mesh_specs(spec, message):
    with pytest.raises(ShardingError, match=message):
        make_mesh(spec)


def test_mesh_that_cannot_hold_the_model(model):
    with pytest.raises(ShardingError, match=r"6 experts cannot be split over expert=4; use an expert axis of"):
        shard_model(mixtral_jax.Mixtral(MixtralConfig.tiny(n_experts=6), rngs=nnx.Rngs(0)), "expert=4,data=2")
    with pytest.raises(ShardingError, match=r"n_kv_heads \(2\) is not divisible by tensor=4"):
        shard_model(model, "tensor=4,data=2")


def test_spec_parsing():
    assert parse_mesh_spec("data=2,expert=-1", 8) == {"data": 2, "expert": 4, "tensor": 1}
    assert parse_mesh_spec("tensor=2, expert=4", 8) == {"data": 1, "expert": 4, "tensor": 2}
    assert make_mesh(None).shape == {"data": 8, "expert": 1, "tensor": 1}


@pytest.mark.parametrize("spec", ["expert=4,tensor=2", "data=2,expert=4"])
@pytest.mark.slow
def test_sampler_on_a_sharded_mesh_equals_one_device(model, spec):
    from mixtral_jax.inference.sampler import Sampler

    prompts = [[5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15], [3, 3]]
    ref = Sampler(model)(prompts, 12, stop_tokens=[])
    steps = []
    assert Sampler(shard_model(model, spec))(prompts, 12, stop_tokens=[], stream=steps.append) == ref
    streamed = np.stack(steps, axis=1)  # the stream works on a mesh too (asynchronous dispatch included)
    assert [row[row >= 0].tolist() for row in streamed] == ref
    sampled = dict(temperature=0.9, top_p=0.8, seed=5, stop_tokens=[])
    assert Sampler(shard_model(model, spec))(prompts, 12, **sampled) == Sampler(model)(prompts, 12, **sampled)


@pytest.mark.parametrize("spec,batch,batch_axes,head_axes,split_b,split_h", [
    ("expert=4,tensor=2", 8, "expert", "tensor", 4, 2),          # sequences over expert, KV heads over tensor
    ("data=2,expert=4", 8, ("data", "expert"), None, 8, 1),      # a decode batch spreads over the whole mesh
    ("data=2,expert=4", 2, "data", None, 2, 1),                  # 2 sequences: split over data only
    ("expert=8", 1, None, None, 1, 1),                           # batch 1 stays replicated
])
def test_kv_cache_is_laid_out_by_the_rules(model, spec, batch, batch_axes, head_axes, split_b, split_h):
    from mixtral_jax.inference.sampler import Greedy, prefill
    from mixtral_jax.sharding.rules import KV_CACHE_AXES, activation_spec

    mesh = make_mesh(spec)
    assert activation_spec((batch, CONFIG.n_kv_heads, 32, CONFIG.head_dim), KV_CACHE_AXES, mesh) == \
        jax.sharding.PartitionSpec(batch_axes, head_axes, None, None)
    sharded = shard_model(model, spec)
    tokens = np.random.default_rng(2).integers(1, CONFIG.vocab_size, (batch, 16)).astype(np.int32)
    valid = np.ones_like(tokens, bool)
    key = np.asarray(jax.random.key_data(jax.random.key(0)))
    graphdef, state = nnx.split(sharded)
    first, cache, _, _ = prefill(graphdef, state, None, tokens, valid, key, None, strategy=Greedy(), max_new=16,
                                 cache_dtype=jnp.dtype(jnp.float32))
    k = cache.k[0]
    assert {s.data.shape for s in k.addressable_shards} == {(batch // split_b, CONFIG.n_kv_heads // split_h, 32,
                                                             CONFIG.head_dim)}
    # and the sharded cache holds the same keys, and gives the same first tokens, as one device
    ref_graphdef, ref_state = nnx.split(model)
    ref_first, ref_cache, _, _ = prefill(ref_graphdef, ref_state, None, tokens, valid, key, None, strategy=Greedy(),
                                         max_new=16, cache_dtype=jnp.dtype(jnp.float32))
    np.testing.assert_allclose(np.asarray(k), np.asarray(ref_cache.k[0]), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(ref_first))
