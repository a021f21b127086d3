"""The trainer's checkpoints and its one resume path: what a checkpoint holds, writing it, reading and verifying
it, and continuing a run from it.

* ``best.pth`` is written before ``checkpoint.pth``: a kill between the two leaves a best model at least as good
  as the one ``checkpoint.pth`` names, never an older one. Each goes through :func:`outputs.atomic_write`.
* A checkpoint is verified (the zip archive's CRC-32 of every record) before a run resumes from it.
* Resuming (:func:`resume_args`, then :func:`load_weights` and :func:`restore` as the run is built) takes the
  saved run's settings, except the options typed on the command line, and refuses the ones the checkpoint would
  silently override.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import saved_steps_per_epoch
from ..optimizer import BB
from .data import Shard
from .errors import RunComplete, UsageError
from .options import data_source, resolve_args, same_data
from .outputs import BEST, LATEST, LOG, atomic_write

CHECKPOINT_FORMAT = "bbfused-train checkpoint"
CHECKPOINT_VERSION = 1
# Options that are about this invocation, not the run: never saved as a run's settings nor taken from one.
INVOCATION_OPTIONS = ("resume", "auto_resume", "output_dir", "given_options", "overridden")
# Settings a resume cannot change: the checkpoint's model, optimizer state and random number generators restore
# them, so a value typed here would be ignored.
RESUME_FIXED = (
    "lr", "weight_decay", "momentum", "no_decay_norm_bias", "tau_min", "tau_max", "tau0", "beta", "bb_safeguard",
    "bb_preconditioner", "dropout", "seed",
)  # fmt: skip


@dataclass
class Progress:
    """How far a run got: what a checkpoint holds besides the model, the optimizer and the random numbers."""

    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch
    best_acc1: float = -math.inf
    best_epoch: int | None = None
    saved_epoch: int | None = None  # the epoch checkpoint.pth holds (None: none written by this run yet)

    def add(self, record: dict[str, Any]) -> bool:
        """Append an epoch's record; returns whether its test top-1 is the best so far (best.pth is rewritten)."""
        self.history.append(record)
        if record["test_acc1"] > self.best_acc1:
            self.best_acc1, self.best_epoch = record["test_acc1"], record["epoch"]
            return True
        return False


