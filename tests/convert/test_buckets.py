"""Checkpoints in a bucket, against a real GCS JSON API (`tests/helpers/gcs.py`: gcp-storage-emulator, with
tensorstore and gcsfs pointed at it): convert into it, load from it (the local checkpoint's logits), verify
and describe it, read the sources from it (ranged reads), and a conversion killed mid-way leaves nothing
that loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from mixtral_jax import MixtralConfig
from mixtral_jax.cli.info import describe
from mixtral_jax.convert import convert, orbax_io, paths
from mixtral_jax.convert.converter import open_source
from mixtral_jax.convert.verify import verify
from mixtral_jax.errors import CheckpointError
from mixtral_jax.loading.checkpoint import load, load_checkpoint
from tests.helpers.hf_reference import hf_logits, hf_model, save_hf
from tests.helpers.mistral_reference import save_mistral

CONFIG = MixtralConfig.tiny()
TOKENS = np.random.default_rng(1).integers(0, CONFIG.vocab_size, (2, 11))


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    model = hf_model(CONFIG, seed=0)
    return model, save_hf(model, tmp_path_factory.mktemp("hf") / "hf"), hf_logits(model, TOKENS)


def _upload(local_dir, url):
    import gcsfs
    fs = gcsfs.GCSFileSystem(token="anon")
    for name in os.listdir(local_dir):
        fs.put_file(os.path.join(local_dir, name), url.removeprefix("gs://") + "/" + name)
    return url


def test_convert_into_a_bucket_loads_verifies_and_describes(hf_source, gcs_bucket, tmp_path):
    _, src, reference = hf_source
    dst = f"{gcs_bucket}/mixtral"
    report = convert(src, dst, show_progress=False, buffer_bytes=64 << 10)
    assert report.dst == dst  # not made into a local folder
    assert not os.path.exists("gs:") and not (tmp_path / "gs:").exists()
    names = paths.listdir(dst)
    assert {orbax_io.MARKER_FILE, orbax_io.METADATA_FILE, orbax_io.PARTS_INDEX, orbax_io.PARTS_DIR} <= set(names)
    parts = paths.listdir(paths.join(dst, orbax_io.PARTS_DIR))
    assert len(parts) > 1  # streamed a group at a time
    assert all("commit_success.txt" in paths.listdir(paths.join(dst, "parts", p)) for p in parts)

    local = str(tmp_path / "local")
    convert(src, local, show_progress=False)
    from_bucket = np.asarray(load(dst, moe_strategy="dense")(TOKENS))
    np.testing.assert_array_equal(from_bucket, np.asarray(load(local, moe_strategy="dense")(TOKENS)))
    np.testing.assert_allclose(from_bucket, reference, atol=1e-4)
    assert "bit for bit" in str(verify(src, dst, show_progress=False))
    d = describe(dst)
    assert d["complete"] == "yes" and "mixtral-jax Orbax" in d["format"] and "files" in d["size"]
    with pytest.raises(CheckpointError, match="already exists"):
        convert(src, dst, show_progress=False)
    convert(src, dst, show_progress=False, overwrite=True, dtype="bfloat16")  # replaced in place
    assert orbax_io.read_info(dst).dtype.name == "bfloat16"


@pytest.mark.parametrize("kind", ["hf", "mistral_safetensors"])
def test_sources_read_from_a_bucket_with_ranged_reads(hf_source, gcs_bucket, tmp_path, kind):
    model, src, reference = hf_source
    if kind == "mistral_safetensors":
        src = save_mistral(model, CONFIG, str(tmp_path / "mistral"), file_format="safetensors")
    url = _upload(src, f"{gcs_bucket}/src")
    source = open_source(url)
    assert all(f.remote for f in source.tensors.files)  # read through ranged requests, no local copy
    dst = str(tmp_path / "dst")
    convert(url, dst, show_progress=False)
    verify(src, dst, show_progress=False)  # equal to the local source's conversion, bit for bit
    np.testing.assert_allclose(np.asarray(load(dst, moe_strategy="dense")(TOKENS)), reference, atol=1e-4)
    if kind == "hf":  # load_checkpoint reads a bucket's Hugging Face directory directly too
        np.testing.assert_allclose(np.asarray(load_checkpoint(url, moe_strategy="dense")(TOKENS)), reference,
                                   atol=1e-4)
        assert describe(url)["complete"] == "yes"


_KILL_SCRIPT = """
import os, signal, sys
from mixtral_jax.convert import convert, orbax_io
real_flush, count = orbax_io.StreamingWriter.flush, [0]
def flush(self):
    real_flush(self)
    self.wait()
    count[0] += 1
    if count[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
orbax_io.StreamingWriter.flush = flush
convert(sys.argv[1], sys.argv[2], overwrite=sys.argv[4] == "1", show_progress=False, buffer_bytes=1)
"""


def test_a_conversion_killed_midway_leaves_nothing_that_loads(hf_source, gcs_bucket):
    _, src, _ = hf_source
    dst = f"{gcs_bucket}/killed"

    def killed_conversion(after_groups, overwrite):
        r = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, src, dst, str(after_groups), str(int(overwrite))],
                           capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]

    killed_conversion(after_groups=5, overwrite=False)
    assert len(paths.listdir(paths.join(dst, orbax_io.PARTS_DIR))) == 5  # pieces were written to the bucket ...
    with pytest.raises(CheckpointError, match="not a complete mixtral-jax checkpoint"):
        load(dst)  # ... but nothing loads
    with pytest.raises(CheckpointError):
        describe(dst)
    convert(src, dst, show_progress=False)  # a rerun replaces the dead writer's leftovers unasked
    verify(src, dst, show_progress=False)

    killed_conversion(after_groups=3, overwrite=True)  # an --overwrite run: the old marker goes first
    with pytest.raises(CheckpointError, match="not a complete mixtral-jax checkpoint"):
        load(dst)
