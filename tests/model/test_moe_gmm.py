"""The `gmm` MoE strategy: the Pallas Triton grouped matmul, exact against `dense` (Pallas' interpreter on this
CPU), with int8 weights and under `jax.grad`; and, with the gpu-plan extra, compiled for an H100 (no GPU):
one Triton kernel per grouped matmul launching at most 1.25x the routed rows, where XLA:GPU turns
`ragged_dot` into a dense dot over every expert."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mixtral_jax.kernels import grouped_matmul
from mixtral_jax.model import moe, quant
from mixtral_jax.model.moe import Routing, route, run_experts
from mixtral_jax.planning.planner import GPU_COMPILER_OPTIONS, gmm_cost, hlo_cost
from mixtral_jax.planning.topologies import get_topology, gpu_plugin_available


def _weights(e=8, d=32, f=48, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(k[0], (d, e)), 0.1 * jax.random.normal(k[1], (e, d, f)),
            0.1 * jax.random.normal(k[2], (e, d, f)), 0.1 * jax.random.normal(k[3], (e, f, d)))


@pytest.mark.parametrize("tokens,top_k,e", [(1, 2, 8), (3, 2, 8), (64, 2, 8), (50, 1, 4), (33, 3, 6), (7, 1, 1)])
def test_gmm_equals_dense(tokens, top_k, e):
    router, w1, w3, w2 = _weights(e=e)
    x = jax.random.normal(jax.random.key(tokens), (tokens, router.shape[0]))
    routing = route(x, router, top_k)
    expect = moe.moe_dense(x, routing, w1, w3, w2)
    got = run_experts(x, routing, w1, w3, w2, "gmm")
    np.testing.assert_allclose(np.asarray(got), np.asarray(expect), atol=1e-5, rtol=0)


def test_gmm_every_token_to_the_same_experts():
    router, w1, w3, w2 = _weights()
    x = jax.random.normal(jax.random.key(1), (64, router.shape[0]))
    experts = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), (64, 2))
    routing = Routing(x @ router, jax.nn.softmax(jax.random.normal(jax.random.key(7), (64, 2)), -1), experts)
    expect = moe.moe_dense(x, routing, w1, w3, w2)
    got = jax.jit(lambda x: run_experts(x, routing, w1, w3, w2, "gmm"))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expect), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sizes", [(10, 0, 25, 5), (0, 0, 40, 0), (1, 1, 1, 37)])
def test_grouped_matmul_equals_ragged_dot_with_empty_groups(sizes):
    k1, k2 = jax.random.split(jax.random.key(sum(sizes)))
    x = jax.random.normal(k1, (40, 64))
    w = jax.random.normal(k2, (4, 64, 128))
    gs = jnp.asarray(sizes, jnp.int32)
    np.testing.assert_allclose(np.asarray(grouped_matmul.grouped_matmul(x, w, gs)),
                               np.asarray(jax.lax.ragged_dot(x, w, gs)), atol=1e-4, rtol=1e-6)


def test_gmm_with_int8_experts_equals_ragged_with_int8_experts():
    router, w1, w3, w2 = _weights()
    q = [quant.QArray(*quant.quantize_jax(w, (1,))) for w in (w1, w3, w2)]
    x = jax.random.normal(jax.random.key(5), (24, router.shape[0]))
    routing = route(x, router, 2)
    expect = moe.moe_ragged(x, routing, *q)
    got = moe.moe_gmm(x, routing, *q)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expect), atol=1e-5, rtol=0)
    # and int8 stays int8 into the kernel: no float copy of the experts in the traced program
    jaxpr = str(jax.make_jaxpr(lambda x: moe.moe_gmm(x, routing, *q))(x))
    assert "pallas_call" in jaxpr and "i8[8,32,48]" in jaxpr


def test_gmm_gradients_equal_dense():
    router, w1, w3, w2 = _weights()
    x = jax.random.normal(jax.random.key(2), (20, router.shape[0]))
    routing = route(x, router, 2)

    def loss(fn):
        return lambda x, w1, w3, w2: jnp.sum(jnp.sin(fn(x, routing, w1, w3, w2)))

    got = jax.jit(jax.grad(loss(moe.moe_gmm), argnums=(0, 1, 2, 3)))(x, w1, w3, w2)
    expect = jax.grad(loss(moe.moe_dense), argnums=(0, 1, 2, 3))(x, w1, w3, w2)
    for g, e in zip(got, expect):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=2e-5, rtol=0)


def test_blocks_launch_at_most_a_quarter_more_rows_for_a_prefill():
    for m, groups in [(1024, 8), (4096, 8), (512, 2), (2048, 1)]:
        bm = grouped_matmul._gmm_blocks(m, groups)
        launched = (-(-m // bm) + groups) * bm
        assert launched <= 1.25 * m + bm, (m, groups, bm, launched)
    assert grouped_matmul._gmm_blocks(32, 8) == 16  # a decode step: Triton's smallest tile


def test_auto_picks_gmm_on_gpu_only():
    assert moe.resolve_strategy("auto", "gpu") == "gmm"
    assert moe.resolve_strategy("auto", "cpu") == "grouped" and moe.resolve_strategy("auto", "tpu") == "ragged"


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_plugin_available(), reason=(
    "needs the gpu-plan extra: pip install jax-cuda12-plugin==<jax version> nvidia-cuda-nvcc-cu12"))
def test_gmm_compiles_for_h100_and_is_sparse_where_ragged_dot_is_dense():
    """Mixtral-8x7B's up projection for a 512-token prefill chunk (1024 token copies over 8 experts)."""
    mesh = jax.sharding.Mesh(np.asarray(get_topology("h100-1").devices()), ("x",))

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))

    m, k, n, g = 1024, 4096, 14336, 8
    args = (spec((m, k), jnp.bfloat16), spec((g, k, n), jnp.bfloat16), spec((g,), jnp.int32))
    active = 2 * m * k * n
    kernel = jax.jit(grouped_matmul.grouped_matmul).lower(*args).compile(compiler_options=GPU_COMPILER_OPTIONS)
    text = kernel.as_text()
    assert 'custom_call_target="__gpu$xla.gpu.triton"' in text
    cost = gmm_cost(text)
    assert cost["calls"] == 1 and cost["active_flops"] == active and cost["flops"] <= 1.25 * active
    assert hlo_cost(kernel)["flops"] < 1e-3 * active  # XLA's own count does not see into the kernel
    dense = jax.jit(jax.lax.ragged_dot).lower(*args).compile(compiler_options=GPU_COMPILER_OPTIONS)
    assert hlo_cost(dense)["flops"] >= 0.9 * g * active  # XLA:GPU's ragged_dot: every expert on every row
    # int8 experts compile too (the quantized variant of the same kernel)
    q = jax.jit(lambda x, w, gs: grouped_matmul.grouped_matmul(x, w, gs, out_dtype=jnp.float32)).lower(
        args[0], spec((g, k, n), jnp.int8), args[2]).compile(compiler_options=GPU_COMPILER_OPTIONS)
    assert gmm_cost(q.as_text())["calls"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_plugin_available(), reason=(
    "needs the gpu-plan extra: pip install jax-cuda12-plugin==<jax version> nvidia-cuda-nvcc-cu12"))
def test_gmm_backward_compiles_for_h100():
    """Training through `gmm`: the input gradient is the same kernel on the transposed weights."""
    mesh = jax.sharding.Mesh(np.asarray(get_topology("h100-1").devices()), ("x",))

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))

    router, w1, w3, w2 = (spec(s, jnp.bfloat16) for s in [(256, 8), (8, 256, 512), (8, 256, 512), (8, 512, 256)])
    x = spec((128, 256), jnp.bfloat16)

    def loss(x, router, w1, w3, w2):
        return jnp.sum(moe.moe_gmm(x, route(x, router, 2), w1, w3, w2).astype(jnp.float32) ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4))).lower(x, router, w1, w3, w2).compile(
        compiler_options=GPU_COMPILER_OPTIONS)
    assert gmm_cost(compiled.as_text())["calls"] == 6  # three forward, three for the input gradients
