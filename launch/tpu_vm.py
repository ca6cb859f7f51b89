#!/usr/bin/env python3
"""Run mixtral-jax on a Cloud TPU VM slice: create it, install the project on every worker, run commands.

    python launch/tpu_vm.py setup      --name mixtral --zone us-east5-a --accelerator-type v5p-128
    python launch/tpu_vm.py convert    --name mixtral --zone us-east5-a \\
        gs://my-bucket/Mixtral-8x7B-v0.1 gs://my-bucket/mixtral-orbax
    python launch/tpu_vm.py generate   --name mixtral --zone us-east5-a --accelerator-type v5p-128 \\
        "The capital of France is" --checkpoint gs://my-bucket/mixtral-orbax --mesh data=8,expert=8
    python launch/tpu_vm.py chat-serve ... --checkpoint gs://my-bucket/mixtral-orbax --mesh data=8,expert=8
    python launch/tpu_vm.py finetune   ... <arguments of `mixtral-jax train`>
    python launch/tpu_vm.py teardown   --name mixtral --zone us-east5-a

Why a launcher: on a multi-host slice every worker must run the same command at the same time (each
worker's process drives its own chips and `jax.distributed` joins them; `mixtral-jax` detects the TPU
VM and initialises itself). `gcloud compute tpus tpu-vm ssh --worker=all --command=...` does that, but
the command goes through two shells (yours, then the worker's), so prompts with quotes, spaces or `$`
must be quoted twice; this script builds every command as an argument list and quotes it with `shlex`.
Everything is validated (slice, zone, TPU name, project, mesh against the slice's chips) before any
command runs. `--dry-run` prints the exact commands, one per line, and runs nothing.

Arguments this script does not know are passed on to `mixtral-jax` unchanged (use `--` before them if
one looks like an option of this script). --name, --zone, --accelerator-type and --project may also
come from MIXTRAL_TPU_NAME, MIXTRAL_TPU_ZONE, MIXTRAL_TPU_TYPE and MIXTRAL_TPU_PROJECT.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass

VENV = "mixtral-jax-venv"  # on each worker, relative to the ssh user's home directory
SRC = "mixtral-jax-src"
MIXTRAL = f"{VENV}/bin/mixtral-jax"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARBALL = os.path.join(tempfile.gettempdir(), f"{SRC}.tar.gz")


class LaunchError(ValueError):
    """A bad flag or a failed step; printed as one line."""


# ---------------------------------------------------------------------------------------------- validation

@dataclass(frozen=True)
class Slice:
    accelerator: str  # what gcloud calls it (the v5e alias resolved)
    chips: int  # JAX devices: one per chip (v4 and v5p chips have two TensorCores as one megacore device)
    hosts: int  # TPU VM workers
    runtime: str  # default --version (TPU software image)


# generation -> (accelerator-type prefix, chips per N, valid N, default runtime, chips per host when multi-host)
_GENERATIONS = {
    "v4": ("v4", 0.5, lambda n: n % 8 == 0 and 8 <= n <= 4096, "tpu-ubuntu2204-base", 4),
    "v5p": ("v5p", 0.5, lambda n: n % 8 == 0 and 8 <= n <= 12288, "v2-alpha-tpuv5", 4),
    "v5litepod": ("v5litepod", 1, lambda n: n in (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv5-lite", 4),
    "v5e": ("v5litepod", 1, lambda n: n in (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv5-lite", 4),
    "v6e": ("v6e", 1, lambda n: n in (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv6e", 4),
}
_KNOWN = "v4-8 .. v4-4096, v5p-8 .. v5p-12288 (multiples of 8), v5litepod-N / v5e-N or v6e-N (N = 1, 4, 8, ..., 256)"


def parse_accelerator(name: str) -> Slice:
    """`v5p-128` -> 64 chips on 16 hosts. v4/v5p count TensorCores (2 per chip); v5e/v6e count chips."""
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name or "")
    if not m or not _GENERATIONS[m[1]][2](int(m[2])):
        raise LaunchError(f"unknown TPU accelerator type {name!r}; expected one of {_KNOWN}")
    prefix, chips_per_n, _, runtime, per_host = _GENERATIONS[m[1]]
    chips = int(int(m[2]) * chips_per_n)
    single_host = 4 if prefix in ("v4", "v5p") else 8
    return Slice(f"{prefix}-{m[2]}", chips, 1 if chips <= single_host else chips // per_host, runtime)


def check_zone(zone: str) -> str:
    if not re.fullmatch(r"[a-z]+-[a-z]+[0-9]+-[a-z]", zone or ""):
        raise LaunchError(f"bad zone {zone!r}: expected REGION-ZONE such as us-central2-b or europe-west4-a")
    return zone


def check_tpu_name(name: str) -> str:
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name or ""):
        raise LaunchError(f"bad TPU name {name!r}: use 1-63 lowercase letters, digits and hyphens, starting with a "
                          f"letter and not ending with a hyphen")
    return name


def check_project(project: str | None) -> str | None:
    if project is not None and not re.fullmatch(r"([a-z][-a-z0-9.]*[a-z0-9]:)?[a-z][-a-z0-9]{4,28}[a-z0-9]", project):
        raise LaunchError(f"bad project id {project!r}: 6-30 lowercase letters, digits and hyphens, starting with a "
                          f"letter")
    return project


def check_gcs(path: str) -> str:
    if not re.fullmatch(r"gs://[a-z0-9][-a-z0-9._]{1,220}[a-z0-9](/\S*)?", path or ""):
        raise LaunchError(f"bad GCS path {path!r}: expected gs://BUCKET/PATH")
    return path.rstrip("/")


def check_mesh(spec: str, tpu: Slice) -> str:
    """The mesh must cover exactly the slice's chips (every process sees all of them as jax.devices())."""
    try:
        from mixtral_jax.sharding import parse_mesh_spec
    except ImportError:
        raise LaunchError("checking --mesh needs mixtral-jax here too: run this script with the project's "
                          "Python (pip install -e . in this checkout)") from None
    try:
        parse_mesh_spec(spec, tpu.chips)
    except ValueError as e:
        raise LaunchError(f"{e} ({tpu.accelerator} has {tpu.chips} chips)") from None
    return spec


