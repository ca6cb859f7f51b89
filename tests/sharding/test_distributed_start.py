"""Every `mixtral-jax` command started from a Python process that has initialized JAX with libtpu installed
and no `JAX_PLATFORMS` (a notebook's `!mixtral-jax ...`, a script, a test harness) runs as one process.

The parent's libtpu writes warning sentences into `TPU_WORKER_ID` / `CLOUD_TPU_TASK_ID`, which the children
inherit; these once made every command fail with `coordinator_address should be defined`. The parent here
checks that the trigger is really present, then runs each command with a cheap invocation that does real
work (so it gets past `initialize()` in `cli.main`), a few at a time."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mixtral_jax import MixtralConfig
from mixtral_jax.cli.main import build_parser
from tests.helpers import REPO_ROOT
from tests.helpers.hf_reference import hf_model, save_hf

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
DEMO = os.path.join(REPO_ROOT, "mixtral_jax", "assets", "demo_model")

PARENT = textwrap.dedent(r"""
    import concurrent.futures, json, os, socket, subprocess, sys, time, urllib.request
    import jax
    assert "JAX_PLATFORMS" not in os.environ
    jax.devices()  # initializes the backends: libtpu is tried and writes its warnings into this environment
    exe, tmp, jobs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    probe = subprocess.run([sys.executable, "-c", "import os, json; print(json.dumps(dict(os.environ)))"],
                           capture_output=True, text=True)
    child_env = json.loads(probe.stdout)
    out = {"trigger": child_env.get("CLOUD_TPU_TASK_ID", ""), "jax_platforms": child_env.get("JAX_PLATFORMS"),
           "results": {}}

    def serve(args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        p = subprocess.Popen([exe, "serve", "--port", str(port), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        health, deadline = None, time.time() + 120
        while health is None and p.poll() is None and time.time() < deadline:
            time.sleep(0.5)
            try:
                health = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read().decode()
            except OSError:
                pass
        p.terminate()
        stdout, stderr = p.communicate(timeout=60)
        return health is not None and json.loads(health) == {"status": "ok"}, stdout, stderr

    def run(job):
        name, args, stdin = job
        if name == "serve":
            ok, stdout, stderr = serve(args)
            return name, (0 if ok else 1), stdout, stderr
        r = subprocess.run([exe, name, *args], input=stdin, capture_output=True, text=True, timeout=300)
        return name, r.returncode, r.stdout, r.stderr

    chains = {}
    for job in jobs:  # jobs sharing a group run in order (convert before verify and export)
        chains.setdefault(job[3], []).append(job[:3])
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for results in pool.map(lambda chain: [run(j) for j in chain], chains.values()):
            for name, rc, stdout, stderr in results:
                out["results"][name] = {"rc": rc, "stdout": stdout[-2000:], "stderr": stderr[-3000:]}
    print(json.dumps(out))
""")


def _commands() -> set[str]:
    parser = build_parser()
    return set(next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices)


def test_every_command_starts_single_from_a_jax_parent(tmp_path):
    hf = save_hf(hf_model(MixtralConfig.tiny(), seed=3), tmp_path / "hf")
    (tmp_path / "data.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    ck, t = str(tmp_path / "ck"), str(tmp_path)
    jobs = [  # (command, arguments, stdin, group)
        ("info", [DEMO], None, "a"),
        ("generate", ["def f():", "--max-new-tokens", "2"], None, "a"),
        ("chat", ["--max-new-tokens", "2"], "hello\n", "a"),
        ("convert", [hf, ck, "--no-progress"], None, "b"),
        ("verify", [hf, ck, "--no-progress"], None, "b"),
        ("export", [ck, os.path.join(t, "exported"), "--format", "hf", "--no-progress"], None, "b"),
        ("train", ["--data", os.path.join(t, "data.txt"), "--out", os.path.join(t, "run"), "--steps", "1",
                   "--batch", "1", "--seq-len", "16", "--config", "tiny", "--quiet"], None, "c"),
        ("plan", ["--topology", "v5e-4", "--mesh", "expert=4", "--model", "tiny", "--prefill", "16",
                  "--decode-batch", "1", "--context", "32"], None, "b"),
        ("serve", ["--no-warmup"], None, "c"),
    ]
    assert {j[0] for j in jobs} == _commands(), "a new command: give it a cheap invocation here"
    env = {k: v for k, v in os.environ.items()
           if k != "JAX_PLATFORMS" and not k.startswith(("TPU_", "CLOUD_TPU_", "MIXTRAL_JAX_", "SLURM_"))}
    exe = os.path.join(os.path.dirname(sys.executable), "mixtral-jax")
    parent = subprocess.run([sys.executable, "-c", PARENT, exe, t, json.dumps(jobs)], env=env, capture_output=True,
                            text=True, timeout=600, cwd=t)
    assert parent.returncode == 0, parent.stderr[-3000:]
    out = json.loads(parent.stdout.splitlines()[-1])
    assert out["jax_platforms"] is None
    assert out["trigger"].startswith("WARNING"), f"libtpu no longer sets the bogus CLOUD_TPU_TASK_ID: {out['trigger']}"
    for name, r in out["results"].items():
        assert "coordinator_address" not in r["stderr"], (name, r["stderr"])
        assert r["rc"] == 0, (name, r["stderr"])
    assert "complete   yes" in out["results"]["info"]["stdout"]
    assert out["results"]["verify"]["stdout"].startswith("OK: all")
    assert os.path.isfile(os.path.join(t, "exported", "config.json"))
    assert "per chip (GiB)" in out["results"]["plan"]["stdout"]