# ------------------------------------------------------------------------------------------- settings
def saved_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as a checkpoint stores them (paths as strings; the invocation's own options left out)."""
    return {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(args).items()
        if key not in INVOCATION_OPTIONS
    }


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def resume_settings(
    args: argparse.Namespace, given: frozenset[str], checkpoint: dict[str, Any]
) -> tuple[argparse.Namespace, list[str]]:
    """The settings a resumed run trains with: the saved run's, except the options typed on this command line
    (``given``; the device is never taken from the checkpoint). Returns them, unresolved, and one "--flag new
    (saved old)" entry per setting a typed option changed. Raises UsageError for a checkpoint of another model
    or optimizer, an option the resume would ignore (:data:`RESUME_FIXED`) and a run already trained as far."""
    path, saved = args.resume, checkpoint["args"]
    for option in ("model", "optimizer"):
        if option in given and getattr(args, option) != saved[option]:
            raise UsageError(
                f"--resume {path} is a checkpoint of --{option} {saved[option]}, but this run has --{option} "
                f"{getattr(args, option)}; resume with --{option} {saved[option]} or start a new run"
            )
    merged = argparse.Namespace(**vars(args))
    changed, fixed = [], []
    # Settings that follow from the kind of data: a resume on another kind takes their defaults for it.
    other_kind = "data" in given and data_source(args.data) != data_source(saved["data"])
    data_derived = ("image_size", "workers") if other_kind else ()
    for key, value in saved.items():
        if key in INVOCATION_OPTIONS or key in ("device", *data_derived) or not hasattr(args, key):
            continue
        current = getattr(args, key)
        if key == "data" and key in given and same_data(current, value):
            continue  # the same data, spelled another way: the path as typed now
        if key not in given:
            setattr(merged, key, Path(value) if isinstance(current, Path) and value is not None else value)
        elif current != value and not (isinstance(current, Path) and str(current) == value):
            (fixed if key in RESUME_FIXED else changed).append(f"{_flag(key)} {current} (saved {value})")
    if fixed:
        raise UsageError(
            f"--resume {path} restores the saved model, optimizer state and random numbers, so {', '.join(fixed)} "
            f"would be ignored; leave {'it' if len(fixed) == 1 else 'them'} out, or start a new run to change "
            f"{'it' if len(fixed) == 1 else 'them'}"
        )
    if checkpoint["epoch"] >= merged.epochs:
        raise UsageError(
            f"--resume {path} has already trained {checkpoint['epoch']} epochs; pass --epochs above that to continue"
        )
    return merged, changed


def saved_run(folder: Path) -> Path | None:
    """What ``--auto-resume`` continues in ``folder``: its checkpoint.pth (read through :func:`resume_args`,
    which falls back to best.pth when a kill left only that), or None when it holds no checkpoint."""
    return folder / LATEST if (folder / LATEST).is_file() or (folder / BEST).is_file() else None


def _last_logged_epoch(log: Path) -> int | None:
    try:
        lines = log.read_text().splitlines()
        return max((json.loads(line)["epoch"] for line in lines if line.strip()), default=None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _best_instead(path: Path) -> Path:
    """The checkpoint to read for ``--resume path``: ``path``, or best.pth beside a missing checkpoint.pth.

    best.pth is written before checkpoint.pth, so a kill between the two renames of the first epoch leaves
    best.pth alone, holding that epoch: the run continues from it. When the log records later epochs than
    best.pth holds, checkpoint.pth was lost some other way; continuing from best.pth would retrain those epochs
    and drop them from the log, so that takes typing --resume best.pth."""
    best = path.parent / BEST
    if path.is_file() or path.name != LATEST or not best.is_file():
        return path
    epoch = load_checkpoint(best)["epoch"]
    logged = _last_logged_epoch(path.parent / LOG)
    if logged is not None and logged > epoch:
        raise UsageError(
            f"--resume {path}: no such file, and {best} holds epoch {epoch} while {path.parent / LOG} records "
            f"epochs up to {logged}; continuing from {BEST} retrains epochs {epoch + 1}-{logged} and drops them from "
            f"the log: to do that, pass --resume {best}"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"note: {path} is missing (the run was stopped while writing epoch {epoch}'s files); continuing from "
            f"{best}, which holds epoch {epoch}",
            flush=True,
        )
    return best


def resume_args(args: argparse.Namespace) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Read and verify the checkpoint ``args.resume`` and return the resolved settings the run continues with,
    and the checkpoint. From :func:`parse_args` (``--resume`` or ``--auto-resume``), the options typed on the
    command line override the saved ones (each change is named in ``overridden``); settings whose ``resume``
    was set by hand afterwards all count as typed, so they are only checked against the checkpoint. Raises
    RunComplete when ``--auto-resume`` finds the run trained to its last epoch."""
    args.resume = _best_instead(args.resume)
    checkpoint = load_checkpoint(args.resume)
    given = getattr(args, "given_options", None) or frozenset()
    typed_resume = "resume" in given or "auto_resume" in given
    if getattr(args, "auto_resume", False):
        epochs = args.epochs if "epochs" in given else checkpoint["args"]["epochs"]
        if checkpoint["epoch"] >= epochs:
            raise RunComplete(f"{args.resume} holds all {epochs} epochs of this run; nothing to do")
    merged, changed = resume_settings(args, given if typed_resume else frozenset(vars(args)), checkpoint)
    merged = resolve_args(merged)
    merged.overridden = changed if typed_resume else []
    return merged, checkpoint


# ------------------------------------------------------------------------------------------- random numbers
def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random number generator states (dropout, augmentation seeds)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(shard: Shard, device: torch.device) -> list[dict[str, Any]]:
    """Every process's :func:`rng_state`, in rank order (a collective: every process calls it)."""
    state = rng_state(device)
    if shard.world == 1:
        return [state]
    states: list[Any] = [None] * shard.world
    dist.all_gather_object(states, state)
    return states


# ------------------------------------------------------------------------------------------- writing
def checkpoint_contents(
    args: argparse.Namespace,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    progress: Progress,
    rng_states: list[dict[str, Any]],
) -> dict[str, Any]:
    """Everything :func:`restore` needs to continue after the last epoch; ``rng_states`` has one entry per
    process."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": len(progress.history),
        "args": saved_settings(args),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "rng": rng_states,
        "history": progress.history,
        "best_acc1": progress.best_acc1,
        "best_epoch": progress.best_epoch,
    }


def save_checkpoints(out: Path, checkpoint: dict[str, Any], improved: bool) -> None:
    """``best.pth`` (when ``improved``) before ``checkpoint.pth``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    if improved:
        atomic_write(out / BEST, lambda p: torch.save(checkpoint, p))
    atomic_write(out / LATEST, lambda p: torch.save(checkpoint, p))


# ------------------------------------------------------------------------------------------- reading
def verify_checkpoint(path: Path) -> None:
    """Raise UsageError unless every record of the checkpoint archive matches its CRC-32 (torch.load itself
    reads tensor data without checking it: a flipped bit would resume silently)."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise UsageError(
            f"--resume {path} is not a readable checkpoint ({type(error).__name__}: {error}){_elsewhere(path)}"
        ) from None
    if damaged is not None:
        raise UsageError(
            f"--resume {path} is damaged: its record {damaged} does not match its checksum (a disk or copy error); "
            f"resume from another copy, or from {path.parent / BEST} if it is intact"
        )


def _elsewhere(path: Path) -> str:
    """The fix for an unreadable checkpoint: another copy, or the run's other checkpoint where there is one."""
    other = path.parent / (BEST if path.name == LATEST else LATEST)
    also = f", or from {other}" if other != path and other.is_file() else ""
    return f"; resume from another copy{also}, or start a new run"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and verify a checkpoint of this command."""
    if path.is_dir():
        raise UsageError(f"--resume {path} is a folder; pass the checkpoint in it: --resume {path / LATEST}")
    if not path.is_file():
        raise UsageError(f"--resume {path}: no such file; pass the checkpoint.pth of an earlier run")
    verify_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: torch raises several kinds
        raise UsageError(
            f"--resume {path} is not a readable checkpoint ({type(error).__name__}: {error}){_elsewhere(path)}"
        ) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"--resume {path} is not a bbfused-train checkpoint; pass the checkpoint.pth of a run")
    version = checkpoint.get("version")
    if version != CHECKPOINT_VERSION:
        newer = isinstance(version, int) and version > CHECKPOINT_VERSION
        raise UsageError(
            f"--resume {path} is a version {version!r} bbfused-train checkpoint, and this bbfused reads version "
            f"{CHECKPOINT_VERSION}; "
            + ("upgrade bbfused to resume it" if newer else "resume it with the bbfused that wrote it")
            + ", or start a new run"
        )
    return checkpoint


# ------------------------------------------------------------------------------------------- continuing
def load_weights(model: nn.Module, checkpoint: dict[str, Any], args: argparse.Namespace) -> None:
    """The saved weights into the freshly built ``model``; UsageError when they do not fit it."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise UsageError(
            f"--resume {args.resume} holds weights that do not fit {args.model} on this data "
            f"({str(error).splitlines()[0]}); resume with the data and model of the saved run"
        ) from None


def restore(
    checkpoint: dict[str, Any],
    path: Path,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    steps_per_epoch: int,
    shard: Shard,
    device: torch.device,
) -> Progress:
    """The optimizer, scaler and random number states of a checkpoint (already checked) into the built run;
    returns its progress. Restoring the random numbers comes last, after everything that draws them."""
    optimizer_state = checkpoint["optimizer"]
    if isinstance(optimizer, BB):
        try:
            saved_steps = saved_steps_per_epoch(optimizer_state)
        except ValueError as error:
            raise UsageError(f"--resume {path}: its optimizer state does not fit this run ({error})") from None
        if saved_steps != steps_per_epoch:
            raise UsageError(
                f"--resume {path} was trained with {saved_steps} steps per epoch, this run has "
                f"{steps_per_epoch}; resume with the saved --batch-size and --limit-train (leave them out) "
                f"and the same number of processes"
            )
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError) as error:
        raise UsageError(f"--resume {path}: its optimizer state does not fit this run ({error})") from None
    if scaler is not None and checkpoint["scaler"] is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    rng_states = checkpoint["rng"]
    if len(rng_states) == shard.world:
        set_rng_state(rng_states[shard.rank], device)
    elif shard.rank == 0:
        print(
            f"note: {path} was saved by {len(rng_states)} processes, this run has {shard.world}; "
            f"random numbers (dropout, augmentation) will differ from an uninterrupted run",
            flush=True,
        )
    return Progress(
        history=list(checkpoint["history"]),
        best_acc1=checkpoint["best_acc1"],
        best_epoch=checkpoint.get("best_epoch"),
        saved_epoch=checkpoint["epoch"],
    )
