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

    def hold(signum: int, frame: FrameType | None) -> None:
        if received:  # a second Ctrl-C: the body may be stuck (e.g. in a collective); let it through
            previous(signum, frame)
        received.append((signum, frame))

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    except BaseException as error:
        signal.signal(signal.SIGINT, previous)
        if received and not isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt from error  # the interrupt is not lost behind the body's own failure
        raise
    signal.signal(signal.SIGINT, previous)
    if received:
        previous(*received[0])
