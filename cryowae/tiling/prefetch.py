"""Overlapped I/O for the tile engine: a reader thread that prepares the next batches of
tiles, and a writer thread that writes the finished slab, while the device computes.

Both keep memory bounded: the reader runs at most `depth` items ahead (a bounded queue),
the writer holds one block at a time (`BackgroundWriter.wait` before the next copy).
Errors raised in either thread reach the calling thread (the reader's at the item where
it failed, the writer's at the next `submit` or at `close`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_END = object()
#: seconds between checks of the stop flag while a queue is full or empty
_POLL_S = 0.05


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetcher(Generic[T]):
    """Iterate `make()` in a background thread, at most `depth` items ahead.

    Use as an iterator; `close` (also on leaving a ``with`` block) stops the thread and
    closes the underlying generator in it. `make` is called inside the thread, so a
    generator's own code (reading, page releasing) runs there.
    """

    def __init__(self, make: Callable[[], Iterator[T]], depth: int = 2,
                 name: str = "cryowae-reader") -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), name=name,
                                        daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make: Callable[[], Iterator[T]]) -> None:
        it = None
        try:
            it = make()
            for item in it:
                if not self._put(item):
                    break
            else:
                self._put(_END)
        except BaseException as exc:  # handed to the consumer
            self._put(_Failed(exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        item = self._q.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, _Failed):
            raise item.exc
        return item

    def close(self) -> None:
        """Stop the thread (discarding prepared items) and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get(timeout=_POLL_S)
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class BackgroundWriter:
    """Runs ``sink(*args)`` in one background thread, one call at a time.

    Call `wait` before preparing the next block (so at most one block is in flight),
    then `submit`; `close` waits for the last write. A write's exception is raised by
    the next `wait`/`submit`/`close`.
    """

    def __init__(self, sink: Callable[..., None], name: str = "cryowae-writer") -> None:
        self._sink = sink
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: Future[None] | None = None

    def wait(self) -> None:
        """Block until the previous write has finished; raise its error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def submit(self, *args: Any) -> None:
        """Start ``sink(*args)`` after the previous write (the caller must not change
        the arguments until the next `wait`)."""
        self.wait()
        self._pending = self._pool.submit(self._sink, *args)

    def close(self, raise_errors: bool = True) -> None:
        """Wait for the last write and stop the thread; with `raise_errors` off (the
        caller is already propagating an error) a failed write is not raised."""
        try:
            self.wait()
        except BaseException:
            if raise_errors:
                raise
        finally:
            self._pool.shutdown(wait=True)


__all__ = ["BackgroundWriter", "Prefetcher"]
