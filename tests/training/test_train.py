"""Training: loss against transformers, gradients against finite differences, overfitting on one device
and on an 8-device mesh, kill-and-resume, export, data packing, and one-line errors."""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import mixtral_jax
from mixtral_jax import MixtralConfig, RuntimeConfig
from mixtral_jax.config import ConfigError
from mixtral_jax.training.data import PackedDataset, read_documents, tokenize_documents
from mixtral_jax.training.trainer import TrainConfig, Trainer, list_checkpoints, loss_terms
from tests.helpers.hf_reference import hf_model, save_hf

TINY = MixtralConfig.tiny(router_aux_loss_coef=0.05)  # not HF's default: proves the coefficient is read
SMALL = MixtralConfig.tiny(router_aux_loss_coef=0.05, n_layers=1)  # for training: compiles in half the time
DENSE = RuntimeConfig(moe_strategy="dense")  # the exact reference strategy: no fallback branch to compile
TC = TrainConfig(steps=6, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=1)


def _batch(seed=0, shape=(4, 16), vocab=128):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _model(seed=0, config=SMALL):
    return mixtral_jax.Mixtral(config, DENSE, rngs=nnx.Rngs(seed))


def _data(seed=0, n=4, seq_len=16) -> PackedDataset:
    return PackedDataset.from_tokens(_batch(seed, (n, seq_len)).reshape(-1), seq_len, shuffle=False)


# ------------------------------------------------------------------------------------- loss vs HF
def test_loss_and_aux_loss_equal_transformers(tmp_path):
    hf = hf_model(TINY, seed=3)
    model = mixtral_jax.load_hf(save_hf(hf, tmp_path / "hf"), dtype="float32")
    assert model.config.router_aux_loss_coef == 0.05
    tokens = _batch(1, (3, 20))
    with torch.no_grad():
        out = hf(torch.as_tensor(tokens, dtype=torch.long), labels=torch.as_tensor(tokens, dtype=torch.long),
                 output_router_logits=True)
    total, m = loss_terms(model, jnp.asarray(tokens), model.config.router_aux_loss_coef)
    ref_total, ref_aux = float(out.loss), float(out.aux_loss)
    assert abs(float(m["aux"]) - ref_aux) <= 1e-5 * abs(ref_aux)
    assert abs(float(total) - ref_total) <= 1e-5 * abs(ref_total)
    assert float(total) != pytest.approx(float(m["ce"]))  # the aux term is really in there


# ------------------------------------------------------------------------------ finite differences
def test_gradients_match_finite_differences():
    trainer = Trainer(_model(1), TrainConfig(seq_len=12, z_loss_coef=1e-2))
    params = trainer.params
    tokens = jnp.asarray(_batch(2, (2, 12)))

    @jax.jit
    def loss_and_experts(p):
        experts = jax.lax.top_k(trainer.model(p)(tokens, return_router_logits=True)[1], SMALL.top_k)[1]
        return trainer.loss(p, tokens)[0], experts

    grads = jax.jit(jax.grad(lambda p: trainer.loss(p, tokens)[0]))(params)
    rng = np.random.default_rng(0)
    eps = 2e-3
    for _ in range(3):
        direction = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        norm = np.sqrt(sum(float((d ** 2).sum()) for d in direction.values()))
        direction = {k: d / norm for k, d in direction.items()}
        plus = {k: params[k] + eps * direction[k] for k in params}
        minus = {k: params[k] - eps * direction[k] for k in params}
        # top-k routing is piecewise: the step must not change any token's experts
        (_, chosen), (l_plus, e_plus), (l_minus, e_minus) = map(loss_and_experts, (params, plus, minus))
        assert (np.asarray(e_plus) == chosen).all() and (np.asarray(e_minus) == chosen).all()
        fd = (float(l_plus) - float(l_minus)) / (2 * eps)
        analytic = sum(float(jnp.vdot(grads[k], direction[k])) for k in params)
        assert abs(fd - analytic) <= 2e-3 * max(1.0, abs(analytic)), (fd, analytic)


# --------------------------------------------------------------------------- overfit, 1 vs 8 devices
def test_overfits_and_mesh_gives_the_same_numbers():
    data = _data()
    single = Trainer(_model(), TC)
    h1 = single.fit(data)
    losses = [m["loss"] for m in h1]
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(np.isfinite(losses)) and h1[0]["aux"] > 0
    mesh = Trainer(_model(), TrainConfig(**{**TC.to_dict(), "mesh": "data=2,expert=4"}))
    assert mesh.params["layers.0.moe.w1"].sharding.spec[0] == "expert"
    h8 = mesh.fit(data)
    for a, b in zip(h1, h8):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (a["loss"], b["loss"])
        assert abs(a["aux"] - b["aux"]) <= 1e-4 * abs(a["aux"])
    for name in single.params:
        np.testing.assert_allclose(np.asarray(mesh.params[name]), np.asarray(single.params[name]), atol=1e-4)


