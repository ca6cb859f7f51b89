"""LoRA fine-tuning: only adapters train (float or int8 base), on a mesh as on one device, resumable from
checkpoints that hold the adapters alone; chat data masks the prompts, as mistral-common encodes them and as
transformers' `labels=-100` scores them; a LoRA run on the demo model lowers the loss of a held-out task."""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import mixtral_jax
from mixtral_jax import MixtralConfig, RuntimeConfig
from mixtral_jax.config import ConfigError
from mixtral_jax.convert import peft as peft_io
from mixtral_jax.model import lora
from mixtral_jax.model.placement import quantize_model
from mixtral_jax.text.tokenizer import load_tokenizer
from mixtral_jax.training.data import ChatDataset, encode_conversation, load_dataset
from mixtral_jax.training.trainer import TrainConfig, Trainer, list_checkpoints, loss_terms
from tests.helpers.hf_reference import hf_model, save_hf

SMALL = MixtralConfig.tiny(n_layers=1)
DENSE = RuntimeConfig(moe_strategy="dense")
LC = lora.LoRAConfig(rank=4, alpha=8.0, targets=lora.ALL_TARGETS)
TC = TrainConfig(steps=6, batch_size=4, seq_len=16, lr=5e-2, warmup_steps=1, lora=LC)


def _batch(seed=0, shape=(4, 16), vocab=128):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _model(seed=0, config=SMALL, runtime=DENSE):
    return mixtral_jax.Mixtral(config, runtime, rngs=nnx.Rngs(seed))


def _data(seed=0, n=4, seq_len=16):
    return mixtral_jax.PackedDataset.from_tokens(_batch(seed, (n, seq_len)).reshape(-1), seq_len, shuffle=False)


def test_only_the_adapters_train_and_the_loss_falls():
    trainer = Trainer(_model(), TC)
    assert set(trainer.params) == set(lora.adapter_specs(SMALL, LC))
    base = {k: np.asarray(v) for k, v in trainer.frozen.items()}
    history = trainer.fit(_data())
    assert history[-1]["ce"] < history[0]["ce"] - 0.3
    for k, v in trainer.frozen.items():
        np.testing.assert_array_equal(np.asarray(v), base[k])
    assert all(np.abs(np.asarray(v)).max() > 0 for k, v in trainer.params.items() if k.endswith(lora.B_SUFFIX))
    n_adapter = sum(v.size for v in trainer.params.values())
    assert n_adapter < 0.25 * sum(v.size for v in trainer.frozen.values())
    # the optimizer state is the adapters' alone: AdamW's moments are two copies of them
    moments = [x for x in jax.tree.leaves(trainer.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * n_adapter


def test_int8_base_trains_float_adapters():
    trainer = Trainer(quantize_model(_model(runtime=RuntimeConfig(moe_strategy="ragged"))), TC)
    assert any(v.dtype == np.int8 for v in trainer.frozen.values())
    history = trainer.fit(_data())
    assert history[-1]["ce"] < history[0]["ce"] - 0.3
    with pytest.raises(ConfigError, match="LoRA"):
        Trainer(quantize_model(_model()), TrainConfig(**{**TC.to_dict(), "lora": None}))


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs the 8-device CPU mesh from conftest.py")
def test_mesh_step_equals_one_device():
    one = Trainer(_model(runtime=RuntimeConfig(moe_strategy="ragged")), TrainConfig(**{**TC.to_dict(), "steps": 2}))
    mesh = Trainer(_model(runtime=RuntimeConfig(moe_strategy="ragged")),
                   TrainConfig(**{**TC.to_dict(), "steps": 2, "mesh": "data=2,expert=2,tensor=2"}))
    assert mesh.params["layers.0.moe.w1_lora_a"].sharding.spec[0] == "expert"
    h1, h2 = one.fit(_data()), mesh.fit(_data())
    np.testing.assert_allclose([m["loss"] for m in h2], [m["loss"] for m in h1], rtol=1e-5)
    for k in one.params:
        np.testing.assert_allclose(np.asarray(mesh.params[k]), np.asarray(one.params[k]), atol=1e-5, err_msg=k)


def test_resume_equals_uninterrupted_and_checkpoints_hold_adapters_only(tmp_path):
    data = mixtral_jax.PackedDataset.from_tokens(_batch(5, (6, 16)).reshape(-1), 16, seed=3)
    tc = TrainConfig(**{**TC.to_dict(), "save_every": 2})
    straight = Trainer(_model(), tc)
    straight.fit(data)
    first = Trainer(_model(), tc)
    first.fit(data, tmp_path / "run", stop_at=3)
    del first
    step = list_checkpoints(tmp_path / "run")[-1]
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(step) for f in fs)
    base_bytes = sum(v.nbytes for v in straight.frozen.values())
    adapter_bytes = sum(v.nbytes for v in straight.params.values())
    assert size < 3 * adapter_bytes + 200_000 < base_bytes  # adapters + two moments + metadata, no base

    resumed = Trainer(_model(), tc)  # the same base; fresh adapters: they must come from disk
    assert resumed.restore_latest(tmp_path / "run")
    resumed.fit(data, tmp_path / "run")
    for name in straight.params:
        np.testing.assert_array_equal(np.asarray(resumed.params[name]), np.asarray(straight.params[name]))
    with pytest.raises(ValueError, match="another base model"):
        Trainer(_model(seed=5), tc).restore_latest(tmp_path / "run")

    # the export is a PEFT adapter that puts the same adapters on the base
    out = resumed.export(tmp_path / "adapter")
    model = peft_io.load_peft(_model(), out)
    tokens = _batch(7, (2, 10))
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(resumed.model()(tokens)), atol=1e-6)
    merged = mixtral_jax.load(resumed.export(tmp_path / "merged", merge=True), moe_strategy="dense")
    np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(resumed.model()(tokens)), atol=2e-5)


