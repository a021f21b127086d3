"""An exclusive lock on an output folder, so that two runs never write into the same one.

The lock is ``fcntl.flock`` on ``.bbfused-train.lock`` in the folder, which holds the owner's pid and host. The
kernel releases a flock when its process dies, however it dies, so a killed run's lock file is recognised as
stale (it can be locked again) and taken over. Where the file system has no flock, the recorded pid is checked
instead: a lock whose process is gone is stale. Only the process that writes (rank 0 under torchrun) locks.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from .errors import UsageError

LOCK = ".bbfused-train.lock"


def _owner(text: str) -> tuple[int | None, str]:
    """(pid, host) from a lock file's text; (None, "") when it holds none."""
    fields = text.split()
    if not fields or not fields[0].isdigit():
        return None, ""
    return int(fields[0]), fields[1] if len(fields) > 1 else ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class OutputLock:
    """The lock of one output folder, held from :meth:`acquire` until :meth:`release` or the process's end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK
        self.created: Path | None = None  # the outermost folder the lock created (removed again on a failure)
        self.stale_owner: tuple[int | None, str] | None = None  # the killed run whose lock was taken over
        self._descriptor: int | None = None

    def acquire(self) -> OutputLock:
        """Create the folder (and missing parents) and take its lock. Raises UsageError, naming the owner and
        what to do, when a live run holds it."""
        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.created = missing[-1] if missing else None
        try:
            while self._descriptor is None:
                self._descriptor = self._try_lock()
        except BaseException:
            self.release(remove_created=True)
            raise
        return self

    def _try_lock(self) -> int | None:
        """The locked descriptor of the lock file, or None to try again (it was replaced meanwhile)."""
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            text = os.read(descriptor, 4096).decode(errors="replace")
            if not self._flock(descriptor, text):
                self._refuse(text)
            if os.fstat(descriptor).st_ino != os.stat(self.path).st_ino:
                os.close(descriptor)  # released and removed by its owner between our open and our lock
                return None
        except FileNotFoundError:
            os.close(descriptor)
            return None
        except BaseException:
            os.close(descriptor)
            raise
        owner = _owner(text)
        if owner[0] is not None:
            self.stale_owner = owner
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        return descriptor

    @staticmethod
    def _flock(descriptor: int, text: str) -> bool:
        """Whether the lock was taken: flock, or without it the recorded owner's liveness."""
        import fcntl

        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        pid, host = _owner(text)  # no flock on this file system
        return pid is None or pid == os.getpid() or (host == socket.gethostname() and not _alive(pid))

    def _refuse(self, text: str) -> None:
        pid, host = _owner(text)
        who = f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "") if pid else "a process"
        stop = f"stop it (kill {pid}), " if pid and (not host or host == socket.gethostname()) else "stop it, "
        raise UsageError(
            f"--output-dir {self.folder} is in use by another bbfused-train run ({who}); wait for it to end, "
            f"{stop}or choose another --output-dir"
        )

    def release(self, remove_created: bool = False) -> None:
        """Remove the lock file and let go of the lock; with ``remove_created``, also remove the folders
        :meth:`acquire` created, if nothing else was put in them."""
        if self._descriptor is not None:
            self.path.unlink(missing_ok=True)  # before the unlock: a waiting run then locks a new file
            os.close(self._descriptor)
            self._descriptor = None
        if remove_created and self.created is not None:
            folder = self.folder
            while True:
                try:
                    folder.rmdir()
                except OSError:  # not empty: something else is there now
                    break
                if folder == self.created:
                    break
                folder = folder.parent
            self.created = None


def lock_output_dir(folder: Path) -> OutputLock:
    """Take the lock of ``folder``, creating it; see :class:`OutputLock`."""
    return OutputLock(folder).acquire()
