"""`mixtral-jax plan` for NVIDIA GPU hosts: a tiny Mixtral compiled ahead of time for 8 H100s and for two hosts
of 8 (the CUDA PJRT plugin's topology description from XLA's GPU target configs, no GPU), as for TPU slices in
test_plan.py. XLA:GPU's buffer assignment must show the parameters and the KV cache split as the rules say
(no TPU tile padding here, so nearly to the byte), the cache donated, the collectives of expert parallelism,
and a cost analysis that counts a known matmul exactly.

The compiling tests are the `gpu` group and skip without the `gpu-plan` extra (jax-cuda12-plugin at this jax
version, nvidia-cuda-nvcc-cu12 for ptxas); the topology table and the hints are checked without it."""

from __future__ import annotations

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mixtral_jax.cli import plan as plan_cli
from mixtral_jax.cli.main import main
from mixtral_jax.cli.plan import suggestion
from mixtral_jax.planning import planner as plan_lib
from mixtral_jax.planning.topologies import (
    GIB,
    GPU_TOPOLOGIES,
    TopologyError,
    cudnn_available,
    get_topology,
    gpu_plugin_available,
)
from tests.planning.test_plan import CONFIG, cache_by_hand, weights_by_hand

needs_plugin = pytest.mark.skipif(not gpu_plugin_available(), reason=(
    "needs the gpu-plan extra: pip install jax-cuda12-plugin==<jax version> nvidia-cuda-nvcc-cu12 "
    "(the CUDA PJRT plugin compiles for GPU hosts without a GPU)"))
SLACK = 4 * 1024  # the small inputs: tokens, flags, key, positions


# ------------------------------------------------------------------ without the plugin
def test_gpu_hosts_are_described_by_xla_target_configs():
    h100, h200, two_hosts = get_topology("h100-8"), get_topology("H200-1"), get_topology("h100-16")
    assert h100.backend == "gpu" and h100.chips == 8 and h100.hosts == 1 and h100.topology_string == "1x1x8"
    assert two_hosts.hosts == 2 and two_hosts.topology_string == "1x2x8"
    assert h200.topology_string == "1x1x1" and h200.chips == 1
    # the spec files' device memory and bandwidth (what the driver reports)
    assert h100.chip.hbm_bytes == 84942979072 and h100.chip.hbm_bandwidth == 3.35232e12
    assert h200.chip.hbm_bytes == 151397597184 and h200.chip.name == "NVIDIA H200 141GB HBM3e"
    assert get_topology("a100-8").chip.hbm_bytes == 85100068864
    assert {"h100-1", "h100-8", "h100-16", "h200-1", "h200-8", "a100-8"} <= set(GPU_TOPOLOGIES)
    assert get_topology("v5e-8").backend == "tpu"


