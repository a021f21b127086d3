"""Keeping a Ctrl-C out of a piece of work that must not stop half-way (BB's epoch end)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


@contextlib.contextmanager
def deferred_sigint() -> Iterator[None]:
    """Hold back SIGINT for the body and deliver it to the previous handler (KeyboardInterrupt by default) once
    the body is done. Only where Python handles SIGINT: in the main thread, with a Python-level handler."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    received: list[tuple[int, FrameType | None]] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        previous(*received[0])
