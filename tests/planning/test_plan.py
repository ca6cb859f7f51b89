"""`mixtral-jax plan`: a tiny Mixtral compiled ahead of time for a 4-chip TPU v5e slice (libtpu from jax[tpu],
no TPU), on two meshes. XLA's own memory analysis must show the parameters and the KV cache split as the
rules say (checked against sizes worked out by hand here), the cache updated in place, the collectives of
expert parallelism, an over-sized workload reported as not fitting, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mixtral_jax import MixtralConfig
from mixtral_jax.cli.main import main
from mixtral_jax.planning import planner as plan_lib
from mixtral_jax.planning.topologies import GIB, TopologyError, get_topology

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # test processes may load libtpu side by side

# TPU-friendly widths (multiples of 128), so XLA's tiled layouts add no padding to the parameters
pytestmark = pytest.mark.tpu
# TPU-sized heads and a small vocabulary, so that a training step's temporaries are the layers' (not the logits')
CONFIG = MixtralConfig.tiny(dim=256, head_dim=128, hidden_dim=512, vocab_size=512)
SLACK = 64 * 1024  # the small inputs (tokens, flags, key) padded to TPU tiles


def weights_by_hand(cfg: MixtralConfig, data=1, expert=1, tensor=1, fsdp=False) -> int:
    """bf16 bytes of one chip's parameters: heads, FFN width and vocabulary over tensor, experts over
    expert; with FSDP every model dimension also over data (norms stay whole)."""
    f = data if fsdp else 1
    d, h, k, x, ff, e, v = (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.hidden_dim, cfg.n_experts,
                            cfg.vocab_size)
    attention = (2 * d * h * x + 2 * d * k * x) // tensor // f
    layer = attention + 2 * d + d * e // f + 3 * e * d * ff // (expert * tensor) // f
    return 2 * (cfg.n_layers * layer + 2 * v * d // tensor // f + d)


def cache_by_hand(cfg: MixtralConfig, batch, context, data=1, expert=1, tensor=1) -> int:
    """bf16 k and v of every layer on one chip: sequences over data x expert, KV heads over tensor."""
    return 2 * cfg.n_layers * 2 * (batch // (data * expert)) * (cfg.n_kv_heads // tensor) * context * cfg.head_dim


MESHES = {"expert=2,tensor=2": dict(expert=2, tensor=2), "data=2,expert=2": dict(data=2, expert=2)}


@pytest.fixture(scope="module", params=list(MESHES))
def reports(request):
    return request.param, plan_lib.plan(CONFIG, "v5e-4", request.param,
                                        [plan_lib.prefill(2, 64), plan_lib.decode(4, 128)])


def test_weights_per_chip_are_what_the_rules_imply(reports):
    mesh, (pre, dec) = reports
    expected = weights_by_hand(CONFIG, **MESHES[mesh])
    assert pre.weight_bytes == dec.weight_bytes == expected
    # XLA's own count of the compiled prefill's arguments: the parameter shards plus the small inputs
    assert expected <= pre.argument_bytes <= expected + SLACK, (pre.argument_bytes, expected)
    assert pre.chips == 4 and pre.hbm_bytes == get_topology("v5e-4").chip.hbm_bytes and pre.fits and dec.fits


def test_kv_cache_is_split_by_the_rules_and_updated_in_place(reports):
    mesh, (_, dec) = reports
    sizes = MESHES[mesh]
    cache = cache_by_hand(CONFIG, 4, 128, **sizes)
    weights = weights_by_hand(CONFIG, **sizes)
    assert weights + cache <= dec.argument_bytes <= weights + cache + SLACK
    assert dec.alias_bytes >= cache  # the donated cache is the returned cache: no second copy
    assert dec.total_bytes == dec.argument_bytes + dec.temp_bytes + dec.output_bytes - dec.alias_bytes


def test_collectives_of_expert_parallelism_are_reported(reports):
    mesh, (pre, dec) = reports
    for r in (pre, dec):
        assert r.collectives["all-to-all"]["count"] > 0 and r.collectives["all-to-all"]["bytes"] > 0
        assert r.flops > 0 and r.bytes_accessed > 0 and r.est_step_s > 0 and r.compile_s > 0
    if "tensor" in mesh:  # the split FFN width and heads are summed over tensor
        assert pre.collectives["all-reduce"]["count"] > 0


def test_collective_bytes_match_a_known_all_reduce():
    devices = get_topology("v5e-4").devices()
    mesh = jax.sharding.Mesh(np.asarray(devices).reshape(4), ("tensor",))
    x = jax.ShapeDtypeStruct((128, 512), jnp.float32, sharding=NamedSharding(mesh, P(None, "tensor")))
    w = jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=NamedSharding(mesh, P("tensor", None)))
    out = NamedSharding(mesh, P())
    hlo = jax.jit(lambda x, w: x @ w, out_shardings=out).lower(x, w).compile().as_text()
    found = plan_lib.collectives(hlo)
    assert found["all-reduce"] == {"count": 1, "bytes": 128 * 256 * 4}  # the partial products, summed
    assert all(v["count"] == 0 for k, v in found.items() if k != "all-reduce")


def test_training_step_with_fsdp_splits_weights_and_optimizer_state_over_data():
    (r,) = plan_lib.plan(CONFIG, "v5e-4", "data=2,expert=2", [plan_lib.train(4, 64, fsdp=True)])
    weights = weights_by_hand(CONFIG, data=2, expert=2, fsdp=True)
    assert r.weight_bytes == weights < weights_by_hand(CONFIG, data=2, expert=2)
    # parameters + AdamW's two moments, all laid out alike, + the batch and step counters
    assert 3 * weights <= r.argument_bytes <= 3 * weights + SLACK
    assert r.alias_bytes >= 3 * weights  # parameters and optimizer state are donated and updated in place
    assert r.collectives["all-gather"]["count"] > 0  # FSDP gathers the weights it uses


def test_int8_kv_cache_halves_the_cache_per_chip():
    """`--kv-cache-dtype int8`: XLA's argument bytes hold half the bf16 cache plus a float32 scale per token
    and head (TPU tiles pad the small scale arrays, hence the slack)."""
    (dec,) = plan_lib.plan(CONFIG, "v5e-4", "expert=2,tensor=2", [plan_lib.decode(4, 1024)], kv_cache_dtype="int8")
    cache = cache_by_hand(CONFIG, 4, 1024, expert=2, tensor=2)
    scales = 2 * CONFIG.n_layers * (4 // 2) * (CONFIG.n_kv_heads // 2) * 1024 * 4
    weights = weights_by_hand(CONFIG, expert=2, tensor=2)
    assert weights + cache // 2 + scales <= dec.argument_bytes <= weights + cache // 2 + 2 * scales + SLACK
    assert dec.fits and dec.alias_bytes >= cache // 2


@pytest.mark.slow
def test_rematerialized_training_needs_fewer_temporaries():
    """Per-layer remat: XLA's temporaries for the step shrink (each layer keeps its input, not its insides)."""
    config = dataclasses.replace(CONFIG, max_seq_len=1024)  # 2 x 1024: remat needs 0.55x
    plain, remat = plan_lib.plan(config, "v5e-4", "data=2,expert=2",
                                 [plan_lib.train(2, 1024, fsdp=True), plan_lib.train(2, 1024, fsdp=True, remat=True)])
    assert remat.workload.label.endswith("fsdp remat")
    assert remat.temp_bytes < 0.8 * plain.temp_bytes, (remat.temp_bytes, plain.temp_bytes)


