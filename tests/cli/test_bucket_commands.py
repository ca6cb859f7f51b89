"""The commands a Cloud TPU user runs, on `gs://` paths (the GCS emulator of `tests/helpers/gcs.py`):
export the demo model to Hugging Face, upload it, then `convert` bucket to bucket, `info`, `verify`,
`generate --checkpoint gs://...` (the local checkpoint's greedy text), `plan --model gs://...`'s config,
`train --init-from gs://... --out gs://...` and `--resume`, `serve --checkpoint gs://...`."""

from __future__ import annotations

import json
import os

import pytest

import mixtral_jax
from mixtral_jax.cli.main import main
from mixtral_jax.cli.model_flags import model_config
from mixtral_jax.convert import paths
from mixtral_jax.loading.demo import DEMO_CHECKPOINT as DEMO_PATH
from mixtral_jax.training.trainer import list_checkpoints
from tests.helpers.serve_process import post, serve_process

PROMPT = "The capital of France is"
GREEDY = ["--max-new-tokens", "6", "--temperature", "0"]


def _upload(local_dir: str, url: str) -> str:
    import gcsfs
    gcsfs.GCSFileSystem(token="anon").put(local_dir.rstrip("/") + "/", url.removeprefix("gs://"), recursive=True)
    return url


@pytest.fixture
def bucket_checkpoint(gcs_bucket, tmp_path, capsys):
    hf = str(tmp_path / "demo-hf")
    assert main(["export", DEMO_PATH, hf, "--format", "hf", "--no-progress"]) == 0
    src, dst = _upload(hf, f"{gcs_bucket}/demo-hf"), f"{gcs_bucket}/demo"
    assert main(["convert", src, dst, "--no-progress"]) == 0
    capsys.readouterr()
    return src, dst


@pytest.mark.slow
def test_commands_on_bucket_paths(bucket_checkpoint, gcs_bucket, tmp_path, capsys):
    src, ck = bucket_checkpoint
    assert main(["info", ck]) == 0
    assert "complete   yes" in capsys.readouterr().out
    assert main(["verify", src, ck, "--no-progress"]) == 0
    assert "bit for bit" in capsys.readouterr().out
    assert model_config(ck) == mixtral_jax.load(DEMO_PATH).config  # what `plan --model gs://...` compiles

    assert main(["generate", "--checkpoint", ck, *GREEDY, PROMPT]) == 0
    from_bucket = capsys.readouterr().out
    assert main(["generate", "--checkpoint", DEMO_PATH, *GREEDY, PROMPT]) == 0
    assert from_bucket == capsys.readouterr().out and PROMPT in from_bucket

    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}: the quick brown fox."}) + "\n" for i in range(40)))
    out = f"{gcs_bucket}/run"
    train = ["train", "--data", str(data), "--out", out, "--init-from", ck, "--batch", "2", "--seq-len", "16",
             "--lr", "1e-4", "--warmup", "0", "--quiet"]
    assert main([*train, "--steps", "2"]) == 0
    assert [paths.basename(p) for p in list_checkpoints(out)] == ["step_00000002"]
    assert main([*train, "--steps", "3", "--resume"]) == 0
    assert [paths.basename(p) for p in list_checkpoints(out)] == ["step_00000002", "step_00000003"]
    assert "3 steps" in mixtral_jax.convert.orbax_io.read_info(f"{out}/final").metadata["source"]["layout"]
    assert not os.path.exists("gs:")

    with serve_process("--checkpoint", ck, "--max-batch", "2") as (_, base, _):
        status, answer, _ = post(base, "/v1/completions", {"model": "demo", "prompt": PROMPT, "max_tokens": 6,
                                                           "temperature": 0})
    assert status == 200, answer
    assert answer["model"] == "demo"  # the checkpoint folder's name, not a local path made of the URL
    assert answer["choices"][0]["text"].strip() and answer["choices"][0]["text"] in from_bucket
