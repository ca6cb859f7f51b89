"""A real GCS JSON API on this machine: `gcp-storage-emulator` (pure Python, in the test extra) on a free port,
started through `gcs_emulator.py` (which adds the generation headers GCS sends with every download).

The `gcs_bucket` fixture starts one emulator for the session (in memory, bucket `test-bucket`) and points
both clients at it through the environment, which subprocesses inherit:

- tensorstore (Orbax's array I/O): `TENSORSTORE_GCS_HTTP_URL`;
- gcsfs (`etils.epath` and fsspec for everything else): `STORAGE_EMULATOR_HOST`, anonymous credentials
  (no metadata server: `NO_GCE_CHECK`), and `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` (otherwise gcsfs
  first asks the bucket's type over gRPC, which the emulator does not speak: a 60 s timeout per bucket).

The gcsfs switch is read when gcsfs is imported, so it is set when this module is imported (before any
test touches a `gs://` path). Each test gets its own prefix: `gs://test-bucket/<test name>-<n>`.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers.processes import free_port

BUCKET = "test-bucket"
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
_counter = itertools.count()


@pytest.fixture(scope="session")
def gcs_emulator():
    """The emulator's URL, with the environment pointing tensorstore and gcsfs at it."""
    pytest.importorskip("gcp_storage_emulator", reason="the gcs extra is not installed")
    pytest.importorskip("gcsfs", reason="the gcs extra is not installed")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "gcs_emulator.py"), "start",
                             "--host", "127.0.0.1",
                             "--port", str(port), "--in-memory", "--default-bucket", BUCKET],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the GCS emulator did not start") from None
            time.sleep(0.1)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "NO_GCE_CHECK": "true",
           "GOOGLE_CLOUD_PROJECT": "test", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def gcs_bucket(gcs_emulator, request):
    """A fresh `gs://` prefix in the emulator's bucket for one test."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    return f"gs://{BUCKET}/{name}-{next(_counter)}"
