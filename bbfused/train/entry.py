"""The ``bbfused-train`` command: run a training and turn every way it can end into one exit code and one
message.

* 0: done (a summary is printed), or ``--auto-resume`` found the run complete ("nothing to do").
* 2: an input that cannot work, or a full disk (the message says what to change); running the same command
  again gives the same answer, so an automatic restarter should stop on it.
* 130: interrupted (Ctrl-C), 143: terminated (SIGTERM, as schedulers and torchrun send on preemption): one
  line says which epoch ``checkpoint.pth`` holds and the command that continues it, spelled the way this run
  was started.
* 1: any other error, with its traceback. Under torch.distributed the failing process aborts the process group
  on its way out, so the other processes fail within seconds instead of waiting in a collective; the barrier
  that ends a run is only reached after a success.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .errors import DataError, OutputError, RunComplete, UsageError
from .options import parse_args
from .signals import TerminateAsInterrupt

if TYPE_CHECKING:
    from .loop import Training

EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 2, 130, 143


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a run; carries the line that says where the run stands, and the exit code."""

    def __init__(self, line: str, code: int) -> None:
        super().__init__(line)
        self.code = code


def _resume_line(training: Training, how: str, command_line: bool) -> str:
    from .outputs import LATEST
    from .report import restart_command

    out = training.args.output_dir
    if out is None:
        return f"{how}; nothing was saved (no --output-dir)"
    saved_epoch = training.progress.saved_epoch
    if saved_epoch is None:
        return f"{how} before the first epoch ended; nothing to resume in {out}"
    # The device is not saved with the run (a run may move between machines): a chosen one is typed again.
    device = ["--device", training.args.device] if "device" in getattr(training.args, "given_options", ()) else []
    command = restart_command(["--resume", str(out / LATEST), *device], command_line)
    return f"{how}; {out / LATEST} holds epoch {saved_epoch}: continue with {command}"


def run(
    args: argparse.Namespace, stop: TerminateAsInterrupt | None = None, command_line: bool = False
) -> list[dict[str, Any]]:
    """Prepare, train every epoch, leave the process group; returns the per-epoch records. On failure the
    process group is aborted (no barrier) and the error propagates; Ctrl-C, a SIGTERM ``stop`` records, and a
    failure after one (a collective whose peers stopped) become :class:`Interrupted`. ``command_line``: the
    process runs the command, so the resume line repeats how it was started."""
    from .building import prepare  # here, not above: parsing and its errors need no torch

    training = prepare(args)
    try:
        history = training.fit()
    except BaseException as error:
        training.abort()
        terminated = stop is not None and stop.terminated
        if isinstance(error, KeyboardInterrupt) or (terminated and isinstance(error, Exception)):
            how, code = ("terminated (SIGTERM)", EXIT_TERMINATED) if terminated else ("interrupted", EXIT_INTERRUPTED)
            raise Interrupted(_resume_line(training, how, command_line), code) from None
        if isinstance(error, DataError):  # found during training (a corrupt image): say how to go on once fixed
            raise DataError(f"{_own_message(error)}; {_resume_line(training, 'stopped', command_line)}") from None
        raise
    training.close()
    return history


def _own_message(error: Exception) -> str:
    """The error's message, without the worker traceback a DataLoader puts before it when a loader process
    raised it (a corrupt image)."""
    message = str(error)
    if "Original Traceback" in message:
        message = message.rstrip().splitlines()[-1].split(f"{type(error).__name__}: ", 1)[-1]
    return message


def main(argv: Iterable[str] | None = None) -> int:
    """The command: 0 on success, 2 on bad input or a full disk, 130 on Ctrl-C, 143 on SIGTERM, 1 on any other
    error."""
    with TerminateAsInterrupt() as stop:
        return _main(argv, stop)


def _main(argv: Iterable[str] | None, stop: TerminateAsInterrupt) -> int:
    rank = ""
    try:
        args = parse_args(argv)
        run(args, stop, command_line=argv is None)
    except SystemExit as exit_:  # argparse's own errors (and --help)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    except RunComplete as complete:
        print(f"bbfused-train: {complete}", flush=True)
        return 0
    except (UsageError, DataError, OutputError) as error:
        print(f"bbfused-train: error: {_own_message(error)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except Interrupted as interrupted:
        if os.environ.get("RANK", "0") == "0":  # only the main process writes, so only it knows what was saved
            print(f"bbfused-train: {interrupted}", file=sys.stderr, flush=True)
        return interrupted.code
    except KeyboardInterrupt:  # before training started
        how = "terminated (SIGTERM)" if stop.terminated else "interrupted"
        print(f"bbfused-train: {how} before training started; nothing was written", file=sys.stderr, flush=True)
        return EXIT_TERMINATED if stop.terminated else EXIT_INTERRUPTED
    except Exception:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            rank = f" (rank {os.environ.get('RANK', '?')})"
        print(f"bbfused-train{rank}: failed:", file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    return 0
