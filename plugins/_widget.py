"""The dock widget: pick a checkpoint and a tomogram layer, Restore or Sample.

The work (`_jobs`) runs in a napari `thread_worker`; a Qt timer polls its progress
reporter into the progress bar, so the viewer stays responsive. Cancel calls the
reporter's `cancel`; the library stops at its next check and the job ends with
`cryowae.progress.Cancelled`. Errors (a wrong checkpoint, a volume the restorer cannot
take) end as a napari notification. The tilt settings (blank: the restorer's own) become
a `cryowae.physics.geometry.TiltGeometry` in the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer

from cryowae.errors import CryowaeInputError
from cryowae.progress import Cancelled

from ._jobs import (
    AXIS_CHOICES,
    SAMPLER_CHOICES,
    ThreadProgress,
    input_from_layer,
    restore_job,
    sample_job,
)
from ._layers import LayerData

if TYPE_CHECKING:
    import napari

POLL_MS = 100


@dataclass
class _Failed:
    error: BaseException


def _guarded(job: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `job` in the worker thread; hand an exception back wrapped as a value (an
    exception the worker raised, or returned bare, would be re-raised by the threading
    layer), so it reaches the GUI thread and ends as a notification."""
    try:
        return job(*args, **kwargs)
    except Exception as exc:
        return _Failed(exc)


