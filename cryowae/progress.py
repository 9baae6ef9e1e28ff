"""The one small progress interface every long loop in cryowae reports through.

The library calls `start`, `advance` and `finish`, and polls `cancelled` to stop early.
The CLI draws it with rich (`cryowae.cli.progress.RichProgress`), the napari plugin with
napari's progress bar; `NullProgress` ignores everything.
"""

from __future__ import annotations

from typing import Any

from cryowae.errors import CryowaeInputError


class Cancelled(CryowaeInputError):
    """The user cancelled a long task through `ProgressReporter.cancel`; no output was
    written (checkpoints and finished blocks, where a task keeps them, stay)."""


class ProgressReporter:
    """Base reporter: records state, draws nothing. Subclass to draw."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.description = ""
        self.info: dict[str, Any] = {}
        self.cancelled = False

    def start(self, total: int, description: str = "", done: int = 0) -> None:
        """Begin a task of `total` units, `done` of which are finished (on resume)."""
        self.total, self.done, self.description = int(total), int(done), description

    def advance(self, n: int = 1, **info: Any) -> None:
        """`n` more units are finished; `info` holds figures to show (loss terms...)."""
        self.done += n
        self.info.update(info)

    def log(self, message: str) -> None:
        """A one-line message for the user (the mode a run uses, a fallback taken...)."""

    def finish(self) -> None:
        """The task is over (done or stopped)."""

    def cancel(self) -> None:
        """Ask the running loop to stop at its next check."""
        self.cancelled = True

    def check_cancelled(self, what: str = "task") -> None:
        """Raise `Cancelled` if `cancel` was called: the one check every loop makes."""
        if self.cancelled:
            raise Cancelled(f"{what} cancelled; no output was written")


class NullProgress(ProgressReporter):
    """Reports nowhere."""


def ensure_progress(progress: ProgressReporter | None) -> ProgressReporter:
    return progress if progress is not None else NullProgress()
