"""A virtual X display for headless rendering: Xvfb with Mesa software OpenGL.

napari draws through vispy's OpenGL, which Qt's ``offscreen`` platform does not
provide; an Xvfb server with Mesa's llvmpipe does. `ensure_display` starts one when no
``DISPLAY`` is set (tests, screenshot scripts, ``cryowae view --screenshot``). No Qt here.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time

XVFB_PACKAGES = "xvfb libgl1-mesa-dri"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: have the kernel send SIGTERM to Xvfb when the starting process exits."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class VirtualDisplay:
    """A running Xvfb server.

    It ends when this process exits (after Qt has let go of it: stopping the server under
    a live Qt application makes Qt abort), or earlier with `stop()`.
    """

    def __init__(self, size: tuple[int, int] = (1600, 1200), timeout: float = 20.0) -> None:
        exe = shutil.which("Xvfb")
        if exe is None:
            raise RuntimeError("no Xvfb to render on: install it with `apt-get install -y "
                               f"{XVFB_PACKAGES}` (or `make system-packages`)")
        read_fd, write_fd = os.pipe()
        # -displayfd: Xvfb picks a free display number itself and writes it to the pipe
        self.process = subprocess.Popen(
            [exe, "-displayfd", str(write_fd), "-screen", "0", f"{size[0]}x{size[1]}x24",
             "-nolisten", "tcp", "-noreset"],
            pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        os.close(write_fd)
        number = b""
        deadline = time.monotonic() + timeout
        try:
            os.set_blocking(read_fd, False)
            while not number.endswith(b"\n"):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("Xvfb did not start")
                try:
                    chunk = os.read(read_fd, 16)
                except BlockingIOError:
                    time.sleep(0.02)
                    continue
                if not chunk:
                    time.sleep(0.02)
                number += chunk
        finally:
            os.close(read_fd)
        self.display = f":{int(number.strip())}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()



def configure_qt_for_x11() -> None:
    """Make Qt draw through X11 (the ``offscreen`` platform has no OpenGL for vispy)."""
    if os.environ.get("QT_QPA_PLATFORM", "xcb") != "xcb":
        os.environ["QT_QPA_PLATFORM"] = "xcb"
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")


def ensure_display(size: tuple[int, int] = (1600, 1200)) -> VirtualDisplay | None:
    """Start Xvfb and point ``DISPLAY`` at it when no display is set; None otherwise.

    Call before the Qt application is created (before napari makes a viewer). The server
    lives until this process exits."""
    if os.environ.get("DISPLAY"):
        configure_qt_for_x11()
        return None
    vd = VirtualDisplay(size)
    os.environ["DISPLAY"] = vd.display
    configure_qt_for_x11()
    return vd