class CryowaeWidget(Container):
    """Restore & sample a tomogram layer with a trained cryowae restorer."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self.viewer = napari_viewer
        self.checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.pt",
                                   tooltip="model.pt of a training run (cryowae train)")
        self.layer = ComboBox(label="tomogram", choices=self._layer_choices, nullable=True,
                              tooltip="3D image layer to restore")
        self.n_samples = SpinBox(label="samples", value=8, min=2, max=512,
                                 tooltip="family size for Sample")
        self.sampler = ComboBox(label="sampler", choices=SAMPLER_CHOICES, value="auto",
                                tooltip="auto: prior draws of the model's stochastic "
                                "branch, test-time rotations for a model without one")
        self.tilt = LineEdit(label="tilt range", value="",
                             tooltip="blank: the restorer's training range; or MIN,MAX "
                             "in degrees; or a .tlt/.rawtlt file")
        self.tilt_axis = ComboBox(label="tilt axis", choices=AXIS_CHOICES, value="model",
                                  tooltip="model: the restorer's training axis")
        self.restore_button = PushButton(text="Restore")
        self.sample_button = PushButton(text="Sample")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress_bar = ProgressBar(value=0, min=0, max=1, label="progress")
        self.status = Label(value="", label="")
        self.extend([self.checkpoint, self.layer, self.n_samples, self.sampler,
                     self.tilt, self.tilt_axis, self.restore_button, self.sample_button,
                     self.cancel_button, self.progress_bar, self.status])
        self.restore_button.changed.connect(lambda: self.start("restore"))
        self.sample_button.changed.connect(lambda: self.start("sample"))
        self.cancel_button.changed.connect(self.cancel)
        for event in ("inserted", "removed", "reordered"):
            getattr(self.viewer.layers.events, event).connect(self._refresh_layers)
        self.worker: Any = None
        self.reporter: ThreadProgress | None = None
        self._timer = QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(self._poll)
        self._refresh_layers()

    # ----------------------------------------------------------------- layer list
    def _layer_choices(self, _widget: Any = None) -> list[tuple[str, Image]]:
        out = []
        for layer in self.viewer.layers:
            if not isinstance(layer, Image):
                continue
            data = layer.data[0] if layer.multiscale else layer.data
            if data.ndim == 3 and layer.metadata.get("cryowae", {}).get("kind") in (
                    None, "tomogram", "restored", "mean"):
                out.append((layer.name, layer))
        return out

    def _refresh_layers(self, _event: Any = None) -> None:
        """Re-list the layers; keep the choice, or take the newest tomogram if none."""
        current = self.layer.value
        self.layer.reset_choices()
        layers = [c[1] for c in self._layer_choices()]
        if current is not None and current in layers:
            self.layer.value = current
        elif layers:
            self.layer.value = layers[-1]

    # ----------------------------------------------------------------- running
    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self, kind: str) -> Any:
        """Start a 'restore' or 'sample' job in a worker thread; returns the worker."""
        if self.running:
            show_info("cryowae: a job is already running")
            return None
        try:
            inp = input_from_layer(self.layer.value)
            checkpoint = self._checkpoint_path()
        except CryowaeInputError as exc:
            show_error(str(exc))
            return None
        self.reporter = ThreadProgress()
        kwargs: dict[str, Any] = {"tilt": str(self.tilt.value or ""),
                                  "tilt_axis": str(self.tilt_axis.value)}
        if kind == "restore":
            job = restore_job
        elif kind == "sample":
            job = sample_job
            kwargs |= {"n_samples": int(self.n_samples.value),
                       "sampler": str(self.sampler.value)}
        else:
            raise ValueError(f"unknown job {kind!r}")
        worker = create_worker(_guarded, job, checkpoint, inp, progress=self.reporter,
                               _start_thread=False, **kwargs)
        worker.returned.connect(self._on_returned)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._set_running(True, f"{kind}: loading {Path(checkpoint).name}")
        self._timer.start()
        worker.start()
        return worker

    def cancel(self) -> None:
        if self.reporter is not None and self.running:
            self.reporter.cancel()
            self.status.value = "cancelling..."

    def _checkpoint_path(self) -> Path:
        value = self.checkpoint.value
        if value is None or str(value).strip() in ("", "."):
            raise CryowaeInputError("choose a checkpoint file (model.pt of a training run) "
                                    "first")
        path = Path(value)
        if not path.exists():
            raise CryowaeInputError(f"{path}: no such checkpoint file")
        return path

    def _set_running(self, running: bool, message: str = "") -> None:
        self.restore_button.enabled = not running
        self.sample_button.enabled = not running
        self.cancel_button.enabled = running
        if running:
            self.progress_bar.max, self.progress_bar.value = 1, 0
        self.status.value = message

    def _poll(self, final: bool = False) -> None:
        """Copy the reporter's state into the panel (GUI thread, every POLL_MS)."""
        if self.reporter is None:
            return
        for msg in self.reporter.pop_messages():
            (show_warning if msg.startswith("warning") else show_info)(f"cryowae: {msg}")
        done, total, description = self.reporter.snapshot()
        if total > 0:
            self.progress_bar.max = total
            self.progress_bar.value = min(done, total)
            if not final and not self.reporter.cancelled:
                self.status.value = f"{description} {done}/{total}"

    # ----------------------------------------------------------------- results
    def _on_returned(self, result: list[LayerData] | _Failed) -> None:
        if isinstance(result, _Failed):
            self._on_error(result.error)
        else:
            self._add_layers(result)

    def _add_layers(self, layers: list[LayerData]) -> None:
        for data, kwargs, layer_type in layers:
            name = kwargs.get("name")
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
            getattr(self.viewer, f"add_{layer_type}")(data, **kwargs)
        self.status.value = f"added {len(layers)} layers"

    def _on_error(self, exc: BaseException) -> None:
        cancelled = self.reporter is not None and self.reporter.cancelled
        if cancelled or isinstance(exc, Cancelled):
            show_info("cryowae: cancelled; nothing was added")
            self.status.value = "cancelled"
        elif isinstance(exc, CryowaeInputError):
            show_error(f"cryowae: {exc}")
            self.status.value = "failed"
        else:
            show_error(f"cryowae: {type(exc).__name__}: {exc}")
            self.status.value = "failed"

    def _on_finished(self) -> None:
        self._timer.stop()
        self._poll(final=True)
        status = self.status.value
        self.worker = None
        self._set_running(False, status)
