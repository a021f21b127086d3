"""The ``bbfused-train`` command: run a training and turn every way it can end into one exit code and one
message.

* 0: done (a summary is printed).
* 2: an input that cannot work, or a full disk (the message says what to change).
* 130: interrupted (Ctrl-C): one line says which epoch ``checkpoint.pth`` holds and how to resume.
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

if TYPE_CHECKING:
    from .loop import Training

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


class Interrupted(Exception):
    """Ctrl-C during a run; carries the line that says where the run stands."""


def _resume_line(training: Training) -> str:
    from .outputs import LATEST

    out = training.args.output_dir
    if out is None:
        return "interrupted; nothing was saved (no --output-dir)"
    saved_epoch = training.progress.saved_epoch
    if saved_epoch is None:
        return f"interrupted before the first epoch ended; nothing to resume in {out}"
    return f"interrupted; {out / LATEST} holds epoch {saved_epoch}: continue with bbfused-train --resume {out / LATEST}"


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Prepare, train every epoch, leave the process group; returns the per-epoch records. On failure the
    process group is aborted (no barrier) and the error propagates; Ctrl-C becomes :class:`Interrupted`."""
    from .building import prepare  # here, not above: parsing and its errors need no torch

    training = prepare(args)
    try:
        history = training.fit()
    except KeyboardInterrupt:
        training.abort()
        raise Interrupted(_resume_line(training)) from None
    except BaseException:
        training.abort()
        raise
    training.close()
    return history


def main(argv: Iterable[str] | None = None) -> int:
    """The command: 0 on success, 2 on bad input or a full disk, 130 on Ctrl-C, 1 on any other error."""
    rank = ""
    try:
        args = parse_args(argv)
        run(args)
    except SystemExit as exit_:  # argparse's own errors (and --help)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    except RunComplete as complete:
        print(f"bbfused-train: {complete}", flush=True)
        return 0
    except (UsageError, DataError, OutputError) as error:
        print(f"bbfused-train: error: {error}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except Interrupted as interrupted:
        if os.environ.get("RANK", "0") == "0":  # only the main process writes, so only it knows what was saved
            print(f"bbfused-train: {interrupted}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # before training started
        print("bbfused-train: interrupted before training started; nothing was written", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            rank = f" (rank {os.environ.get('RANK', '?')})"
        print(f"bbfused-train{rank}: failed:", file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    return 0