def test_fsdp_step_equals_one_device():
    """FSDP (every weight's model dimension also over data) changes the layout, not the numbers."""
    tokens = _batch(2)
    single = Trainer(_model(), TC)
    fsdp = Trainer(_model(), TrainConfig(**{**TC.to_dict(), "mesh": "data=2,expert=4", "fsdp": True}))
    w1 = fsdp.params["layers.0.moe.w1"]
    assert w1.sharding.spec[:2] == ("expert", "data")  # (expert, embed, mlp): embed split over data
    assert {s.data.shape for s in w1.addressable_shards} == {(SMALL.n_experts // 4, SMALL.dim // 2, SMALL.hidden_dim)}
    a, b = single.train_step(tokens), fsdp.train_step(tokens)
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    for name in single.params:
        np.testing.assert_allclose(np.asarray(fsdp.params[name]), np.asarray(single.params[name]), atol=1e-5)


def test_rematerialized_layers_give_the_same_step():
    """`remat` recomputes each layer in the backward pass: the same loss and updated parameters."""
    tokens = _batch(3)
    plain = Trainer(_model(config=TINY), TC)
    remat = Trainer(_model(config=TINY), TrainConfig(**{**TC.to_dict(), "remat": True}))
    a, b = plain.train_step(tokens), remat.train_step(tokens)
    assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"])
    for name in plain.params:
        np.testing.assert_allclose(np.asarray(remat.params[name]), np.asarray(plain.params[name]), atol=1e-6)


def test_gradient_accumulation_equals_the_whole_batch():
    # the token losses are means over equal micro-batches, so accumulating them is exact; the
    # load-balancing loss is per micro-batch (as transformers computes it), so it is off here
    data = _data()
    tc = TrainConfig(**{**TC.to_dict(), "steps": 2, "aux_loss_coef": 0.0, "z_loss_coef": 1e-2})
    whole = Trainer(_model(), tc)
    accum = Trainer(_model(), TrainConfig(**{**tc.to_dict(), "grad_accum": 2}))
    ha, hb = whole.fit(data), accum.fit(data)
    assert abs(ha[-1]["loss"] - hb[-1]["loss"]) <= 1e-5 * ha[-1]["loss"]
    for name in whole.params:
        np.testing.assert_allclose(np.asarray(accum.params[name]), np.asarray(whole.params[name]), atol=1e-4)


# ------------------------------------------------------------------------------ kill and resume
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    data = PackedDataset.from_tokens(_batch(5, (6, 16)).reshape(-1), 16, seed=3)  # shuffled, crosses epochs
    tc = TrainConfig(**{**TC.to_dict(), "save_every": 2})
    straight = Trainer(_model(), tc)
    straight.fit(data)

    first = Trainer(_model(), tc)
    first.fit(data, tmp_path / "run", stop_at=3)  # "killed" after step 3: newest checkpoint is step 3
    del first
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path / "run")] == ["step_00000002", "step_00000003"]

    resumed = Trainer(_model(99), tc)  # other init: all must come from disk
    assert resumed.restore_latest(tmp_path / "run")
    assert (resumed.step, resumed.data_position) == (3, 12)
    resumed.fit(data, tmp_path / "run")
    assert resumed.step == tc.steps
    for name in straight.params:
        np.testing.assert_array_equal(np.asarray(resumed.params[name]), np.asarray(straight.params[name]))
    for a, b in zip(jax.tree.leaves(resumed.opt_state), jax.tree.leaves(straight.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    exported = resumed.export(tmp_path / "final")
    loaded = mixtral_jax.load(exported, moe_strategy="dense")
    tokens = _batch(7, (2, 10))
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(resumed.model()(tokens)))


# ----------------------------------------------------------------------------------------- data
def test_packing(tmp_path):
    tok = mixtral_jax.load_tokenizer()
    (tmp_path / "a.txt").write_text("Hello world.\nA second line.\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "first doc", "id": 1}) + "\n\n"
                                      + json.dumps({"text": "second doc"}) + "\n")
    assert read_documents(tmp_path / "b.jsonl") == ["first doc", "second doc"]
    docs = ["Hello world.\nA second line.\n", "first doc", "second doc"]
    expected = np.concatenate([[tok.bos_id, *tok.encode(d, bos=False), tok.eos_id] for d in docs])
    np.testing.assert_array_equal(tokenize_documents(docs, tok), expected)

    seq = 5
    data = PackedDataset.from_files([tmp_path / "a.txt", tmp_path / "b.jsonl"], seq, tokenizer=tok, seed=1)
    n = len(expected) // seq
    assert len(data) == n
    np.testing.assert_array_equal(data.tokens, expected[: n * seq])  # tail dropped, nothing padded
    rows = expected[: n * seq].reshape(n, seq)
    epoch0 = data.batch(0, n)
    assert sorted(map(tuple, epoch0)) == sorted(map(tuple, rows))  # a permutation of the sequences
    # the stream is a pure function of position, across an epoch boundary
    np.testing.assert_array_equal(data.batch(n - 1, 3), np.concatenate([epoch0[-1:], data.batch(n, 2)]))
    np.testing.assert_array_equal(data.batch(2, 3), data.batch(0, 5)[2:])
    ordered = PackedDataset.from_tokens(expected, seq, shuffle=False)
    np.testing.assert_array_equal(ordered.batch(0, n), rows)


# ------------------------------------------------------------------------------------ bad inputs
def _cli_args(tmp_path, *extra):
    from mixtral_jax.cli import train as train_command

    parser = argparse.ArgumentParser()
    train_command.register(parser.add_subparsers())
    return parser.parse_args(["train", "--out", str(tmp_path / "out"), "--quiet", *extra])


@pytest.mark.parametrize("case, message", [
    ("missing", "data file not found"),
    ("empty", "hold no text"),
    ("short", "fewer than one sequence"),
    ("context", "exceeds the model's context"),
    ("jsonl", "not valid JSON"),
    ("accum", "divisible by grad_accum"),
])
def test_bad_inputs_give_one_line_errors(tmp_path, case, message):
    from mixtral_jax.cli.train import run_train

    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("just a few words")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    data = {"missing": "nope.txt", "empty": "empty.txt", "short": "short.txt", "context": "short.txt",
            "jsonl": "bad.jsonl", "accum": "short.txt"}[case]
    extra = {"context": ["--seq-len", "4096"], "accum": ["--batch", "3", "--grad-accum", "2"]}.get(case, [])
    args = _cli_args(tmp_path, "--data", str(tmp_path / data), *extra)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        run_train(args)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out" / "final").exists()


def test_train_config_rejects_nonsense():
    for bad in (dict(steps=0), dict(seq_len=1), dict(warmup_steps=10, steps=5), dict(lr=-1.0)):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)
    with pytest.raises(ConfigError, match="context"):
        Trainer(_model(), TrainConfig(seq_len=SMALL.max_seq_len + 1))


