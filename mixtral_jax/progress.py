"""Progress display for long work (loading, conversion, export, generation, training), on stderr.

Where people watch it decides the form. A terminal gets a `rich` bar. Jupyter (the kernel's stderr
is no terminal; a `!mixtral-jax ...` cell's is a pseudo-terminal the notebook shows as text), a SLURM
log or `gcloud ... ssh` piped into a file get plain lines every `MIXTRAL_JAX_PROGRESS_INTERVAL`
seconds (default 10), plus one at the start and one at the end: a bar there draws nothing or fills the
file with control codes, and silence looks like a hang. `MIXTRAL_JAX_PROGRESS` = `auto` (the default),
`bar`, `lines` or `off` overrides the choice. Library messages go through `logging` (the `mixtral_jax`
logger tree); only this display writes to stderr itself.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

MODE_ENV = "MIXTRAL_JAX_PROGRESS"
INTERVAL_ENV = "MIXTRAL_JAX_PROGRESS_INTERVAL"
MODES = ("auto", "bar", "lines", "off")
DEFAULT_INTERVAL = 10.0

log = logging.getLogger(__name__)


def display_mode(enabled: bool = True) -> str:
    """'bar', 'lines' or 'off': the environment's choice, else a bar on a terminal and lines elsewhere."""
    if not enabled:
        return "off"
    mode = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        log.warning("ignoring %s=%r (use one of %s)", MODE_ENV, mode, ", ".join(MODES))
        mode = "auto"
    if mode == "auto":
        return "bar" if _isatty(sys.stderr) and not in_jupyter() else "lines"
    return mode


def in_jupyter() -> bool:
    """A command a Jupyter kernel started (in the kernel itself stderr is no terminal anyway): `!cmd`
    runs on a pseudo-terminal whose output the notebook shows as text, where a bar's cursor codes come
    out as garbage. Jupyter's kernel launcher sets `JPY_PARENT_PID`, which the kernel's children inherit."""
    return "JPY_PARENT_PID" in os.environ


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def _interval() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    try:
        return max(float(raw), 0.0) if raw is not None else DEFAULT_INTERVAL
    except ValueError:
        log.warning("ignoring %s=%r (a number of seconds)", INTERVAL_ENV, raw)
        return DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class _Bar:
    def __init__(self, total: int, description: str, unit: str, enabled: bool):
        self.total, self.description, self.unit = total, description, unit
        self.mode = display_mode(enabled)
        self.done = 0
        self._progress = None
        if self.mode == "bar":
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True)
            self._task = self._progress.add_task(description, total=total)
        self._interval = _interval()
        self._start = self._last = 0.0
        self._latest = description

    def _line(self, final: bool = False) -> None:
        now = time.monotonic()
        elapsed = now - self._start
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = ""
        if not final and 0 < self.done < self.total:
            left = f", ~{_duration(elapsed / self.done * (self.total - self.done))} left"
        state = "done" if final and self.done >= self.total else "stopped" if final else ""
        text = f"{self._latest}: {self.done}/{self.total} {self.unit}{pct}, {_duration(elapsed)} elapsed{left}"
        stream = sys.stderr  # looked up now: notebooks and tests replace it
        stream.write(f"{text}{' ' + state if state else ''}\n")
        stream.flush()
        self._last = now

    def advance(self, n: int = 1, **fields):
        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **fields)
        elif self.mode == "lines":
            self._latest = fields.get("description", self._latest)
            if time.monotonic() - self._last >= self._interval and self.done < self.total:
                self._line()

    def __enter__(self):
        self._start = self._last = time.monotonic()
        if self._progress is not None:
            self._progress.start()
        elif self.mode == "lines":
            self._line()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        elif self.mode == "lines":
            self._line(final=True)


def progress(total: int, description: str, unit: str = "", enabled: bool = True) -> _Bar:
    """`with progress(n, "converting", "tensors") as bar: ... bar.advance()`: a bar, lines or nothing."""
    return _Bar(total, description, unit, enabled)
