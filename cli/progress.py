"""A rich progress bar behind cryowae's `ProgressReporter` interface."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cryowae.progress import ProgressReporter

console = Console(stderr=True)


class RichProgress(ProgressReporter):
    """Draws on stderr; messages from `log` go above the bar."""

    def __init__(self, transient: bool = False) -> None:
        super().__init__()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
            TimeRemainingColumn(), console=console, transient=transient,
        )
        self._task: Any = None

    def start(self, total: int, description: str = "", done: int = 0) -> None:
        super().start(total, description, done)
        if self._task is None:
            self._progress.start()
        else:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(description, total=total, completed=done, info="")

    def advance(self, n: int = 1, **info: Any) -> None:
        super().advance(n, **info)
        text = "  ".join(f"{k}={_fmt(v)}" for k, v in self.info.items())
        self._progress.update(self._task, advance=n, info=text)

    def log(self, message: str) -> None:
        console.print(message, soft_wrap=True)

    def finish(self) -> None:
        if self._task is not None:
            self._progress.stop()
            self._task = None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
