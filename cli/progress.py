"""A rich progress bar behind cryowae's `ProgressReporter` interface.

The bar's fraction, its count and the remaining time come from the library's
`EtaClock` (`cryowae.progress`): with a time budget (``train --minutes``) the bar and
the estimate follow the budget, not a step total.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from cryowae.progress import ProgressReporter, format_duration

console = Console(stderr=True)
#: the rich task's total: the bar is drawn from the library's fraction in [0, 1]
_BAR = 1000


class _Remaining(ProgressColumn):
    """``eta H:MM:SS`` from the reporter's clock, recomputed at every refresh."""

    def __init__(self, reporter: ProgressReporter) -> None:
        super().__init__()
        self.reporter = reporter

    def render(self, task: Any) -> Text:
        return Text(f"eta {format_duration(self.reporter.eta())}", style="progress.remaining")


def count_text(reporter: ProgressReporter) -> str:
    """``done/total``, or ``done`` alone when a time budget ends the task first (the unit
    total is then no promise: `train --minutes` runs as many steps as fit)."""
    if reporter.clock.time_bound():
        return f"{reporter.done}"
    return f"{reporter.done}/{reporter.total}"


class RichProgress(ProgressReporter):
    """Draws on stderr; messages from `log` go above the bar."""

    def __init__(self, transient: bool = False) -> None:
        super().__init__()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.fields[count]}"), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), _Remaining(self), console=console, transient=transient,
        )
        self._task: Any = None

    def start(self, total: int, description: str = "", done: int = 0) -> None:
        super().start(total, description, done)
        if self._task is None:
            self._progress.start()
        else:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(description, total=_BAR, info="", count="")
        self._redraw()

    def set_time_budget(self, budget_s: float | None, spent_s: float = 0.0) -> None:
        super().set_time_budget(budget_s, spent_s)
        self._redraw()

    def advance(self, n: int = 1, **info: Any) -> None:
        super().advance(n, **info)
        self._redraw()

    def _redraw(self) -> None:
        if self._task is None:
            return
        text = "  ".join(f"{k}={_fmt(v)}" for k, v in self.info.items())
        self._progress.update(self._task, completed=round(_BAR * self.clock.fraction()),
                              info=text, count=count_text(self))

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
