"""SIGTERM handled as Ctrl-C: schedulers, ``kill`` and torchrun (on preemption, to every process) send it, and a
run stopped by it should end as one stopped by Ctrl-C does: the current epoch's files written whole, one line
saying how to continue, exit code 143 instead of 130.

SIGTERM is passed on to whatever handles SIGINT at that moment, so the places that hold Ctrl-C back
(:func:`bbfused.interrupts.deferred_sigint` around the checkpoint writes and BB's epoch end) hold it back too.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType


class TerminateAsInterrupt:
    """While active (a context manager, in the main thread), SIGTERM raises KeyboardInterrupt where SIGINT
    would, and :attr:`terminated` records that it came."""

    def __init__(self) -> None:
        self.terminated = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> TerminateAsInterrupt:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
        if self._previous[signal.SIGINT] is signal.SIG_IGN:
            # Ctrl-C ignored (a background job of a script): it stays ignored, but through a Python handler,
            # which deferred_sigint can hold back while it passes on a SIGTERM.
            signal.signal(signal.SIGINT, self._ignored_interrupt)
        signal.signal(signal.SIGTERM, self._terminate)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]
        self._previous = {}

    def _ignored_interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self.terminated:
            raise KeyboardInterrupt

    def _terminate(self, signum: int, frame: FrameType | None) -> None:
        self.terminated = True
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)
