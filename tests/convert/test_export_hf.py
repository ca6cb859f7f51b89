"""`mixtral-jax export --format hf`: transformers loads what we write and computes our logits; a bf16
checkpoint goes HF -> ours -> HF bit for bit (read back by the `safetensors` library, configs compared by
transformers); int8 only on request; sharding with an index; a failed export leaves nothing that loads."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

import mixtral_jax
from mixtral_jax import MixtralConfig
from mixtral_jax.cli import main as cli
from mixtral_jax.convert import convert
from mixtral_jax.convert import export_hf as export_module
from mixtral_jax.convert.export_hf import export_hf, hf_keys, pack_shards, parse_size
from mixtral_jax.errors import CheckpointError, ConfigError
from mixtral_jax.training.trainer import TrainConfig, Trainer
from tests.helpers.hf_reference import hf_logits, hf_model, save_hf

CONFIG = MixtralConfig.tiny()
TOKENS = np.random.default_rng(5).integers(0, CONFIG.vocab_size, (2, 12))


def _tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory, read by the safetensors library (not our reader)."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    ref = reference(CONFIG, 0)
    ck = str(tmp_path_factory.mktemp("ck") / "orbax")
    convert(ref.path, ck, show_progress=False)
    return ref, ck


def test_a_fine_tune_loads_in_transformers_with_our_logits(converted, tmp_path):
    ref, ck = converted
    model = mixtral_jax.load(ck)
    trainer = Trainer(model, TrainConfig(steps=1, batch_size=1, seq_len=16, warmup_steps=0))
    rng = np.random.default_rng(0)
    trainer.params = {n: v + rng.normal(0, 0.02, v.shape).astype(v.dtype) for n, v in trainer.params.items()}
    tuned = trainer.export(str(tmp_path / "tuned"))
    out = tmp_path / "hf"
    assert cli.main(["export", tuned, str(out), "--format", "hf", "--no-progress"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    hf = transformers.MixtralForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.dtype == torch.float32
    ours = np.asarray(mixtral_jax.load(tuned)(TOKENS))
    theirs = hf_logits(hf, TOKENS)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    assert np.abs(theirs - hf_logits(ref.hf, TOKENS)).max() > 1e-2  # the fine-tune's weights, not the original's
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}


def test_bf16_round_trip_is_bit_exact_and_sharded(tmp_path, capsys):
    src = save_hf(hf_model(CONFIG, seed=4).to(torch.bfloat16), tmp_path / "src", max_shard_size="300KB")
    assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
    ck, out = str(tmp_path / "ck"), tmp_path / "out"
    assert cli.main(["convert", src, ck, "--no-progress"]) == 0
    assert cli.main(["export", ck, str(out), "--format", "hf", "--max-shard-size", "150KB", "--no-progress"]) == 0
    assert "bfloat16 in" in capsys.readouterr().out
    before, after = _tensors(src), _tensors(str(out))
    assert sorted(after) == sorted(hf_keys(CONFIG)) and set(before) == set(after)
    for key, tensor in before.items():
        assert after[key].dtype == torch.bfloat16 and after[key].shape == tensor.shape, key
        assert torch.equal(after[key].view(torch.int16), tensor.view(torch.int16)), key
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in after.values())
    biggest = max(t.numel() * 2 for t in after.values())
    assert all(os.path.getsize(out / s) <= max(150_000, biggest) + 16_384 for s in shards)  # + the header
    a = transformers.AutoConfig.from_pretrained(src).to_dict()
    b = transformers.AutoConfig.from_pretrained(out).to_dict()
    differ = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert differ == {"_name_or_path"}, {k: (a.get(k), b.get(k)) for k in differ}


def test_int8_is_exported_only_when_asked(converted, tmp_path, capsys):
    ref, _ = converted
    q = str(tmp_path / "q")
    convert(ref.path, q, quantize="int8", show_progress=False)
    assert cli.main(["export", q, str(tmp_path / "refused"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds int8 weights" in err and "--dequantize" in err
    assert not os.path.exists(tmp_path / "refused")
    assert cli.main(["export", q, str(tmp_path / "hf"), "--format", "hf", "--dequantize", "--no-progress"]) == 0
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    assert hf.dtype == torch.float32
    np.testing.assert_allclose(hf_logits(hf, TOKENS), np.asarray(mixtral_jax.load(q)(TOKENS)), atol=1e-4, rtol=0)


def test_a_failed_export_leaves_nothing_and_the_next_one_completes(converted, tmp_path, monkeypatch):
    _, ck = converted
    dst = tmp_path / "hf"
    real, calls = export_module.invert, []

    def dies_midway(*args):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt  # as if killed while writing a shard
        return real(*args)

    monkeypatch.setattr(export_module, "invert", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        export_hf(ck, dst, show_progress=False)
    assert os.listdir(tmp_path) == [] or all(n.startswith(".") for n in os.listdir(tmp_path))
    assert not dst.exists()
    monkeypatch.setattr(export_module, "invert", real)
    export_hf(ck, dst, show_progress=False)
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no workspace or lock left behind
    with pytest.raises(CheckpointError, match="already exists; pass --overwrite"):
        export_hf(ck, dst, show_progress=False)
    export_hf(ck, dst, overwrite=True, dtype="bfloat16", show_progress=False)
    assert all(t.dtype == torch.bfloat16 for t in _tensors(str(dst)).values())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a Hugging Face checkpoint directory"):
        export_hf(ck, tmp_path / "other", overwrite=True, show_progress=False)


def test_bad_input_is_one_line(converted, tmp_path, capsys):
    _, ck = converted
    for argv, message in [([ck, str(tmp_path / "x"), "--format", "hf", "--max-shard-size", "lots"], "bad shard size"),
                          ([str(tmp_path / "nothing"), str(tmp_path / "y"), "--format", "hf"], "checkpoint not found")]:
        assert cli.main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    with pytest.raises(SystemExit):
        cli.main(["export", ck, str(tmp_path / "z"), "--format", "gguf"])


def test_sizes_and_packing():
    assert [parse_size(s) for s in ("5GB", "500MB", "2GiB", "1024", "1.5kB")] == [5 * 10**9, 5 * 10**8, 2 * 2**30,
                                                                                   1024, 1500]
    for bad in ("0", "-1GB", "5 GBs", ""):
        with pytest.raises(ConfigError):
            parse_size(bad)
    assert pack_shards([4, 4, 4, 10, 1], 8) == [[0, 1], [2], [3], [4]]
