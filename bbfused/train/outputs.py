"""What a run leaves in ``--output-dir`` and how it is written, so that a crash, a kill or a full disk never
leaves a file half-written: the folder's checks, the log and the figure (the checkpoints' contents are
:mod:`.checkpoints`'s).

* Every file goes through a temporary file in the same folder and an atomic rename; the temporary file is
  removed on any failure, and a full disk is reported as :class:`OutputError` (exit code 2) with what to do.
* ``log.jsonl`` is strict JSON: a value that is not finite is written as ``null``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import OutputError, UsageError

LATEST, BEST, LOG, PLOT = "checkpoint.pth", "best.pth", "log.jsonl", "curves.png"
# Free space asked for before training, in checkpoint sizes: checkpoint.pth, best.pth and one temporary copy.
CHECKPOINT_COPIES = 3


def check_output_location(path: Path) -> None:
    """Raise UsageError unless ``path`` is, or can be created as, a writable folder. Writes nothing that stays."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output-dir {path} is a file; pass a folder (it is created if missing)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--output-dir {path} cannot be created: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UsageError(
            f"--output-dir {path} is not writable ({existing}: {error.strerror}); choose a folder you can write to"
        ) from None


def check_previous_run(path: Path, resume: Path | None) -> None:
    """Raise UsageError when the folder ``path`` holds a run other than the one ``resume`` continues: this run
    would overwrite it. Run under the folder's lock, so that no other run starts writing after the check."""
    latest = path / LATEST
    if resume is not None and latest.is_file() and latest.resolve() != resume.resolve():
        raise UsageError(
            f"--resume {resume} would continue in {path} and overwrite its {LATEST} (and the log's later epochs); "
            f"continue from it in a new folder with --output-dir NEW, or resume {latest}"
        )
    previous = [name for name in (LATEST, BEST, LOG, PLOT) if (path / name).exists()]
    if previous and (resume is None or resume.resolve().parent != path.resolve()):
        saved = next((path / name for name in (LATEST, BEST) if (path / name).is_file()), None)
        if saved is None:
            raise UsageError(
                f"--output-dir {path} already holds a run's {', '.join(previous)} but no checkpoint to continue it "
                f"from; move {'it' if len(previous) == 1 else 'them'} away or choose another folder"
            )
        raise UsageError(
            f"--output-dir {path} already holds a run ({', '.join(previous)}); continue it with --resume {saved} "
            f"(or run this command again with --auto-resume) or choose another folder"
        )


def temporary_name(path: Path) -> Path:
    """The temporary file :func:`atomic_write` writes ``path`` through: hidden, and unique to this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def remove_stale_temporaries(path: Path) -> list[str]:
    """Remove the temporary files killed runs left in ``path`` (only this command's own names); returns them.
    Only under the folder's lock: then no live process is writing one."""
    removed = []
    for name in (LATEST, BEST, LOG, PLOT):
        for temporary in sorted({*path.glob(f".{name}.tmp"), *path.glob(f".{name}.*.tmp")}):
            if temporary.is_file():
                temporary.unlink(missing_ok=True)
                removed.append(temporary.name)
    return removed


def state_bytes(value: Any) -> int:
    """The bytes of every tensor in a (nested) state dict: about the size of its checkpoint."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(state_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(state_bytes(v) for v in value)
    return 0


def _megabytes(size: float) -> str:
    return f"{size / 2**20:,.0f} MB" if size >= 2**20 else f"{size / 2**20:.2f} MB"


def check_free_space(path: Path, checkpoint_size: int) -> None:
    """Raise OutputError unless the disk holding ``path`` has room for the checkpoints of one more epoch."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    already = sum((path / name).stat().st_size for name in (LATEST, BEST) if (path / name).is_file())
    needed = CHECKPOINT_COPIES * checkpoint_size - already
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise OutputError(
            f"--output-dir {path} has {_megabytes(free)} free, and the checkpoints of this run need about "
            f"{_megabytes(needed)} (checkpoint.pth, best.pth and a temporary copy of {_megabytes(checkpoint_size)} "
            f"each); free some space or choose another --output-dir"
        )


def _out_of_space(error: BaseException) -> bool:
    # torch.save reports a full disk as a RuntimeError from its zip writer ("unexpected pos"), not an OSError.
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, RuntimeError) and ("unexpected pos" in str(error) or "No space left" in str(error))


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder and rename it: a crash never leaves a half-written
    ``path``, and the temporary file is removed on any failure. A full disk raises OutputError."""
    temporary = temporary_name(path)
    try:
        write(temporary)
        _fsync(temporary)  # the data reaches the disk before the rename makes it the file
        os.replace(temporary, path)
        _fsync(path.parent)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if _out_of_space(error):
            raise OutputError(
                f"the disk of {path.parent} is full: {path.name} could not be written ({error}); free some space"
                + (f", then continue with --resume {path.parent / LATEST}" if (path.parent / LATEST).exists() else "")
            ) from None
        raise


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    """The epochs as JSON lines, one object per epoch; a value that is not finite is ``null`` (strict JSON)."""
    text = "".join(
        json.dumps({key: _strict(value) for key, value in record.items()}, allow_nan=False) + "\n" for record in history
    )
    atomic_write(path, lambda p: p.write_text(text))


def history_figure(history: list[dict[str, Any]], title: str, test_set: bool = True):
    """A matplotlib Figure with the learning rate, the train loss and (``test_set``) the test accuracy per epoch;
    epochs BB rolled back are marked with a red cross on each panel, and the epoch axis has integer ticks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    def values(key: str) -> list[float]:
        return [math.nan if record.get(key) is None else record[key] for record in history]

    epochs = [record["epoch"] for record in history]
    rolled_back = [record.get("rolled_back", False) for record in history]
    figure = Figure(figsize=(12 if test_set else 8, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    panels = [("lr", "learning rate", "log"), ("train_loss", "train loss", "log"), ("test_acc1", "test top-1 %", None)]
    panels = panels if test_set else panels[:2]
    for axes, (key, label, scale) in zip(figure.subplots(1, len(panels)), panels):
        series = values(key)
        axes.plot(epochs, series, marker="o")
        if key == "test_acc1" and "test_acc5" in history[0]:
            axes.plot(epochs, values("test_acc5"), marker="s", label="top-5")
        if any(rolled_back):
            marked = [(e, v) for e, v, r in zip(epochs, series, rolled_back) if r]
            # A diverged epoch's loss may be inf or NaN: mark it at the panel's top instead.
            finite = [v for v in series if math.isfinite(v)]
            top = max(finite) if finite else 1.0
            axes.plot(
                [e for e, _ in marked],
                [v if math.isfinite(v) else top for _, v in marked],
                "x",
                color="red",
                markersize=10,
                markeredgewidth=2,
                label="rolled back",
            )
        if key == "test_acc1" and ("test_acc5" in history[0] or any(rolled_back)):
            axes.legend()
        if scale:
            axes.set_yscale(scale)
        if len(levels := {v for v in series if math.isfinite(v) and (v > 0 or not scale)}) == 1:
            # One level (the first epoch, a constant rate): give the axis a span, which matplotlib warns it lacks.
            (level,) = levels
            axes.set_ylim(*((level / 2, level * 2) if scale else (level - 1, level + 1)))
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_title(label)
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    return figure


def plot_history(path: Path, history: list[dict[str, Any]], title: str, test_set: bool = True) -> None:
    """Write :func:`history_figure` as a PNG."""
    figure = history_figure(history, title, test_set)
    atomic_write(path, lambda p: figure.savefig(p, format="png", dpi=100))