# ------------------------------------------------------------------------------------------ chat data
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]


def test_chat_encoding_equals_mistral_common_finetuning_and_masks_the_prompts():
    pytest.importorskip("mistral_common")
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = importlib.resources.files("mistral_common").joinpath("data/tokenizer.model.v1")
    ref = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
    tok = load_tokenizer()
    ids, mask = encode_conversation(CONVERSATION, tok)
    assert ids == ref.encode_chat_completion(ChatCompletionRequest(messages=CONVERSATION)).tokens
    targets = [i for i, m in zip(ids, mask, strict=True) if m]
    assert targets == tok.encode("Hello there", bos=False) + [2] + tok.encode("4", bos=False) + [2]
    # the prompt before each answer is exactly what generation would be given
    first = mask.index(1)
    assert ids[:first] == tok.encode_chat(CONVERSATION[:2])


def test_masked_loss_equals_transformers_labels(tmp_path):
    config = MixtralConfig.tiny(n_layers=1)
    hf = hf_model(config, seed=2)
    ours = mixtral_jax.load_hf(save_hf(hf, tmp_path / "hf"), dtype="float32", show_progress=False)
    tokens = _batch(1, (2, 12))
    mask = np.zeros_like(tokens)
    mask[0, 5:9] = 1
    mask[1, 2:12] = 1
    _, metrics = loss_terms(ours, tokens, 0.0, loss_mask=mask)
    labels = np.where(mask == 1, tokens, -100).astype(np.int64)
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens), labels=torch.as_tensor(labels)).loss.item()
    np.testing.assert_allclose(float(metrics["ce"]), ref, rtol=1e-5)


def test_chat_dataset_rows_and_errors(tmp_path):
    tok = load_tokenizer()
    good = tmp_path / "chat.jsonl"
    good.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(3)))
    data = load_dataset([good], 64)
    assert isinstance(data, ChatDataset) and data.tokens.shape == (3, 64)
    tokens, mask = data.batch(0, 2)
    ids, m = encode_conversation(CONVERSATION, tok)
    assert tokens[0, :len(ids)].tolist() == ids and mask[0].tolist() == m + [0] * (64 - len(ids))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    with pytest.raises(mixtral_jax.errors.DataError, match=r"bad.jsonl:1: .*no assistant"):
        load_dataset([bad], 64)
    mixed = tmp_path / "text.jsonl"
    mixed.write_text(json.dumps({"text": "plain"}) + "\n")
    with pytest.raises(mixtral_jax.errors.DataError, match="mix of chat"):
        load_dataset([good, mixed], 64)


def _cli_args(tmp_path, *extra):
    from mixtral_jax.cli import train as train_command

    parser = argparse.ArgumentParser()
    train_command.register(parser.add_subparsers())
    return parser.parse_args(["train", "--out", str(tmp_path / "out"), "--quiet", *extra])