def mesh_of(args: list[str]) -> str | None:
    """The value of `--mesh X` / `--mesh=X` among the arguments passed on to mixtral-jax."""
    for i, a in enumerate(args):
        if a == "--mesh":
            if i + 1 == len(args):
                raise LaunchError("--mesh needs a value such as data=8,expert=8")
            return args[i + 1]
        if a.startswith("--mesh="):
            return a.split("=", 1)[1]
    return None


# ------------------------------------------------------------------------------------------------ commands

class Gcloud:
    """Builds `gcloud compute tpus tpu-vm ...` argument lists and runs (or, in dry-run, prints) them."""

    def __init__(self, name: str, zone: str, project: str | None, dry_run: bool):
        self.name, self.dry_run = name, dry_run
        self.where = [f"--zone={zone}"] + ([f"--project={project}"] if project else [])

    def tpu(self, verb: str, *args: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *self.where]

    def ssh(self, command: str, worker: str = "all", tty: bool = False) -> list[str]:
        return self.tpu("ssh", self.name, f"--worker={worker}", f"--command={command}") + (["--", "-t"] if tty else [])

    def scp(self, local: str, remote: str, worker: str = "all") -> list[str]:
        return self.tpu("scp", local, f"{self.name}:{remote}", f"--worker={worker}")

    def run(self, argv: list[str], capture: bool = False) -> subprocess.CompletedProcess:
        if self.dry_run:
            print(shlex.join(argv), flush=True)
            return subprocess.CompletedProcess(argv, 0, "", "")
        print("+", shlex.join(argv), file=sys.stderr, flush=True)
        try:
            return subprocess.run(argv, text=True, capture_output=capture)
        except FileNotFoundError:
            raise LaunchError("gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)") from None

    def must(self, argv: list[str]) -> None:
        if (rc := self.run(argv).returncode) != 0:
            raise LaunchError(f"{argv[4]} failed with exit status {rc}")

    def note(self, text: str) -> None:
        """A line that says what happens locally or conditionally; a shell comment, so output stays a script."""
        print(f"# {text}", file=sys.stdout if self.dry_run else sys.stderr, flush=True)


def remote(*argv: str) -> str:
    """One command for the worker's shell: each argument quoted once, so it arrives exactly as given."""
    return shlex.join(argv)


