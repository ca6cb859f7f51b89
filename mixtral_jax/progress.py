"""Progress display for long work (loading, conversion, generation, training), on stderr via `rich`.

Silent when disabled or when stderr is not a terminal, so tests and logs stay clean.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, total: int, description: str, unit: str, enabled: bool):
        self._progress = None
        if enabled and sys.stderr.isatty():
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(stderr=True), transient=True)
            self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int = 1, **fields):
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **fields)

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()


def progress(total: int, description: str, unit: str = "", enabled: bool = True) -> _Bar:
    return _Bar(total, description, unit, enabled)