def test_unknown_gpu_host_is_a_one_line_error(capsys):
    with pytest.raises(TopologyError, match=r"unknown GPU topology 'h100-3'; .*GPU hosts h100-1, h100-8"):
        get_topology("h100-3")
    assert main(["plan", "--topology", "h300-8", "--mesh", "expert=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown GPU topology 'h300-8'" in err and "h200-8" in err


def test_weights_beyond_one_gpu_suggest_int8():
    def report(quantize=None, kind="decode"):
        w = plan_lib.decode(16, 8192) if kind == "decode" else plan_lib.train(8, 4096)
        return types.SimpleNamespace(workload=w, mesh="data=1", chips=1, total_bytes=110 * GIB,
                                     weight_bytes=87 * GIB, hbm_bytes=79 * GIB, quantize=quantize)

    assert "--quantize int8" in suggestion(report())
    assert "--quantize int8" not in suggestion(report("int8"))
    assert "--quantize" not in suggestion(report(kind="train")) and "FSDP" in suggestion(report(kind="train"))


# ------------------------------------------------------------------ compiled for GPU hosts
MESHES = {"expert=4,tensor=2": dict(expert=4, tensor=2), "data=2,expert=4": dict(data=2, expert=4)}


@pytest.fixture(scope="module", params=list(MESHES))
def reports(request):
    return request.param, plan_lib.plan(CONFIG, "h100-8", request.param,
                                        [plan_lib.prefill(2, 64), plan_lib.decode(8, 128)])


@pytest.mark.gpu
@needs_plugin
def test_weights_and_cache_per_gpu_are_what_the_rules_imply(reports):
    mesh, (pre, dec) = reports
    sizes = MESHES[mesh]
    weights = weights_by_hand(CONFIG, **sizes)
    cache = cache_by_hand(CONFIG, 8, 128, **sizes)
    assert pre.weight_bytes == dec.weight_bytes == weights
    assert weights <= pre.argument_bytes <= weights + SLACK, (pre.argument_bytes, weights)
    assert weights + cache <= dec.argument_bytes <= weights + cache + SLACK, (dec.argument_bytes, weights + cache)
    assert dec.alias_bytes >= cache  # the donated cache is the returned cache
    assert pre.fits and dec.fits and pre.hbm_bytes == get_topology("h100-8").chip.hbm_bytes
    assert pre.moe_strategy == dec.moe_strategy == plan_lib.resolve_strategy("auto", backend="gpu")


@pytest.mark.gpu
@needs_plugin
def test_collectives_and_cost_of_expert_parallelism_on_gpu(reports):
    mesh, (pre, dec) = reports
    for r in (pre, dec):
        assert r.collectives["all-to-all"]["count"] > 0 and r.collectives["all-to-all"]["bytes"] > 0
        assert r.flops > 0 and r.bytes_accessed > 0 and r.est_step_s > 0
    # a prefill of 2 x 64 tokens does at least the attention projections' matmuls on each GPU
    d, heads = CONFIG.dim, CONFIG.n_heads * CONFIG.head_dim
    tensor = MESHES[mesh].get("tensor", 1)
    assert pre.flops >= CONFIG.n_layers * 2 * (2 * 64) * d * 2 * heads / tensor / 8


@pytest.mark.gpu
@needs_plugin
def test_cost_analysis_counts_a_known_matmul_and_all_reduce():
    devices = get_topology("h100-8").devices()
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(8), ("tensor",))
    x = jax.ShapeDtypeStruct((128, 1024), jnp.float32, sharding=NamedSharding(mesh, P(None, "tensor")))
    w = jax.ShapeDtypeStruct((1024, 256), jnp.float32, sharding=NamedSharding(mesh, P("tensor", None)))
    out = NamedSharding(mesh, P())
    compiled = jax.jit(lambda x, w: x @ w, out_shardings=out).lower(x, w).compile()
    assert compiled.cost_analysis() is None  # XLA:GPU's own answer, hence planner.hlo_cost
    cost = plan_lib.hlo_cost(compiled)
    assert cost["flops"] >= 2 * 128 * (1024 // 8) * 256  # each GPU's partial product (+ the sum's adds)
    assert cost["flops"] <= 2 * 128 * (1024 // 8) * 256 + 8 * 128 * 256
    found = plan_lib.collectives(compiled.as_text())
    assert found["all-reduce"] == {"count": 1, "bytes": 128 * 256 * 4}
    mem = compiled.memory_analysis()
    assert mem.argument_size_in_bytes == (128 * 1024 + 1024 * 256) * 4 // 8


@pytest.mark.gpu
@needs_plugin
def test_two_hosts_compile_as_one_program_and_train_donates_its_state():
    topology = get_topology("h100-16")
    assert {d.process_index for d in topology.devices()} == {0, 1}
    dec, step = plan_lib.plan(CONFIG, topology, "data=2,expert=8", [plan_lib.decode(16, 128), plan_lib.train(16, 64)])
    sizes = dict(data=2, expert=8)
    weights = weights_by_hand(CONFIG, **sizes)
    cache = cache_by_hand(CONFIG, 16, 128, **sizes)
    assert dec.chips == 16 and weights + cache <= dec.argument_bytes <= weights + cache + SLACK
    assert dec.collectives["all-to-all"]["count"] > 0
    # parameters + AdamW's two moments, donated and updated in place
    assert 3 * weights <= step.argument_bytes <= 3 * weights + SLACK and step.alias_bytes >= 3 * weights
    assert step.fits and step.flops > 0


@pytest.mark.gpu
@needs_plugin
def test_cli_plans_for_one_gpu(capsys):
    args = ["plan", "--topology", "h200-1", "--mesh", "data=1", "--model", "tiny", "--decode-batch", "4",
            "--context", "128"]
    assert main([*args, "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["topology"] == "h200-1" and report["fits"] and report["hbm_bytes"] == 151397597184
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "1 x NVIDIA H200 141GB HBM3e" in text and "per GPU (GiB)" in text
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in text


@pytest.mark.gpu
@needs_plugin
def test_plan_counts_the_moe_kernels_within_a_quarter_of_the_active_experts():
    """A 512-token prefill chunk on one GPU: `gmm`'s three grouped matmuls per layer launch 1.25x the routed
    rows (1024 token copies), and their FLOPs are in the report's total, which XLA's cost analysis misses."""
    config = dataclasses.replace(CONFIG, max_seq_len=1024)
    (r,) = plan_lib.plan(config, "h200-1", "data=1", [plan_lib.prefill(1, 512)])
    active = config.n_layers * 3 * 2 * (512 * config.top_k) * config.dim * config.hidden_dim
    assert r.moe_strategy == "gmm" and r.moe_active_flops == active
    assert active < r.moe_kernel_flops <= 1.25 * active and r.flops > r.moe_kernel_flops


needs_cudnn = pytest.mark.skipif(not cudnn_available(), reason=(
    "needs cuDNN for the CUDA plugin: pip install nvidia-cudnn-cu12 (in the gpu-plan extra)"))


@pytest.mark.gpu
@needs_plugin
@needs_cudnn
@pytest.mark.parametrize("window", [None, 48])
def test_cudnn_attention_cost_counts_the_pairs_the_mask_keeps(window):
    """cuDNN's fused attention is a custom call XLA cannot count: the planner counts it from its shapes. The
    count is checked against the mask built here (forward: QK^T and PV; backward: five such matmuls)."""
    b, t, h, kv, d = 2, 256, 4, 2, 64
    mesh = jax.sharding.Mesh(np.asarray(get_topology("h100-1").devices()), ("x",))
    spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=NamedSharding(mesh, P()))  # noqa: E731

    def attend(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn",
                                            local_window_size=None if window is None else (window - 1, 0))

    forward = jax.jit(attend).lower(spec(b, t, h, d), spec(b, t, kv, d), spec(b, t, kv, d)).compile()
    both = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))).lower(
        spec(b, t, h, d), spec(b, t, kv, d), spec(b, t, kv, d)).compile()
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    kept = int(((j <= i) & ((i - j < window) if window else True)).sum())
    pair_flops = 2 * b * h * kept * d  # one (t, t) matmul over the kept pairs
    assert plan_lib.attention_kernel(forward.as_text()) == "cudnn"
    assert plan_lib.cudnn_attention_cost(forward.as_text()) == {"flops": 2 * pair_flops, "calls": 1}
    assert plan_lib.cudnn_attention_cost(both.as_text()) == {"flops": 7 * pair_flops, "calls": 2}


@pytest.mark.gpu
@needs_plugin
@needs_cudnn
def test_training_at_32k_compiles_to_cudnn_flash_attention(capsys):
    """A 32k-token training step on one H100: every layer's attention is cuDNN's fused kernel forward and
    backward, counted in the FLOPs, and no (t, t) score matrix is held (4 heads of 32k x 32k bf16 is 8 GiB)."""
    t = 32768
    config = dataclasses.replace(CONFIG, max_seq_len=t)
    (r,) = plan_lib.plan(config, "h100-1", "data=1", [plan_lib.train(1, t)])
    pairs = t * (t + 1) // 2
    assert r.attention_kernel == "cudnn" and r.fits
    assert r.attention_kernel_flops == config.n_layers * 7 * 2 * config.n_heads * pairs * config.head_dim
    assert r.flops > r.attention_kernel_flops
    assert r.temp_bytes < config.n_heads * t * t * 2 / 4
    text = plan_cli.format_reports(config, get_topology("h100-1"), [r])
    assert f"cuDNN fused flash attention ({r.attention_kernel_flops / 1e12:.2f} TFLOP per GPU)" in text


@pytest.mark.gpu
@needs_plugin
def test_the_serving_step_on_h100_attends_with_the_pallas_gpu_kernel():
    """`plan --serve` for an H100 host: the engine's step compiles with our Triton paged attention (not the
    XLA loop), and its pages fill what the GPUs leave."""
    from mixtral_jax import MixtralConfig
    from mixtral_jax.planning import serve_plan

    cfg = MixtralConfig.tiny(dim=256, head_dim=128, hidden_dim=512, vocab_size=512)
    r = serve_plan.plan_serve(cfg, "h100-8", "data=2,expert=2,tensor=2", max_batch=8, max_context=128, prefill_chunk=32,
                              page_size=16)
    assert r.attention == "Pallas GPU paged attention kernel", r.attention
    assert r.holds_batch and r.sequences >= 8
