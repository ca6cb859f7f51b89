"""int8 weight quantization: error bounds, quality against transformers' fp32 model, every MoE strategy,
sharded == unsharded, the converter and the loaders agreeing bit for bit, and clear errors."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import mixtral_jax
from mixtral_jax import MixtralConfig
from mixtral_jax.cli.main import main as command_main
from mixtral_jax.cli.model_flags import model_config
from mixtral_jax.config import ConfigError, RuntimeConfig
from mixtral_jax.convert import convert, orbax_io
from mixtral_jax.convert.verify import VerificationError, verify
from mixtral_jax.inference.engine import Engine, EngineConfig, SamplingParams
from mixtral_jax.inference.sampler import Sampler
from mixtral_jax.loading.checkpoint import load, load_hf
from mixtral_jax.model.params import assemble_model, model_arrays, param_specs
from mixtral_jax.model.placement import quantize_model, shard_model
from mixtral_jax.model.quant import QArray, dequantize, qeinsum, quantize, quantize_jax
from mixtral_jax.planning import planner as plan_lib
from tests.helpers.hf_reference import hf_logits, save_hf

CONFIG = MixtralConfig.tiny()
# random tiny configs: MHA / GQA / MQA, top-1..3, 4-8 experts, a sliding window
QUALITY_CONFIGS = [
    MixtralConfig.tiny(),
    MixtralConfig.tiny(n_heads=4, n_kv_heads=4, n_experts=4, top_k=1, rope_theta=10000.0),
    MixtralConfig.tiny(n_heads=8, n_kv_heads=1, head_dim=8, n_experts=6, top_k=3, sliding_window=7),
    MixtralConfig.tiny(dim=256, hidden_dim=512, n_heads=8, n_kv_heads=2, head_dim=32, vocab_size=512),
]


# ------------------------------------------------------------------------------------ the numbers
@pytest.mark.parametrize("contract", [(0,), (1,), (0, 1)])
def test_quantize_dequantize_error_is_at_most_half_a_step_per_channel(contract):
    w = np.random.default_rng(0).standard_normal((6, 40, 24)).astype(np.float32) * np.float32(0.05)
    w[..., 3] = 0.0 if contract != (0, 1) else w[..., 3]  # an all-zero channel where the last axis is kept
    q, scale = quantize(w, contract)
    assert q.dtype == np.int8 and scale.dtype == np.float32
    assert scale.shape == tuple(n for i, n in enumerate(w.shape) if i not in contract)
    assert q.min() >= -127 and q.max() <= 127
    err = np.abs(dequantize(q, scale, contract) - w)
    step = np.expand_dims(scale, contract)
    assert np.all(err <= step / 2 * (1 + 1e-6))
    assert np.abs(q).max(axis=contract).min() in (0, 127)  # each channel's largest value maps to +-127
    np.testing.assert_allclose(np.abs(q).max(axis=contract)[np.abs(w).max(axis=contract) > 0], 127)
    # relative to a channel's range the error is at most 1/254
    assert np.all(err <= np.abs(w).max(axis=contract, keepdims=True) / 254 * (1 + 1e-6))


def test_jax_and_numpy_quantizers_agree_bit_for_bit():
    w = np.random.default_rng(1).standard_normal((4, 32, 16)).astype(np.float32)
    q, s = quantize(w, (1,))
    qj, sj = quantize_jax(jnp.asarray(w), (1,))
    np.testing.assert_array_equal(np.asarray(qj), q)
    np.testing.assert_array_equal(np.asarray(sj), s)


def test_qeinsum_applies_the_scale_after_the_dot():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 32)).astype(np.float32)
    w = rng.standard_normal((32, 4, 8)).astype(np.float32)
    q, s = quantize(w, (0,))
    out = qeinsum("btd,dhx->bthx", jnp.asarray(x), QArray(jnp.asarray(q), jnp.asarray(s)))
    np.testing.assert_allclose(np.asarray(out), np.einsum("btd,dhx->bthx", x, dequantize(q, s, (0,))),
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------- quality against transformers' fp32
@functools.cache
def _hf_source(i: int, tmp_root: str):
    """transformers' own random initialisation (normal, std 0.02). (`hf_model`'s wider weights, made to
    stress exactness, are chaotic: there even bf16 moves the mean KL by up to 1e-2.)"""
    config = QUALITY_CONFIGS[i]
    torch.manual_seed(i)
    hf_config = transformers.MixtralConfig(**config.to_hf())
    hf_config._attn_implementation = "eager"
    model = transformers.MixtralForCausalLM(hf_config).eval()
    return config, model, save_hf(model, f"{tmp_root}/hf{i}")


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("quant_hf"))


def _kl_top1(ref_logits, logits):
    p = jax.nn.log_softmax(jnp.asarray(ref_logits, jnp.float32), -1)
    q = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)
    kl = jnp.sum(jnp.exp(p) * (p - q), -1)
    top1 = jnp.argmax(p, -1) == jnp.argmax(q, -1)
    return float(kl.mean()), float(top1.mean())


@pytest.mark.parametrize("i,lm_head", [(0, False), (1, False), (2, False), (3, False), (0, True), (3, True)])
def test_int8_model_stays_close_to_transformers_fp32(i, lm_head, hf_root):
    config, hf, path = _hf_source(i, hf_root)
    tokens = np.random.default_rng(i).integers(0, config.vocab_size, (4, 40))
    ref = hf_logits(hf, tokens)
    model = load_hf(path, quantize="int8", show_progress=False)
    if lm_head:
        model = quantize_model(load_hf(path, show_progress=False), lm_head=True)
    assert model.layers[0].moe.w1[...].dtype == jnp.int8 and model.layers[0].attn.wo[...].dtype == jnp.int8
    assert (model.lm_head[...].dtype == jnp.int8) == lm_head
    kl, top1 = _kl_top1(ref, model(tokens))
    assert kl <= 1e-3 and top1 >= 0.95, (kl, top1)
    exact_kl, _ = _kl_top1(ref, load_hf(path, show_progress=False)(tokens))
    assert kl > exact_kl  # the bound measures quantization, not a model that ignores it


# ------------------------------------------------------------------------------ every MoE strategy
@pytest.fixture(scope="module")
def qmodel():
    return quantize_model(mixtral_jax.Mixtral(CONFIG, rngs=nnx.Rngs(0)))


def _with_strategy(model, strategy):
    runtime = dataclasses.replace(model.runtime, moe_strategy=strategy)
    arrays = model_arrays(model)
    return assemble_model(model.config, runtime, lambda name, spec: arrays[name])


@pytest.mark.parametrize("strategy", ["ragged", "capacity", "gather", "grouped"])
def test_every_moe_strategy_takes_int8_experts_and_equals_dense(qmodel, strategy):
    tokens = np.random.default_rng(3).integers(0, CONFIG.vocab_size, (3, 17))
    ref = _with_strategy(qmodel, "dense")(tokens)
    out = _with_strategy(qmodel, strategy)(tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_decode_reads_int8_expert_views_in_place_and_generates_as_the_full_forward(qmodel, xla_only):
    model = _with_strategy(qmodel, "grouped")
    views = model.expert_views()
    assert views is not None
    w1 = model.layers[0].moe.w1[...]
    assert isinstance(views[0][0][1], QArray) and views[0][0][1].q.dtype == jnp.int8
    assert views[0][0][1].q.unsafe_buffer_pointer() == w1.unsafe_buffer_pointer() + w1[0].nbytes  # no copy
    prompt = [5, 9, 2, 7]
    (out,) = Sampler(model)([prompt], 6, stop_tokens=[])
    tokens = list(prompt)
    for _ in range(6):  # greedy from the full causal forward pass, no cache
        tokens.append(int(jnp.argmax(model(np.asarray([tokens]))[0, -1])))
    assert out == tokens[-6:]


# --------------------------------------------------------------------------------------- sharded
@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8-device CPU mesh from conftest.py")
@pytest.mark.parametrize("spec", ["expert=8", "expert=4,tensor=2", "data=2,expert=2,tensor=2"])
@pytest.mark.parametrize("shape", [(4, 16), (1, 3)], ids=["all_to_all", "replicated_tokens"])
@pytest.mark.slow
def test_sharded_int8_model_equals_unsharded(qmodel, spec, shape):
    tokens = np.random.default_rng(4).integers(0, CONFIG.vocab_size, shape)
    ref = qmodel(tokens)
    sharded = shard_model(qmodel, spec)
    out = sharded(tokens)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)
    scale = sharded.layers[0].moe.w1_scale[...]  # (e, f): split over expert and tensor as w1 is
    mesh = sharded.runtime.mesh
    expert, tensor = mesh.shape.get("expert", 1), mesh.shape.get("tensor", 1)
    assert {s.data.shape for s in scale.addressable_shards} == {(CONFIG.n_experts // expert,
                                                                  CONFIG.hidden_dim // tensor)}
    wo_scale = sharded.layers[0].attn.wo_scale[...]  # (d,): output channels of wo, replicated
    assert {s.data.shape for s in wo_scale.addressable_shards} == {(CONFIG.dim,)}


# -------------------------------------------------------------------------- checkpoints and loading
@pytest.fixture(scope="module")
def converted(hf_root, tmp_path_factory):
    _, hf, src = _hf_source(0, hf_root)
    root = tmp_path_factory.mktemp("quant_ckpt")
    convert(src, str(root / "int8"), show_progress=False, quantize="int8")
    convert(src, str(root / "float"), show_progress=False)
    return src, str(root / "int8"), str(root / "float")


def test_converted_int8_checkpoint_loads_to_the_logits_of_quantizing_while_loading(converted):
    src, int8_dst, float_dst = converted
    tokens = np.random.default_rng(5).integers(0, CONFIG.vocab_size, (2, 13))
    info = orbax_io.read_info(int8_dst)
    assert info.quantize == "int8" and info.dtype == np.float32
    assert info.params["layers.0.moe.w2"][1] == np.int8 and info.params["layers.0.moe.w2_scale"][1] == np.float32
    from_ckpt = load(int8_dst)
    assert from_ckpt.runtime.quantize == "int8"
    expected = np.asarray(load_hf(src, quantize="int8", show_progress=False)(tokens))
    np.testing.assert_array_equal(np.asarray(from_ckpt(tokens)), expected)
    np.testing.assert_array_equal(np.asarray(load(float_dst, quantize="int8")(tokens)), expected)
    a, b = model_arrays(from_ckpt), model_arrays(load(float_dst, quantize="int8"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)
    verify(src, int8_dst, show_progress=False)


def test_verify_catches_a_tampered_int8_scale(converted, tmp_path):
    src, int8_dst, _ = converted
    dst = shutil.copytree(int8_dst, tmp_path / "copy")
    stored = orbax_io.stored_tree(dst)
    arrays = orbax_io.restore(dst, stored)
    arrays["layers.1.attn.wq_scale"] = np.asarray(arrays["layers.1.attn.wq_scale"]) * np.float32(1.01)
    info = orbax_io.read_info(dst)
    specs = param_specs(info.config, RuntimeConfig(quantize="int8"))
    tampered = tmp_path / "tampered"
    orbax_io.write_checkpoint(tampered, info.metadata, [
        orbax_io.PendingTensor(n, specs[n].logical_axes, np.asarray(arrays[n]).nbytes,
                               lambda n=n: np.asarray(arrays[n])) for n in specs])
    with pytest.raises(VerificationError, match="layers.1.attn.wq_scale"):
        verify(src, tampered, show_progress=False)


# ----------------------------------------------------------------------------------- bad input
def test_bad_quantize_values_are_one_line_errors(converted, capsys, tmp_path):
    src, _, float_dst = converted
    with pytest.raises(ConfigError, match="unknown quantize 'int4'; choose from int8") as e:
        RuntimeConfig(quantize="int4")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown quantize"):
        load_hf(src, quantize="int4", show_progress=False)
    with pytest.raises(ConfigError, match="unknown quantize"):
        load(float_dst, quantize="fp8")
    with pytest.raises(ConfigError, match="unknown quantize"):
        convert(src, str(tmp_path / "x"), quantize="int4", show_progress=False)
    assert not (tmp_path / "x").exists()
    for argv in (["convert", src, str(tmp_path / "y"), "--quantize", "int4"],
                 ["generate", "hi", "--quantize", "int4"], ["plan", "--quantize", "q8"]):
        with pytest.raises(SystemExit) as exit_:
            command_main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "invalid choice" in err[-1] and "int8" in err[-1], err
    assert not (tmp_path / "y").exists()
    with open(f"{float_dst}/mixtral_jax.json") as f:
        assert "quantize" not in json.load(f)


# ------------------------------------------------------------------------------------ TPU plans
@pytest.mark.tpu
def test_plan_compiles_int8_weights_for_a_tpu_slice_at_about_half_the_bytes():
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    config = model_config("tiny")
    (report,) = plan_lib.plan(config, "v5e-4", "expert=2,tensor=2", [plan_lib.decode(8, 256)], quantize="int8")
    # by hand: int8 attention and experts (+ f32 scales), bf16 router, norms, embedding and LM head
    d, h, k, x, ff, e, v = (config.dim, config.n_heads, config.n_kv_heads, config.head_dim, config.hidden_dim,
                            config.n_experts, config.vocab_size)
    attention = (2 * d * h * x + 2 * d * k * x) // 2 + 4 * (h * x // 2 + 2 * k * x // 2 + d)
    experts = 3 * e * d * ff // 4 + 4 * (2 * e * ff // 4 + e * d // 2)
    layer = attention + experts + 2 * (2 * d + d * e)
    assert report.weight_bytes == config.n_layers * layer + 2 * (2 * v * d // 2 + d)
    assert report.fits and not report.xla_error
    with pytest.raises(plan_lib.PlanError, match="training updates float weights"):
        plan_lib.plan(config, "v5e-4", "expert=2,tensor=2", [plan_lib.train(8, 128)], quantize="int8")


# ---------------------------------------------------------------------------------------- serving
def test_engine_serves_an_int8_model_as_generate_does(qmodel):
    """The server's continuous-batching engine on int8 weights: concurrent greedy answers equal each
    request generated alone."""
    ids = [np.random.default_rng(s).integers(3, 120, n).tolist() for s, n in ((0, 5), (1, 19), (2, 9))]
    solo = [mixtral_jax.generate(qmodel, [p], max_new_tokens=12, stop_tokens=[])[0] for p in ids]
    engine = Engine(qmodel, EngineConfig(max_batch=2, max_context=64, prefill_chunk=16))
    outs = [[] for _ in ids]
    for p, out in zip(ids, outs, strict=True):
        engine.submit(p, SamplingParams(max_tokens=12, stop_tokens=()), on_token=out.append)
    for _ in range(500):
        if engine.idle:
            break
        engine.step()
    assert engine.idle and outs == solo
