"""launch/README.md and the launchers stay in step with the commands: every `mixtral-jax ...` line of the
page's examples, and every command `tpu_vm.py --dry-run` generates from them, goes through the real parser."""

import contextlib
import io
import os
import re
import shlex
import sys

import pytest

from mixtral_jax.cli.main import build_parser
from tests.helpers import REPO_ROOT

LAUNCH = os.path.join(REPO_ROOT, "launch")
sys.path.insert(0, LAUNCH)
import tpu_vm  # noqa: E402

README = os.path.join(LAUNCH, "README.md")
# launcher -> how many of its own arguments come before the mixtral-jax subcommand
WRAPPERS = {"launch/local.py": 2, "launch/multinode.sh": 6, "launch/slurm.sbatch": 0, "launch/gpu_single_host.sh": 0}


def _example_lines() -> list[list[str]]:
    """The shell lines of the page's code blocks (continuations joined; `#    mixtral-jax ...` too)."""
    text = open(README, encoding="utf-8").read()
    lines = []
    for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("#"):
                line = line.lstrip("# ")
                if not line.startswith("mixtral-jax "):
                    continue
            if line:
                lines.append(shlex.split(line, comments=True))
    return lines


def _generated(argv: list[str], monkeypatch) -> list[list[str]]:
    """The mixtral-jax invocations in the gcloud commands `tpu_vm.py ... --dry-run` prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert tpu_vm.main([*argv, "--dry-run"]) == 0, argv
    found = []
    for line in out.getvalue().splitlines():
        if line.startswith("#"):
            continue
        command = next((a.split("=", 1)[1] for a in shlex.split(line) if a.startswith("--command=")), None)
        for step in (command or "").split("; "):
            words = shlex.split(step)
            words = words[1:] if words[:1] == ["nohup"] else words
            words = words[:words.index("&&")] if "&&" in words else words
            words = [w for w in words if not w.startswith((">", "2>", "<", "&"))]
            if words and words[0].endswith("bin/mixtral-jax") and words[1:] != ["--help"]:
                found.append(words[1:])
    return found


def _mixtral_commands(monkeypatch) -> list[list[str]]:
    for name, value in {"MIXTRAL_TPU_NAME": "mixtral", "MIXTRAL_TPU_ZONE": "us-east5-a",
                        "MIXTRAL_TPU_TYPE": "v5p-128"}.items():
        monkeypatch.setenv(name, value)
    commands = []
    for words in _example_lines():
        words = [w for w in words if not w.startswith(("MIXTRAL_JAX=", "XLA_"))]
        if words[:1] == ["mixtral-jax"]:
            commands.append(words[1:])
        elif words[:2] == ["python", "launch/tpu_vm.py"]:
            commands += _generated(words[2:], monkeypatch)
        elif words[:1] == ["sbatch"] and words[1] in WRAPPERS:
            commands.append(words[2:])
        else:
            script = words[1] if words[0] == "python" else words[0]
            if script in WRAPPERS:
                rest = words[2:] if words[0] == "python" else words[1:]
                commands.append(rest[WRAPPERS[script]:])
    return commands


def test_every_command_of_the_launch_readme_parses(monkeypatch):
    commands = _mixtral_commands(monkeypatch)
    subcommands = {c[0] for c in commands}
    assert {"convert", "generate", "chat", "train", "export"} <= subcommands, subcommands
    assert len(commands) >= 9
    parser = build_parser()
    for argv in commands:
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"launch/README.md: `mixtral-jax {shlex.join(argv)}` is refused by the parser")
        assert args.command == argv[0]
    train = parser.parse_args(next(c for c in commands if c[0] == "train"))
    assert train.init_from and train.data and train.out  # the fine-tune starts from the converted weights


def test_the_launcher_help_names_no_pending_command():
    assert "pending" not in open(os.path.join(LAUNCH, "tpu_vm.py"), encoding="utf-8").read()
