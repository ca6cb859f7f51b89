"""The converter: every source layout to the same Orbax checkpoint, streamed, safely, and verified.

A tiny random `transformers` Mixtral is written as Hugging Face safetensors (one file, sharded with an
index, fused expert keys) and in Mistral's original layouts (`consolidated.00.pth`,
`consolidated.safetensors`, the pre-release torrent's stacked experts over several `.pt` files). Each
converts, loads to the reference's logits and verifies bit for bit; bad inputs fail before anything is
written; interrupted conversions leave nothing that looks complete.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
import torch

from mixtral_jax import MixtralConfig
from mixtral_jax.cli.main import main as command_main
from mixtral_jax.config import ConfigError
from mixtral_jax.convert import convert, orbax_io
from mixtral_jax.convert.verify import VerificationError, verify
from mixtral_jax.errors import CheckpointError
from mixtral_jax.loading.checkpoint import load
from mixtral_jax.model.params import model_arrays
from tests.helpers import REPO_ROOT as ROOT
from tests.helpers.hf_reference import hf_logits, hf_model, save_hf
from tests.helpers.mistral_reference import save_mistral

CONFIG = MixtralConfig.tiny()
TOKENS = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 11))


def _save_hf_fused(model, config, path):
    """The layout transformers 5 holds in memory: `mlp.experts.gate_up_proj` / `down_proj`, `mlp.gate`."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf(), f)
    return str(path)


WRITERS = {
    "hf": lambda m, c, d: save_hf(m, d),
    "hf_sharded": lambda m, c, d: save_hf(m, d, max_shard_size="20KB"),
    "hf_fused": _save_hf_fused,
    "mistral_pth": lambda m, c, d: save_mistral(m, c, d),
    "mistral_safetensors": lambda m, c, d: save_mistral(m, c, d, file_format="safetensors"),
    "torrent_pt": lambda m, c, d: save_mistral(m, c, d, layout="torrent", n_files=3),
}
LAYOUT_WORDS = {
    "hf": "per-expert keys, 1 file", "hf_sharded": "per-expert keys", "hf_fused": "fused gate_up_proj",
    "mistral_pth": "release layout), consolidated.00.pth",
    "mistral_safetensors": "release layout), consolidated.safetensors",
    "torrent_pt": "pre-release torrent layout), 3 files consolidated.00.pt ... consolidated.02.pt",
}


@pytest.fixture(scope="module")
def reference():
    model = hf_model(CONFIG, seed=0)
    return model, hf_logits(model, TOKENS)


@pytest.fixture(scope="module")
def sources(reference, tmp_path_factory):
    """Source checkpoints by layout name, written on first use."""
    root = tmp_path_factory.mktemp("sources")
    return functools.cache(lambda kind: WRITERS[kind](reference[0], CONFIG, str(root / kind)))


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    """A converted checkpoint per layout (shared by the tests that only read them)."""
    root = tmp_path_factory.mktemp("converted")
    return functools.cache(lambda kind: (convert(sources(kind), str(root / kind), show_progress=False),
                                         str(root / kind)))


def _logits(model):
    return np.asarray(model(TOKENS))


def _restore_all(dst) -> dict:
    stored = orbax_io.stored_tree(dst)
    return orbax_io.restore(dst, stored)


# ------------------------------------------------------------------------- every layout, end to end
@pytest.mark.parametrize("kind", list(WRITERS))
def test_converts_loads_to_reference_logits_and_verifies(kind, reference, sources, converted):
    report, dst = converted(kind)
    assert report.format == ("hf" if kind.startswith("hf") else "mistral")
    assert LAYOUT_WORDS[kind] in report.description
    assert report.n_params == 23 and report.dtype == "float32"
    info = orbax_io.read_info(dst)
    assert info.config == CONFIG and info.dtype == np.float32
    model = load(dst)
    np.testing.assert_allclose(_logits(model), reference[1], atol=1e-4, rtol=0)
    assert "OK" in str(verify(sources(kind), dst, show_progress=False))


