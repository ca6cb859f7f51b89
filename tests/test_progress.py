"""Progress where people look: a bar on a terminal, periodic plain lines in files and pipes (SLURM logs,
`gcloud ... ssh > log`), nothing when disabled."""

import os
import re
import subprocess
import sys

from mixtral_jax import progress as progress_module
from mixtral_jax.progress import display_mode, progress

CONVERT_MANY = """
import time
from mixtral_jax.progress import progress
with progress(30, "crunching", "items") as bar:
    for _ in range(30):
        time.sleep(0.05)
        bar.advance()
"""


def test_the_mode_follows_the_terminal_and_the_environment(monkeypatch):
    monkeypatch.delenv(progress_module.MODE_ENV, raising=False)
    monkeypatch.delenv("JPY_PARENT_PID", raising=False)
    monkeypatch.setattr(progress_module, "_isatty", lambda stream: True)
    assert display_mode() == "bar" and display_mode(enabled=False) == "off"
    monkeypatch.setenv("JPY_PARENT_PID", "1234")  # a notebook's `!cmd`: a pty the notebook shows as text
    assert display_mode() == "lines"
    monkeypatch.delenv("JPY_PARENT_PID")
    monkeypatch.setattr(progress_module, "_isatty", lambda stream: False)
    assert display_mode() == "lines"
    for mode in ("bar", "lines", "off"):
        monkeypatch.setenv(progress_module.MODE_ENV, mode)
        assert display_mode() == mode
    monkeypatch.setenv(progress_module.MODE_ENV, "fancy")
    assert display_mode() == "lines"  # unknown: auto, with a warning


def test_lines_carry_counts_rates_and_the_latest_description(monkeypatch, capsys):
    monkeypatch.setenv(progress_module.MODE_ENV, "lines")
    monkeypatch.setenv(progress_module.INTERVAL_ENV, "0")
    with progress(3, "training", "steps") as bar:
        for step in range(3):
            bar.advance(1, description=f"step {step + 1} loss 2.5")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("training: 0/3 steps (0%), 0:00 elapsed")
    assert lines[1].startswith("step 1 loss 2.5: 1/3 steps (33%)") and "left" in lines[1]
    assert lines[-1].startswith("step 3 loss 2.5: 3/3 steps (100%)") and lines[-1].endswith(" done")
    with progress(3, "loading", "tensors", enabled=False) as bar:
        bar.advance()
    assert capsys.readouterr().err == ""


def test_a_log_file_gets_periodic_lines(tmp_path):
    """stdout and stderr to a file, as SLURM or `gcloud ... ssh > log` run it: lines every interval."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXTRAL_JAX_PROGRESS")}
    env[progress_module.INTERVAL_ENV] = "0.3"
    log = tmp_path / "job.log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", CONVERT_MANY], stdout=f, stderr=subprocess.STDOUT, env=env,
                       check=True, timeout=120)
    lines = log.read_text().splitlines()
    counts = [int(line.split(": ")[1].split("/")[0]) for line in lines if line.startswith("crunching: ")]
    assert counts[0] == 0 and counts[-1] == 30 and lines[-1].endswith(" done")
    assert 3 <= len(counts) <= 12, lines  # periodic: neither silent nor one line per item (1.5 s / 0.3 s)
    assert counts == sorted(counts) and "\x1b[" not in log.read_text()  # no terminal control codes


def test_a_real_command_reports_to_a_file(reference, tmp_path):
    from mixtral_jax import MixtralConfig

    ref = reference(MixtralConfig.tiny(), 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIXTRAL_JAX_PROGRESS")}
    env[progress_module.INTERVAL_ENV] = "0"
    exe = os.path.join(os.path.dirname(sys.executable), "mixtral-jax")
    log = tmp_path / "convert.log"
    with open(log, "w") as f:
        subprocess.run([exe, "convert", ref.path, str(tmp_path / "ck")], stdout=f, stderr=subprocess.STDOUT,
                       env=env, check=True, timeout=300)
    counts = [int(m) for m in re.findall(r"^converting[^:]*: (\d+)/23 tensors", log.read_text(), re.MULTILINE)]
    assert counts[0] == 0 and counts[-1] == 23 and len(counts) >= 10, log.read_text()