# ------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_train_command_end_to_end(tmp_path):
    from mixtral_jax.cli.train import run_train

    config = MixtralConfig.tiny(vocab_size=32000, n_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"line {i}: the quick brown fox."}) + "\n"
                                              for i in range(40)))
    common = ["--data", str(tmp_path / "a.jsonl"), "--config", str(tmp_path / "config.json"), "--batch", "2",
              "--seq-len", "16", "--lr", "1e-3", "--warmup", "0"]
    assert run_train(_cli_args(tmp_path, *common, "--steps", "2")) == 0
    out = tmp_path / "out"
    assert [os.path.basename(p) for p in list_checkpoints(out)] == ["step_00000002"]
    model = mixtral_jax.load(out / "final")
    assert model.config == config
    with pytest.raises(FileExistsError, match="--resume"):
        run_train(_cli_args(tmp_path, *common, "--steps", "2"))
    assert run_train(_cli_args(tmp_path, *common, "--steps", "3", "--resume", "--export-dtype", "bfloat16")) == 0
    assert os.path.basename(list_checkpoints(out)[-1]) == "step_00000003"
    info = mixtral_jax.convert.orbax_io.read_info(out / "final")  # the export was replaced by step 3's
    assert "3 steps" in info.metadata["source"]["layout"] and info.dtype == np.dtype(jnp.bfloat16)


@pytest.mark.slow
def test_init_from_with_skip_sequences_continues_on_unseen_data(tmp_path):
    """bench.train_demo's second stage: start from a model, at a later point of the data stream."""
    from mixtral_jax.cli.train import run_train
    from mixtral_jax.training.trainer import read_train_state

    config = MixtralConfig.tiny(vocab_size=32000, n_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "a.txt").write_text(" ".join(f"word{i} and more words" for i in range(200)))
    common = ["--data", str(tmp_path / "a.txt"), "--batch", "2", "--seq-len", "16", "--warmup", "0"]
    assert run_train(_cli_args(tmp_path, *common, "--config", str(tmp_path / "config.json"), "--steps", "1")) == 0
    second = ["--out", str(tmp_path / "second"), "--init-from", str(tmp_path / "out" / "final"), "--steps", "2"]
    with pytest.raises(ConfigError, match="--skip-sequences must be >= 0"):
        run_train(_cli_args(tmp_path, *common, *second, "--skip-sequences", "-1"))
    assert run_train(_cli_args(tmp_path, *common, *second, "--skip-sequences", "7")) == 0
    (last,) = list_checkpoints(tmp_path / "second")[-1:]
    assert read_train_state(last)["data_position"] == 7 + 2 * 2