def test_all_layouts_give_bit_identical_parameters(converted, sources):
    """The RoPE permutation of Mistral's wq/wk and the torrent's stacked experts map exactly onto HF's."""
    baseline = _restore_all(converted("hf")[1])
    for kind in ("mistral_pth", "torrent_pt", "hf_fused"):
        other = _restore_all(converted(kind)[1])
        assert set(other) == set(baseline)
        for name, value in baseline.items():
            assert np.array_equal(other[name], value), (kind, name)
    # and the permutation is not a no-op: the Mistral file's wq rows differ from HF's q_proj
    sd = torch.load(os.path.join(sources("mistral_pth"), "consolidated.00.pth"), weights_only=True)
    from safetensors import safe_open
    with safe_open(os.path.join(sources("hf"), "model.safetensors"), "pt") as f:
        q_proj = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert not torch.equal(sd["layers.0.attention.wq.weight"], q_proj)


def test_checkpoint_layout_metadata_and_tokenizer(sources, tmp_path):
    dst = tmp_path / "ckpt"
    convert(sources("hf"), dst, show_progress=False, tokenizer="mistral-common:tokenizer.model.v1", buffer_bytes=1)
    info = orbax_io.read_info(dst)
    assert info.tokenizer == "mistral-common:tokenizer.model.v1"
    assert {orbax_io.MARKER_FILE, orbax_io.METADATA_FILE, "state"} <= set(os.listdir(dst))
    assert info.params["layers.1.moe.w1"] == ((8, 64, 96), np.dtype(np.float32))
    assert info.metadata["source"]["format"] == "hf"
    # plain Orbax reads it too, with nothing of ours
    import orbax.checkpoint.experimental.v1 as ocp
    meta = ocp.metadata(str(dst), checkpointable_name="state")
    assert meta.metadata["layers"]["1"]["moe"]["w1"].shape == (8, 64, 96)
    # one expert / one head per chunk, so a device reads only the experts and heads it holds
    assert meta.metadata["layers"]["1"]["moe"]["w1"].storage_metadata.chunk_shape == (1, 64, 96)
    assert meta.metadata["layers"]["1"]["attn"]["wq"].storage_metadata.chunk_shape == (64, 1, 16)
    assert meta.custom_metadata["config"] == CONFIG.to_dict()


def test_default_tokenizer_follows_the_vocabulary():
    from mixtral_jax.convert.orbax_io import default_tokenizer
    assert default_tokenizer(MixtralConfig()) == "mistral-common:tokenizer.model.v1"
    assert default_tokenizer(MixtralConfig.mixtral_8x22b()) == "mistral-common:tokenizer.model.v3"


# ---------------------------------------------------------------------------------------- dtypes
def test_bf16_stays_bit_exact_from_safetensors_and_pth(reference, tmp_path):
    model16 = hf_model(CONFIG, seed=0).to(torch.bfloat16)
    hf_src = save_hf(model16, tmp_path / "hf16")
    mistral_src = save_mistral(model16, CONFIG, tmp_path / "mistral16")
    convert(hf_src, tmp_path / "a", show_progress=False)
    convert(mistral_src, tmp_path / "b", show_progress=False)
    info = orbax_io.read_info(tmp_path / "a")
    assert info.dtype == ml_dtypes.bfloat16
    assert {d for _, d in info.params.values()} == {np.dtype(ml_dtypes.bfloat16)}
    a, b = _restore_all(tmp_path / "a"), _restore_all(tmp_path / "b")
    for name in a:
        assert a[name].dtype == ml_dtypes.bfloat16 and np.array_equal(a[name].view(np.uint16), b[name].view(np.uint16))
    embed = model16.model.embed_tokens.weight.detach().view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(a["embed"].view(np.uint16), embed)
    loaded = model_arrays(load(tmp_path / "b"))
    assert loaded["layers.1.moe.w2"].dtype == ml_dtypes.bfloat16
    assert np.array_equal(np.asarray(loaded["layers.1.moe.w2"]).view(np.uint16), a["layers.1.moe.w2"].view(np.uint16))
    verify(mistral_src, tmp_path / "b", show_progress=False)