def test_long_prefill_fits_where_the_score_matrix_would_not():
    """The sampler's chunked prefill of 8192 tokens compiles for the slice with temporaries far below one
    (t x t) float32 score matrix per head group."""
    (r,) = plan_lib.plan(CONFIG, "v5e-4", "expert=2,tensor=2", [plan_lib.prefill(1, 8192)])
    heads_per_chip = CONFIG.n_heads // 2
    assert r.fits and r.temp_bytes < 8192 * 8192 * 4 * heads_per_chip / 8


def test_an_oversized_workload_is_reported_as_not_fitting(capsys):
    args = ["plan", "--topology", "v5e-4", "--mesh", "expert=2,tensor=2", "--model", "tiny",
            "--decode-batch", "128", "--context", "262144"]
    assert main([*args, "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    cache = cache_by_hand(CONFIG, 128, 262144, expert=2, tensor=2)
    assert cache > report["hbm_bytes"]  # 16 GiB of cache per chip against 15.75 GiB
    assert report["argument_bytes"] >= cache and not report["fits"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "decode 128x262144" in text and "does NOT fit" in text and "batch" in text


def test_bad_topology_is_a_one_line_error_naming_the_choices(capsys):
    with pytest.raises(TopologyError, match=r"unknown TPU topology 'v5e-7'; choose one of v4-8, .*v5e-8, .*v5p-128"):
        get_topology("v5e-7")
    assert main(["plan", "--topology", "v9-8", "--mesh", "expert=8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown TPU topology 'v9-8'" in err and "v6e-8" in err


@pytest.mark.parametrize("mesh,message", [
    ("expert=8", "needs 8 devices but 4 are available"),                 # not the slice's chip count
    ("data=1,tensor=4", r"n_kv_heads \(2\) is not divisible by tensor=4"),  # the model cannot split so
])
def test_mesh_that_does_not_match_the_slice_names_the_valid_meshes(mesh, message, capsys):
    with pytest.raises(plan_lib.PlanError, match=message) as e:
        plan_lib.plan(CONFIG, "v5e-4", mesh, [plan_lib.decode(4, 128)])
    valid = str(e.value).split("valid meshes: ")[1].split(" | ")
    assert {"expert=2,tensor=2", "data=2,expert=2", "expert=4"} <= set(valid) and "tensor=4" not in valid
    assert main(["plan", "--topology", "v5e-4", "--mesh", mesh, "--model", "tiny", "--decode-batch", "4"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_valid_meshes_respect_the_model():
    assert plan_lib.valid_meshes(MixtralConfig(), 8) == [
        "data=8", "data=4,tensor=2", "data=2,tensor=4", "tensor=8", "data=4,expert=2", "data=2,expert=2,tensor=2",
        "expert=2,tensor=4", "data=2,expert=4", "expert=4,tensor=2", "expert=8"]
    assert plan_lib.valid_meshes(MixtralConfig.tiny(n_experts=6), 4) == ["data=4", "data=2,tensor=2", "data=2,expert=2",
                                                                        "expert=2,tensor=2"]


def test_training_hints_keep_every_data_group_busy():
    """The accumulation hint never proposes a micro-batch smaller than the data x expert groups."""
    from mixtral_jax.cli.plan import suggestion

    def report(mesh, chips, remat=False):
        return types.SimpleNamespace(workload=plan_lib.train(64, 4096, fsdp=True, remat=remat), mesh=mesh,
                                     chips=chips, total_bytes=150 * GIB, weight_bytes=2 * GIB, hbm_bytes=95 * GIB)

    wide = suggestion(report("data=8,expert=8", 64))
    assert "--remat" in wide and "--train-accum" not in wide  # 64 sequences over 64 groups: no accumulation
    narrow = suggestion(report("data=2,expert=2", 4, remat=True))
    assert "--remat" not in narrow and "--train-accum 2 (micro-batch 32" in narrow
