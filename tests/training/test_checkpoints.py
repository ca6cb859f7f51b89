"""Training checkpoints through Orbax's CheckpointManager: into a bucket (the GCS emulator) and back, the
newest `max_to_keep` kept, a half-written step ignored, and a two-process run (jax.distributed, gloo on
127.0.0.1) whose processes write their own shards into one committed step per save, killed and resumed:
every run ends with the parameters of one uninterrupted single-process run."""

from __future__ import annotations

import os

import numpy as np
import pytest
from flax import nnx

import mixtral_jax
from mixtral_jax import MixtralConfig, RuntimeConfig
from mixtral_jax.convert import paths
from mixtral_jax.training.data import PackedDataset
from mixtral_jax.training.trainer import TrainConfig, Trainer, list_checkpoints, read_train_state
from tests.helpers.processes import run_processes

CONFIG = MixtralConfig.tiny(n_layers=1)
MESH = "data=2,expert=4"
TC = TrainConfig(steps=6, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=1, save_every=2)


def make_trainer(mesh: str | None = None, seed: int = 0) -> Trainer:
    model = mixtral_jax.Mixtral(CONFIG, RuntimeConfig(moe_strategy="dense"), rngs=nnx.Rngs(seed))
    return Trainer(model, TrainConfig(**{**TC.to_dict(), "mesh": mesh}))


def make_data() -> PackedDataset:
    tokens = np.random.default_rng(5).integers(0, CONFIG.vocab_size, 6 * 16)
    return PackedDataset.from_tokens(tokens, 16, seed=3)  # shuffled, crosses epochs


@pytest.fixture(scope="module")
def straight():
    """The parameters after one uninterrupted run, one process, no mesh."""
    t = make_trainer()
    t.fit(make_data())
    return {k: np.asarray(v) for k, v in t.params.items()}


def _assert_same(params, expected, atol=0.0):
    assert set(params) == set(expected)
    for name in expected:
        np.testing.assert_allclose(np.asarray(params[name]), expected[name], atol=atol, rtol=0, err_msg=name)


def test_train_and_resume_in_a_bucket(gcs_bucket, straight):
    out = f"{gcs_bucket}/run"
    first = make_trainer()
    first.fit(make_data(), out, stop_at=5)  # saves at 2 and 4 and (the end of this run) 5
    first.close()
    steps = [paths.basename(p) for p in list_checkpoints(out)]
    assert steps == ["step_00000004", "step_00000005"]  # max_to_keep 2, in the bucket
    assert not os.path.exists("gs:")  # never made into a local folder
    assert read_train_state(list_checkpoints(out)[-1])["step"] == 5

    resumed = make_trainer(seed=99)  # another init: everything must come from the bucket
    assert resumed.restore_latest(out) and (resumed.step, resumed.data_position) == (5, 20)
    resumed.fit(make_data(), out)
    resumed.close()
    _assert_same(resumed.params, straight)
    exported = resumed.export(f"{out}/final")
    tokens = np.random.default_rng(7).integers(0, CONFIG.vocab_size, (2, 10))
    np.testing.assert_array_equal(np.asarray(mixtral_jax.load(exported, moe_strategy="dense")(tokens)),
                                  np.asarray(resumed.model()(tokens)))


def test_a_half_written_step_is_ignored(tmp_path, straight):
    out = tmp_path / "run"
    t = make_trainer()
    t.fit(make_data(), out, stop_at=4)
    t.close()
    # what a process killed mid-save leaves locally: Orbax's temporary folder, never renamed into place
    (out / "checkpoints" / "step_00000006.orbax-checkpoint-tmp-1234").mkdir()
    (out / "checkpoints" / "step_00000006.orbax-checkpoint-tmp-1234" / "state").mkdir()
    assert [p.rsplit("/", 1)[-1] for p in list_checkpoints(out)] == ["step_00000002", "step_00000004"]
    resumed = make_trainer(seed=1)
    assert resumed.restore_latest(out) and resumed.step == 4
    resumed.fit(make_data(), out)
    resumed.close()
    _assert_same(resumed.params, straight)


def _two_processes(out: str, kill_at: int, stop_at: int, result: str) -> list[str]:
    return run_processes(2, "train_worker.py", [out, str(kill_at), str(stop_at), result], timeout=400)


@pytest.mark.multiprocess
def test_two_processes_save_one_checkpoint_and_resume(tmp_path, straight):
    out, result = str(tmp_path / "run"), str(tmp_path / "params.npz")
    # one launch: "killed" after step 3 (saves at 2 and 3), then a fresh trainer of another init resumes to 6
    outputs = _two_processes(out, 3, TC.steps, result)
    assert all("resumed=False step=3" in o for o in outputs), outputs
    # one step folder per save, written by both processes: no per-process temporary folders left behind
    assert all("folders=step_00000002,step_00000003\n" in o for o in outputs), outputs
    assert all("resumed=True step=6" in o for o in outputs), outputs
    assert [p.rsplit("/", 1)[-1] for p in list_checkpoints(out)] == ["step_00000004", "step_00000006"]
    # sharded over two processes' devices equals one process, no mesh (float32 reductions in another order)
    _assert_same(dict(np.load(result)), straight, atol=1e-5)
    single = make_trainer(seed=42)  # and the two-process checkpoint restores into one process
    assert single.restore_latest(out) and single.step == TC.steps
    _assert_same(single.params, straight, atol=1e-5)