def test_dtype_cast_on_request(sources, converted, tmp_path):
    dst = tmp_path / "cast"
    report = convert(sources("hf"), dst, dtype="bf16", show_progress=False)
    assert report.dtype == "bfloat16"
    f32 = _restore_all(converted("hf")[1])
    bf16 = _restore_all(dst)
    for name, value in f32.items():
        assert np.array_equal(bf16[name].view(np.uint16), value.astype(ml_dtypes.bfloat16).view(np.uint16))
    verify(sources("hf"), dst, show_progress=False)  # verify knows the conversion cast
    model = load(dst, dtype="float32")  # and load can widen again
    assert model_arrays(model)["embed"].dtype == np.float32


# ------------------------------------------------------------------------------------------ verify
def test_verify_reports_the_first_tampered_value(sources, tmp_path):
    src = shutil.copytree(sources("hf"), tmp_path / "src")
    dst = tmp_path / "dst"
    convert(src, dst, show_progress=False)
    path = os.path.join(src, "model.safetensors")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    key = "model.layers.1.block_sparse_moe.experts.5.w2.weight"  # torch [D, F]; ours [E, F, D]
    begin = 8 + n + header[key]["data_offsets"][0]
    d, ff = header[key]["shape"]
    offset = begin + (3 * ff + 7) * 4  # element (3, 7)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.float32(123.0).tobytes())
    with pytest.raises(VerificationError, match=r"layers\.1\.moe\.w2: value mismatch at index \(5, 7, 3\)"):
        verify(src, dst, show_progress=False)
    assert command_main(["verify", str(src), str(dst), "--no-progress"]) == 1


# ---------------------------------------------------------------------------- interruption safety
def _leftovers(parent, name):
    return [e for e in os.listdir(parent) if e.startswith(f".{name}.")]


def test_exception_midway_leaves_nothing_and_rerun_succeeds(sources, monkeypatch, tmp_path):
    calls = []
    real_flush = orbax_io.StreamingWriter.flush

    def failing_flush(self):
        if self._pending:
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("disk on fire")
        real_flush(self)

    monkeypatch.setattr(orbax_io.StreamingWriter, "flush", failing_flush)
    dst = tmp_path / "dst"
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(sources("hf"), dst, show_progress=False, buffer_bytes=1)
    assert not dst.exists() and _leftovers(tmp_path, "dst") == []
    monkeypatch.setattr(orbax_io.StreamingWriter, "flush", real_flush)
    convert(sources("hf"), dst, show_progress=False, buffer_bytes=1)
    verify(sources("hf"), dst, show_progress=False)


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from mixtral_jax.convert import orbax_io
    from mixtral_jax.convert import convert
    real_flush, count = orbax_io.StreamingWriter.flush, [0]
    def flush(self):
        real_flush(self)
        count[0] += 1
        if count[0] == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
    orbax_io.StreamingWriter.flush = flush
    convert(sys.argv[1], sys.argv[2], overwrite=True, show_progress=False, buffer_bytes=1)
