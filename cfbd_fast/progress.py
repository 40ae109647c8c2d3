"""Progress bars on stderr (rich), shared by the library and the CLI; `enabled=False` makes them no-ops."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class _Bar:
    def __init__(self, progress, task, rate_unit: str | None = None):
        self._progress = progress
        self._task = task
        self._rate_unit = rate_unit

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)
            if self._rate_unit is not None:
                speed = self._progress.tasks[self._task].speed
                rate = "" if speed is None else f"{speed:,.0f} {self._rate_unit}/s"
                self._progress.update(self._task, rate=rate)


@contextmanager
def progress_bar(description: str, total: float | None, enabled: bool = True, unit: str = "rows",
                 rate: bool = False) -> Iterator[_Bar]:
    """A single progress bar; yields an object with `.advance(n)`. `rate=True` adds a `N unit/s` column."""
    if not enabled:
        yield _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
               TimeElapsedColumn(), TimeRemainingColumn()]
    if rate:
        columns.insert(4, TextColumn("{task.fields[rate]}"))
    with Progress(*columns, console=Console(file=sys.stderr), transient=False) as progress:
        task = progress.add_task(description, total=total, rate="")
        yield _Bar(progress, task, unit if rate else None)