def pack_source(path: str = TARBALL) -> str:
    """A tarball of this checkout as git sees it (tracked + untracked-but-not-ignored files: no .venv)."""
    try:
        listing = subprocess.run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                 check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise LaunchError(f"cannot list the files of {REPO} with git ({e}); pass --install WHEEL_OR_PIP_SPEC") from None
    with tarfile.open(path, "w:gz") as tar:
        for rel in filter(None, listing.split("\0")):
            if os.path.isfile(os.path.join(REPO, rel)):
                tar.add(os.path.join(REPO, rel), arcname=rel)
    return path


def setup_script(python: str, target: str, unpack: str | None) -> str:
    """Worker-side install: Python >= 3.11 (TPU images ship 3.10), a venv, jax[tpu] and the project."""
    py, apt = f"python{python}", "sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -q"
    steps = ["set -e",
             f"command -v {py} >/dev/null || {{ {apt} update && {apt} install -y {py} {py}-venv; }}",
             f"test -x {VENV}/bin/pip || {py} -m venv {VENV}",
             remote(f"{VENV}/bin/pip", "install", "-q", "-U", "pip")]
    if unpack:
        steps.append(f"rm -rf {SRC} && mkdir {SRC} && tar -xzf {shlex.quote(unpack)} -C {SRC}")
    steps += [remote(f"{VENV}/bin/pip", "install", "-q", "-U", "jax[tpu]", "gcsfs", target),
              f'{MIXTRAL} --help >/dev/null && echo "$(hostname): mixtral-jax ready"']
    return "; ".join(steps)


def cmd_setup(g: Gcloud, a, tpu: Slice) -> None:
    if not re.fullmatch(r"3\.1[1-9]", a.python):
        raise LaunchError(f"bad --python {a.python!r}: a version such as 3.11 or 3.12 (the project needs >= 3.11)")
    version = a.version or tpu.runtime
    describe = g.tpu("describe", g.name, "--format=value(acceleratorType)")
    found = g.run(describe, capture=True)
    if g.dry_run:
        g.note("only if the describe above fails (no such TPU):")
    if g.dry_run or found.returncode != 0:
        g.must(g.tpu("create", g.name, f"--accelerator-type={tpu.accelerator}", f"--version={version}",
                     "--scopes=https://www.googleapis.com/auth/cloud-platform", *(["--spot"] if a.spot else [])))
    elif found.stdout.strip().rsplit("/", 1)[-1] != tpu.accelerator:
        raise LaunchError(f"TPU {g.name!r} exists as {found.stdout.strip()!r}, not {tpu.accelerator}; "
                          f"tear it down or pick another --name")
    else:
        g.note(f"reusing the existing TPU {g.name}")
    if a.install and os.path.isfile(a.install):  # a wheel or sdist built here
        base = os.path.basename(a.install)
        g.must(g.scp(a.install, base))
        target, unpack = f"./{base}", None
    elif a.install:  # a pip requirement: git+https://..., mixtral-jax==X, a URL
        target, unpack = a.install, None
    else:  # this checkout, as a tarball
        g.note(f"pack the files git tracks in {REPO} into {TARBALL}")
        if not g.dry_run:
            pack_source()
        g.must(g.scp(TARBALL, f"{SRC}.tar.gz"))
        target, unpack = f"./{SRC}", f"{SRC}.tar.gz"
    g.must(g.ssh(setup_script(a.python, target, unpack)))


def cmd_convert(g: Gcloud, a, extra: list[str]) -> None:
    """Convert on worker 0, bucket to bucket: the source is read with ranged requests and the Orbax
    checkpoint written straight into DST (nothing is staged on the worker's small boot disk)."""
    src = check_gcs(a.src) if a.src.startswith("gs://") else a.src
    g.must(g.ssh(remote(MIXTRAL, "convert", src, check_gcs(a.dst), *extra), worker="0"))


def cmd_everywhere(g: Gcloud, subcommand: str, extra: list[str]) -> None:
    g.must(g.ssh(remote(MIXTRAL, subcommand, *extra)))


def cmd_chat_serve(g: Gcloud, extra: list[str], tpu: Slice) -> None:
    """Chat needs your terminal on worker 0; the other workers run the same command in the background."""
    command = remote(MIXTRAL, "chat", *extra)
    if tpu.hosts > 1:
        others = "1" if tpu.hosts == 2 else f"1-{tpu.hosts - 1}"
        g.note(f"workers {others} follow worker 0 (their output: ~/mixtral-jax-chat.log on each)")
        g.must(g.ssh(f"nohup {command} >mixtral-jax-chat.log 2>&1 </dev/null &", worker=others))
    g.must(g.ssh(command, worker="0", tty=True))