""")


def test_sigkill_midway_leaves_no_complete_looking_checkpoint(sources, tmp_path):
    src, dst = sources("hf"), tmp_path / "dst"

    def killed_conversion(after_groups):
        r = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, src, str(dst), str(after_groups)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]

    killed_conversion(after_groups=5)  # killed after writing 5 groups, with orbax's pieces on disk
    assert not dst.exists()
    (workspace,) = [tmp_path / e for e in _leftovers(tmp_path, "dst") if ".tmp-" in e]
    assert os.listdir(workspace)  # pieces were written ...
    with pytest.raises(CheckpointError, match="not found"):
        load(dst)
    for d in [workspace, *workspace.iterdir()]:  # ... but none of it loads
        with pytest.raises(CheckpointError, match="not a complete mixtral-jax checkpoint|not found"):
            load(d)

    convert(src, dst, show_progress=False)  # a rerun cleans up and succeeds
    assert _leftovers(tmp_path, "dst") == []
    verify(src, dst, show_progress=False)

    killed_conversion(after_groups=23)  # an --overwrite run killed after its last group: old one intact
    assert os.path.isfile(dst / orbax_io.MARKER_FILE)
    verify(src, dst, show_progress=False)


# ------------------------------------------------------------------------------------- bad inputs
def _rewrite_tensor(path, key, array):
    """Replace one tensor of a safetensors file (by rewriting the file with numpy)."""
    from safetensors.numpy import load_file, save_file
    tensors = load_file(path)
    tensors[key] = array
    save_file(tensors, path)


class NotATensor:  # what a pickle may carry that torch.load(weights_only=True) refuses to build
    pass


def _bad(kind, sources, root):
    """Build the broken source `kind` under `root`; return (src, convert kwargs, error type, message)."""
    if kind == "missing_shard":
        src = shutil.copytree(sources("hf_sharded"), root / "src")
        os.remove(os.path.join(src, "model-00002-of-00015.safetensors"))
        return src, {}, CheckpointError, "missing shard.*model-00002-of-00015.safetensors"
    if kind == "truncated_safetensors":
        src = shutil.copytree(sources("hf"), root / "src")
        path = os.path.join(src, "model.safetensors")
        os.truncate(path, os.path.getsize(path) - 100)
        return src, {}, CheckpointError, "truncated"
    if kind == "wrong_shape":
        src = shutil.copytree(sources("hf"), root / "src")
        _rewrite_tensor(os.path.join(src, "model.safetensors"), "model.layers.0.self_attn.k_proj.weight",
                        np.zeros((16, 64), np.float32))
        return src, {}, CheckpointError, r"k_proj\.weight' has shape \(16, 64\), expected \(32, 64\)"
    if kind == "unknown_key":
        src = shutil.copytree(sources("hf"), root / "src")
        _rewrite_tensor(os.path.join(src, "model.safetensors"), "model.layers.0.mystery.weight",
                        np.zeros(3, np.float32))
        return src, {}, CheckpointError, "unexpected tensor 'model.layers.0.mystery.weight'"
    if kind == "missing_config_json":
        src = shutil.copytree(sources("hf"), root / "src")
        os.remove(os.path.join(src, "config.json"))
        return src, {"format": "hf"}, ConfigError, "config.json not found"
    if kind == "undetectable":
        src = shutil.copytree(sources("hf"), root / "src")
        os.remove(os.path.join(src, "config.json"))
        return src, {}, CheckpointError, "neither config.json .* nor params.json"
    if kind == "missing_params_json":
        src = shutil.copytree(sources("mistral_pth"), root / "src")
        os.remove(os.path.join(src, "params.json"))
        return src, {"format": "mistral"}, ConfigError, "params.json not found"
    if kind == "pickle_with_object":
        src = shutil.copytree(sources("mistral_pth"), root / "src")
        path = os.path.join(src, "consolidated.00.pth")
        sd = torch.load(path, weights_only=True)
        sd["evil"] = NotATensor()
        torch.save(sd, path)
        return src, {}, CheckpointError, "holds pickled objects that are not tensors .*NotATensor"
    if kind == "pickle_with_int":
        src = shutil.copytree(sources("mistral_pth"), root / "src")
        path = os.path.join(src, "consolidated.00.pth")
        sd = torch.load(path, weights_only=True)
        sd["step"] = 3
        torch.save(sd, path)
        return src, {}, CheckpointError, "entry 'step' is a int, not a tensor"
    if kind == "truncated_pth":
        src = shutil.copytree(sources("mistral_pth"), root / "src")
        path = os.path.join(src, "consolidated.00.pth")
        os.truncate(path, os.path.getsize(path) // 2)
        return src, {}, CheckpointError, "cannot be read as a PyTorch checkpoint"
    if kind == "missing_torrent_shard":
        src = shutil.copytree(sources("torrent_pt"), root / "src")
        os.remove(os.path.join(src, "consolidated.01.pt"))
        return src, {}, CheckpointError, r"missing shard\(s\): consolidated\.01\.pt"
    if kind == "missing_tensor":
        src = shutil.copytree(sources("mistral_safetensors"), root / "src")
        from safetensors.numpy import load_file, save_file
        path = os.path.join(src, "consolidated.safetensors")
        tensors = load_file(path)
        del tensors["layers.1.feed_forward.experts.6.w3.weight"]
        save_file(tensors, path)
        return src, {}, CheckpointError, r"missing slices \[6\] of parameter layers\.1\.moe\.w3"
    if kind == "unknown_format":
        return sources("hf"), {"format": "gguf"}, CheckpointError, "unknown checkpoint format 'gguf'"
    if kind == "missing_source":
        return str(root / "nowhere"), {}, CheckpointError, "source checkpoint directory not found"
    raise AssertionError(kind)


BAD_INPUTS = ["missing_shard", "truncated_safetensors", "wrong_shape", "unknown_key", "missing_config_json",
              "undetectable", "missing_params_json", "pickle_with_object", "pickle_with_int", "truncated_pth",
              "missing_torrent_shard", "missing_tensor", "unknown_format", "missing_source"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_one_clear_error_and_writes_nothing(kind, sources, tmp_path):
    src, kwargs, error, message = _bad(kind, sources, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(error, match=message) as info:
        convert(src, out / "dst", show_progress=False, **kwargs)
    assert "\n" not in str(info.value)
    assert os.listdir(out) == []


def test_cli_errors_are_one_line_and_write_nothing(sources, tmp_path, capsys):
    src, _, _, _ = _bad("pickle_with_object", sources, tmp_path)
    assert command_main(["convert", str(src), str(tmp_path / "dst"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not tensors" in err
    assert not (tmp_path / "dst").exists()


def test_cli_convert_overwrite_and_verify(sources, tmp_path, capsys, monkeypatch):
    from mixtral_jax.cli import main as cli
    if "mixtral_jax.cli.convert" not in cli._COMMAND_MODULES:
        monkeypatch.setattr(cli, "_COMMAND_MODULES", cli._COMMAND_MODULES + ("mixtral_jax.cli.convert",))
    src, dst = sources("torrent_pt"), str(tmp_path / "dst")
    assert cli.main(["convert", src, dst, "--no-progress"]) == 0
    assert "stacked experts" in capsys.readouterr().out
    assert cli.main(["convert", src, dst, "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["convert", sources("hf"), dst, "--overwrite", "--no-progress", "--dtype", "bf16"]) == 0
    assert orbax_io.read_info(dst).dtype == ml_dtypes.bfloat16
    assert cli.main(["verify", sources("hf"), dst, "--no-progress"]) == 0
    assert "OK" in capsys.readouterr().out
    # --overwrite never deletes a directory that is not one of ours
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("...")
    assert cli.main(["convert", src, str(other), "--overwrite", "--no-progress"]) == 2
    assert "not a mixtral-jax checkpoint" in capsys.readouterr().err
    assert (other / "thesis.tex").exists()


# -------------------------------------------------------------------------------------------- load
def test_load_refuses_incomplete_tampered_and_mismatched_checkpoints(sources, converted, tmp_path):
    with pytest.raises(CheckpointError, match="not a complete mixtral-jax checkpoint"):
        load(sources("hf"))
    dst = shutil.copytree(converted("hf")[1], tmp_path / "copy")
    meta_path = os.path.join(dst, orbax_io.METADATA_FILE)
    meta = json.load(open(meta_path))
    with open(meta_path, "w") as f:
        json.dump(dict(meta, tokenizer="other"), f)
    with pytest.raises(CheckpointError, match="does not match its completion marker"):
        load(dst)
    orbax_io.write_metadata(str(dst), dict(meta, config=dict(meta["config"], n_layers=3)))
    with pytest.raises(CheckpointError, match="does not match its config: it lacks layers.2"):
        load(dst)
    orbax_io.write_metadata(str(dst), dict(meta, config=dict(meta["config"], hidden_dim=48)))
    with pytest.raises(CheckpointError, match=r"layers.0.moe.w1 has shape \(8, 64, 96\), but the config implies"):
        load(dst)


_SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mixtral_jax.loading.checkpoint import load
    from mixtral_jax.model.params import model_arrays, param_specs
    from mixtral_jax.sharding import make_mesh, param_shardings
    dst, tokens = sys.argv[1], np.load(sys.argv[2])
    assert len(jax.devices()) == 8
    mesh = make_mesh("expert=4,tensor=2")
    sharded = load(dst, mesh="expert=4,tensor=2")
    single = load(dst)
    arrays = model_arrays(sharded)
    expected = param_shardings(param_specs(sharded.config, sharded.runtime), mesh)
    out = {"mismatched": [n for n, a in arrays.items() if not a.sharding.is_equivalent_to(expected[n], a.ndim)],
           "w1_spec_ok": arrays["layers.0.moe.w1"].sharding.spec == P("expert", None, "tensor"),
           "shard_shapes": {n: sorted({tuple(s.data.shape) for s in arrays[n].addressable_shards})
                            for n in ("layers.0.moe.w1", "layers.0.moe.w2", "layers.1.attn.wk", "embed")},
           "devices": len(arrays["layers.0.moe.w1"].sharding.device_set),
           "max_diff": float(np.abs(np.asarray(sharded(tokens)) - np.asarray(single(tokens))).max())}
    np.save(sys.argv[3], np.asarray(sharded(tokens)))
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_load_onto_8_device_mesh_shards_each_weight_by_the_rules(converted, reference, tmp_path):
    dst = converted("hf")[1]
    np.save(tmp_path / "tokens.npy", TOKENS)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, dst, str(tmp_path / "tokens.npy"),
                        str(tmp_path / "logits.npy")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["mismatched"] == []
    assert out["w1_spec_ok"]
    assert out["devices"] == 8
    # experts split 4 ways, the expert hidden dim (96) 2 ways; kv heads (2) 2 ways; vocab (128) 2 ways
    assert out["shard_shapes"] == {"layers.0.moe.w1": [[2, 64, 48]], "layers.0.moe.w2": [[2, 48, 64]],
                                   "layers.1.attn.wk": [[64, 1, 16]], "embed": [[64, 64]]}
    assert out["max_diff"] <= 1e-5
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), reference[1], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------ memory
def test_peak_rss_follows_the_buffer_not_the_checkpoint(tmp_path):
    """A ~100 MB checkpoint converts with a 4 MB buffer in far less extra memory than its size."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import convert_memory as cm
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    config = cm.bench_config(7, vocab_size=4096, dim=256, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=512)
    size = cm.write_random_hf(tmp_path / "hf", config, dtype="float32", shard_bytes=16 << 20)
    assert 90e6 < size < 110e6
    base = cm.peak_rss(cm.baseline_cmd())
    run = cm.peak_rss(cm.convert_cmd(tmp_path / "hf", tmp_path / "out", buffer_mb=4))
    assert run["rc"] == 0, run["stderr"]
    extra = (run["maxrss_kb"] - base["maxrss_kb"]) * 1024
    assert extra < 0.6 * size, f"conversion used {extra / 2**20:.0f} MiB over the baseline for {size / 2**20:.0f} MiB"
    assert orbax_io.read_info(tmp_path / "out").config == config


def test_a_run_killed_between_its_two_renames_gets_the_old_checkpoint_back(sources, converted, tmp_path):
    dst = tmp_path / "dst"
    shutil.copytree(converted("hf")[1], tmp_path / ".dst.old-12345-0badf00d")  # dst moved aside, then killed
    with pytest.raises(CheckpointError, match="already exists"):
        convert(sources("torrent_pt"), dst, show_progress=False)
    assert orbax_io.read_info(dst).metadata["source"]["format"] == "hf"
    assert _leftovers(tmp_path, "dst") == []


@pytest.mark.parametrize("shape,axes", [((300, 200), (1, 0)), ((3, 130, 257), (0, 2, 1)), ((129, 4, 33), (2, 1, 0)),
                                        ((5, 7), (0, 1))])
def test_tiled_copy_equals_plain_assignment(shape, axes):
    from mixtral_jax.convert.converter import tiled_copy
    src = np.random.default_rng(0).standard_normal(shape).astype(np.float32).transpose(axes)
    out = np.empty(src.shape, ml_dtypes.bfloat16)
    tiled_copy(out, src, block=64)
    assert np.array_equal(out.view(np.uint16), src.astype(ml_dtypes.bfloat16).view(np.uint16))
