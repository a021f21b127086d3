"""What a run prints: the line that describes it, one line per epoch, and the closing summary."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from ..optimizer import BB
from .bb_source import preconditioned_first_rate
from .checkpoints import Progress
from .outputs import BEST, LATEST, LOG, PLOT
from .schedules import describe_schedule


def describe(
    args: argparse.Namespace,
    steps_per_epoch: int,
    world: int,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    start_epoch: int,
) -> str:
    """The first line: model, data, steps, optimizer and its settings, device; and where a resumed run starts."""
    data = "MNIST" if args.data == "mnist" else args.data
    line = (
        f"{args.model} on {data}: {steps_per_epoch} steps/epoch of {args.batch_size} images"
        f"{f' x {world} processes' if world > 1 else ''}, {args.optimizer} lr {args.lr:g}"
    )
    if isinstance(optimizer, BB):
        backends = ", ".join(sorted(set(optimizer.active_backends.values())))
        mode = "default" if args.bb_safeguard else "paper's method"
        if args.bb_preconditioner == "adam":  # its run starts at min(lr, a limit)
            first = min(args.lr, preconditioned_first_rate())
            mode += f", Adam-scaled step{f' starting at {first:g}' if first != args.lr else ''}"
        line += f" ({mode}, rate bounds {optimizer.tau_min:.3g}..{optimizer.tau_max:.3g}, {backends})"
    elif schedule := describe_schedule(args.lr_schedule, args.epochs, args.warmup_epochs):
        line += f", {schedule}"
    line = f"{line}, weight decay {args.weight_decay:g}, device {device}, amp {args.amp}"
    return f"{line}; resuming after epoch {start_epoch}" if start_epoch else line


def format_record(record: dict[str, Any], epochs: int, test_set: bool = True) -> str:
    """The one line printed after each epoch. ``test_set`` False (synthetic data, whose labels are random):
    no accuracy is shown, since it would mean nothing."""
    acc5 = f"  top-5 {record['test_acc5']:6.2f}%" if "test_acc5" in record else ""
    test = f"test top-1 {record['test_acc1']:6.2f}%{acc5}" if test_set else "no test set (synthetic data)"
    rolled_back = ""
    if record.get("rolled_back"):
        # A split first epoch returns to its last good period's end; a later epoch to the previous epoch's end.
        epoch = record["epoch"]
        restored = "a good point earlier in it" if epoch == 1 else f"the weights of epoch {epoch - 1}"
        rolled_back = f"  diverged: BB rolled the epoch back to {restored} (the test figures are theirs)"
    return (
        f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}  lr {record['lr']:.6g}  "
        f"train loss {record['train_loss']:.4f}  {test}  "
        f"{record['images_per_s']:,.0f} img/s  {record['time_s']:.1f} s"
        + rolled_back
        + (
            f"  {record['skipped_gradient_values']} non-finite gradient values skipped"
            if record.get("skipped_gradient_values")
            else ""
        )
    )


def duration(seconds: float) -> str:
    """``seconds`` in s, min or h, whichever reads best."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def summary(progress: Progress, seconds: float, output_dir: Path | None, test_set: bool = True) -> str:
    """The closing lines: the best epoch (with a test set), the time, what was rolled back, where the outputs
    are."""
    trained = len(progress.history)
    lines = [f"done: {trained} epochs in {duration(seconds)}"]
    if progress.best_epoch is not None and test_set:
        lines[0] += f"; best test top-1 {progress.best_acc1:.2f}% at epoch {progress.best_epoch}"
    rolled_back = [r["epoch"] for r in progress.history if r.get("rolled_back")]
    if rolled_back:
        epochs = ", ".join(map(str, rolled_back))
        lines.append(f"BB rolled back epoch(s) {epochs} (diverged, or its loss jumped; weights restored)")
    if output_dir is not None:
        if not test_set:  # no epoch is better than another: best.pth is the last one too
            lines.append(f"outputs in {output_dir}: {LATEST} and {BEST} (last epoch), {LOG}, {PLOT}")
        else:
            best = f"{BEST} (epoch {progress.best_epoch}), " if progress.best_epoch is not None else ""
            lines.append(f"outputs in {output_dir}: {LATEST} (last epoch), {best}{LOG}, {PLOT}")
    return "\n".join(lines)


def _launcher(options: list[str]) -> list[str] | None:
    """How this process was started, without ``options`` (its command-line options): the interpreter and
    ``-m bbfused.train`` as typed, the ``bbfused-train`` script, or, under torchrun, torchrun's own command
    (read from the parent process on Linux). None when it cannot be told."""
    count = len(options)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        try:
            parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")[:-1]
        except OSError:
            return None
        return parent[: len(parent) - count] if parent[len(parent) - count :] == options else None
    started = list(getattr(sys, "orig_argv", []))  # Python 3.10+
    if not started or started[len(started) - count :] != options:
        return None
    prefix = started[: len(started) - count]
    script = prefix[-1] if len(prefix) == 2 and Path(prefix[-1]).name == "bbfused-train" else None
    if script is not None:  # the console script, run by its interpreter: name the script as the shell finds it
        return ["bbfused-train"] if shutil.which("bbfused-train") == script else [script]
    return prefix


def restart_command(options: list[str], command_line: bool) -> str:
    """The shell command that runs bbfused-train with ``options``, spelled the way this process was started
    (``.venv/bin/python -m bbfused.train`` where that is how it ran: ``bbfused-train`` may not be on PATH).
    ``command_line``: this process runs the command (else, driven from Python, this interpreter's ``-m``)."""
    launcher = _launcher(sys.argv[1:]) if command_line else None
    if launcher is None:
        launcher = [sys.executable, "-m", "bbfused.train"]
    return shlex.join([*launcher, *options])