def test_train_command_with_lora(tmp_path):
    from mixtral_jax.cli.train import run_train

    config = MixtralConfig.tiny(vocab_size=32000, n_layers=1)
    base = mixtral_jax.Mixtral(config, rngs=nnx.Rngs(0))
    base_dir = tmp_path / "base"
    Trainer(base, TrainConfig(steps=1, batch_size=1, seq_len=8, warmup_steps=0)).export(base_dir)
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(8)))
    common = ["--data", str(tmp_path / "chat.jsonl"), "--init-from", str(base_dir), "--batch", "2", "--seq-len", "40",
              "--lr", "1e-2", "--warmup", "0", "--lora", "4", "--lora-targets", "q_proj", "v_proj", "w2"]
    assert run_train(_cli_args(tmp_path, *common, "--steps", "2")) == 0
    final = tmp_path / "out" / "final"
    cfg = json.loads((final / peft_io.CONFIG_FILE).read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["target_modules"] == ["q_proj", "v_proj", "w2"]
    assert run_train(_cli_args(tmp_path, *common, "--steps", "3", "--resume")) == 0
    assert os.path.basename(list_checkpoints(tmp_path / "out")[-1]) == "step_00000003"
    with pytest.raises(ConfigError, match="--lora"):
        run_train(_cli_args(tmp_path, "--data", str(tmp_path / "chat.jsonl"), "--merge"))


@pytest.mark.slow
def test_lora_on_the_demo_model_lowers_held_out_loss_on_an_unseen_task(capsys):
    """The demo model was trained on Python source; the task (answer with the words of a list in reverse
    order) is new to it. The held-out conversations are lists that no training conversation holds."""
    from mixtral_jax.loading.demo import DEMO_CHECKPOINT, has_trained_model

    if not has_trained_model():
        pytest.skip("the demo model checkpoint is not in this tree")
    train, held_out = reverse_words_task()
    tok = load_tokenizer()
    tc = TrainConfig(steps=80, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=5, weight_decay=0.0,
                     lora=lora.LoRAConfig(rank=8, alpha=16.0, targets=lora.ALL_TARGETS))
    trainer = Trainer(mixtral_jax.load(DEMO_CHECKPOINT, dtype="float32"), tc)
    train_data = ChatDataset.from_conversations(train, tc.seq_len, tok, seed=0)
    held = ChatDataset.from_conversations(held_out, tc.seq_len, tok, shuffle=False)
    before = trainer.evaluate(held)
    trainer.fit(train_data)
    after = trainer.evaluate(held)
    with capsys.disabled():
        print(f"\ndemo model + LoRA r=8 (attention + experts), {tc.steps} steps of {tc.batch_size}: held-out "
              f"answer loss {before:.3f} -> {after:.3f} nats/token ({len(held_out)} conversations)")
    assert after < 0.7 * before  # measured: 11.95 -> 7.66


WORDS = ("apple river stone cloud green night paper window silver garden bridge candle forest market orange "
         "pencil rabbit summer thunder violet yellow zebra anchor basket castle dragon engine feather guitar "
         "harbor island jacket kettle ladder meadow needle ocean pillow quartz rocket saddle tunnel").split()


def reverse_words_task(n_train=640, n_held=40, seed=0):
    """Conversations 'Reverse: a b c' -> 'c b a' over 3-4 of 42 words; no held-out list is a training one."""
    rng = np.random.default_rng(seed)
    lists: dict[tuple, None] = {}
    while len(lists) < n_train + n_held:
        lists[tuple(rng.choice(WORDS, size=int(rng.integers(3, 5)), replace=False))] = None

    def conv(words):
        return [{"role": "user", "content": "Reverse: " + " ".join(words)},
                {"role": "assistant", "content": " ".join(reversed(words))}]

    convs = [conv(w) for w in lists]
    return convs[:n_train], convs[n_train:]


@pytest.mark.tpu
def test_plan_of_a_lora_step_holds_the_adapters_optimizer_state_only():
    """`plan --train ... --lora`: compiled for a TPU slice, a LoRA step's arguments are the base once plus the
    adapters and their two moments (full training: three copies of every weight), and an int8 base is allowed."""
    pytest.importorskip("libtpu")
    from mixtral_jax.planning import planner as plan_lib

    config = MixtralConfig.tiny(dim=256, head_dim=128, hidden_dim=512, vocab_size=512)
    full, low = plan_lib.plan(config, "v5e-4", "expert=2,tensor=2", [plan_lib.train(4, 64),
                                                                     plan_lib.train(4, 64, lora_rank=8)])
    adapters = sum(int(np.prod(s.shape)) * 4 for s in lora.adapter_specs(
        config, lora.LoRAConfig(rank=8, alpha=16.0, targets=lora.ALL_TARGETS)).values())
    assert low.weight_bytes > full.weight_bytes  # the base and the adapters
    assert low.argument_bytes < 0.5 * full.argument_bytes
    assert low.alias_bytes < full.alias_bytes  # only the adapters and their moments are donated and updated
    assert low.workload.label == "train 4x64 lora 8" and adapters < low.weight_bytes
    (q,) = plan_lib.plan(config, "v5e-4", "expert=2,tensor=2", [plan_lib.train(4, 64, lora_rank=8)], quantize="int8")
    assert q.weight_bytes < low.weight_bytes
    with pytest.raises(plan_lib.PlanError, match="LoRA"):
        plan_lib.plan(config, "v5e-4", "expert=2,tensor=2", [plan_lib.train(4, 64)], quantize="int8")