def cmd_teardown(g: Gcloud, a) -> None:
    g.must(g.tpu("delete", g.name, *(["--quiet"] if a.yes else [])))


# ---------------------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    env = os.environ.get
    common.add_argument("--name", default=env("MIXTRAL_TPU_NAME"), help="TPU VM name (env MIXTRAL_TPU_NAME)")
    common.add_argument("--zone", default=env("MIXTRAL_TPU_ZONE"), help="e.g. us-central2-b (env MIXTRAL_TPU_ZONE)")
    common.add_argument("--project", default=env("MIXTRAL_TPU_PROJECT"), help="GCP project (default: gcloud's)")
    common.add_argument("--accelerator-type", default=env("MIXTRAL_TPU_TYPE"),
                        help="slice, e.g. v4-32, v5p-128, v5litepod-8 (alias v5e-8), v6e-16 (env MIXTRAL_TPU_TYPE)")
    common.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    parser = argparse.ArgumentParser(prog="launch/tpu_vm.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help, passes=None):
        epilog = f"Other arguments go to `mixtral-jax {passes}` on the workers." if passes else None
        return sub.add_parser(name, parents=[common], help=help, description=help, epilog=epilog, allow_abbrev=False)

    s = add("setup", "create the slice (or reuse it) and install mixtral-jax on every worker")
    s.add_argument("--version", help="TPU runtime version (default: the generation's JAX image)")
    s.add_argument("--install", help="a local wheel/sdist, or a pip requirement such as git+https://...; "
                                     "default: a tarball of this checkout")
    s.add_argument("--python", default="3.11", help="Python version on the workers (default 3.11)")
    s.add_argument("--spot", action="store_true", help="create a Spot TPU")
    c = add("convert", "convert a checkpoint on worker 0, straight into GCS", "convert")
    c.add_argument("src", help="HF or Mistral checkpoint: gs://... or a directory on worker 0")
    c.add_argument("dst", help="gs://BUCKET/PATH for the Orbax checkpoint")
    add("generate", "mixtral-jax generate on every worker (worker 0 prints)", "generate")
    add("chat-serve", "mixtral-jax chat with your terminal on worker 0", "chat")
    add("finetune", "mixtral-jax train on every worker (fine-tuning: --init-from CHECKPOINT --data ...)", "train")
    t = add("teardown", "delete the slice")
    t.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a, extra = parser.parse_known_args(argv)
    if "--" in extra:
        extra.remove("--")
    try:
        if a.command in ("setup", "teardown") and extra:
            raise LaunchError(f"unexpected arguments for {a.command}: {shlex.join(extra)}")
        for flag, value in (("--name", a.name), ("--zone", a.zone)):
            if not value:
                raise LaunchError(f"{flag} is required")
        g = Gcloud(check_tpu_name(a.name), check_zone(a.zone), check_project(a.project), a.dry_run)
        tpu = None
        if a.command in ("setup", "generate", "chat-serve", "finetune"):
            if not a.accelerator_type:
                raise LaunchError("--accelerator-type is required (e.g. v5p-128)")
            tpu = parse_accelerator(a.accelerator_type)
            mesh = mesh_of(extra)
            if mesh is not None:
                check_mesh(mesh, tpu)
            elif a.command in ("generate", "chat-serve"):
                example = f"data={tpu.chips // 8},expert=8" if tpu.chips % 8 == 0 else f"expert={tpu.chips}"
                raise LaunchError(f"--mesh is required: {tpu.accelerator} has {tpu.chips} chips (e.g. {example}; "
                                  f"see launch/README.md)")
        if a.command == "setup":
            cmd_setup(g, a, tpu)
        elif a.command == "convert":
            cmd_convert(g, a, extra)
        elif a.command == "generate":
            cmd_everywhere(g, "generate", extra)
        elif a.command == "finetune":
            cmd_everywhere(g, "train", extra)
        elif a.command == "chat-serve":
            cmd_chat_serve(g, extra, tpu)
        elif a.command == "teardown":
            cmd_teardown(g, a)
        return 0
    except LaunchError as e:
        print(f"tpu_vm.py {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
