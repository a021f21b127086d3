"""The training loop: one epoch of training, one evaluation, and :class:`Training`, which runs the epochs, prints
what happened and writes the outputs. Rolling back a diverged epoch is BB's own business (``BB.track_buffers``
restores BatchNorm statistics with the weights); the loop only reports it."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..interrupts import deferred_sigint
from ..optimizer import BB
from .data import Data, Shard
from .options import AMP_DTYPES, UsageError, saved_settings
from .outputs import (
    BEST,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    LATEST,
    LOG,
    PLOT,
    plot_history,
    rng_state,
    save_checkpoints,
    set_rng_state,
    write_log,
)

# The progress bar shows a figure after the first step and then at least this often (each update reads the
# running loss from the device: one sync).
PROGRESS_SECONDS = 2.0


def learning_rate(optimizer: torch.optim.Optimizer) -> torch.Tensor | float:
    """The learning rate the next step uses: BB's device tensor (reading it syncs), a float otherwise."""
    return optimizer.lr_tensor if isinstance(optimizer, BB) else optimizer.param_groups[0]["lr"]


def _prepare_images(images: torch.Tensor, labels: torch.Tensor, device: torch.device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last and images.ndim == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def _all_reduce_sum(values: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(values)
    return values


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    device: torch.device,
    *,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    channels_last: bool = False,
    world: int = 1,
    print_freq: int = 50,
    progress: bool = False,
    description: str = "",
) -> dict[str, float]:
    """One pass over ``loader``. Returns ``lr`` (the rate the epoch used), ``train_loss`` (mean over all images
    of all processes), ``images_per_s`` (all processes) and ``train_time_s``.

    The loss is accumulated on the device; the host reads it for the progress bar after the first step, every
    ``print_freq`` steps, and whenever PROGRESS_SECONDS passed since the last update."""
    model.train()
    lr = learning_rate(optimizer)
    lr_used = lr.clone() if isinstance(lr, torch.Tensor) else lr  # BB rewrites its tensor at the epoch's end
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    images_seen = 0
    watches_loss = isinstance(optimizer, BB) and optimizer.safeguard  # its rate control checks each epoch's loss
    bar = tqdm(total=len(loader), desc=description, unit="step", leave=False, disable=not progress, dynamic_ncols=True)
    start = last_time = time.perf_counter()
    last_step = last_images = 0
    for step, (images, labels) in enumerate(loader, 1):
        images, labels = _prepare_images(images, labels, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        step_kwargs = {"loss": loss} if watches_loss else {}
        if scaler is None:
            loss.backward()
            optimizer.step(**step_kwargs)
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer, **step_kwargs)
            scaler.update()
        loss_sum += loss.detach() * labels.shape[0]
        images_seen += labels.shape[0]
        if progress:
            now = time.perf_counter()
            due = step == 1 or step % print_freq == 0 or step == len(loader) or now - last_time >= PROGRESS_SECONDS
            if due:
                mean_loss = (loss_sum / images_seen).item()
                rate = (images_seen - last_images) * world / max(now - last_time, 1e-9)
                bar.set_postfix_str(f"loss {mean_loss:.4f}  lr {float(lr_used):.4g}  {rate:,.0f} img/s", refresh=False)
                bar.update(step - last_step)
                last_step, last_images, last_time = step, images_seen, now
    bar.close()
    totals = _all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(images_seen), device=device)]), world)
    total_loss, total_images = totals.tolist()  # synchronises: the epoch's time includes all its work
    elapsed = time.perf_counter() - start
    return {
        "lr": float(lr_used),
        "train_loss": total_loss / total_images,
        "images_per_s": total_images / elapsed,
        "train_time_s": elapsed,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    num_classes: int,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    world: int = 1,
) -> dict[str, float]:
    """Mean ``test_loss`` and ``test_acc1`` in percent over the test images of all processes, and
    ``test_acc5`` when there are more than 10 classes. Pass the model without its DDP wrapper."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    k = min(5, num_classes)
    for images, labels in loader:
        images, labels = _prepare_images(images, labels, device, channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        hits = logits.topk(k, dim=1).indices.eq(labels[:, None])
        totals[0] += F.cross_entropy(logits.float(), labels, reduction="sum")
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(dim=1).sum()
        totals[3] += labels.shape[0]
    loss_sum, top1, top5, count = _all_reduce_sum(totals, world).tolist()
    if count == 0:
        return {"test_loss": math.nan, "test_acc1": math.nan}
    result = {"test_loss": loss_sum / count, "test_acc1": 100.0 * top1 / count}
    if num_classes > 10:
        result["test_acc5"] = 100.0 * top5 / count
    return result


def format_record(record: dict[str, Any], epochs: int) -> str:
    """The one line printed after each epoch."""
    acc5 = f"  top-5 {record['test_acc5']:6.2f}%" if "test_acc5" in record else ""
    return (
        f"epoch {record['epoch']:>{len(str(epochs))}}/{epochs}  lr {record['lr']:.6g}  "
        f"train loss {record['train_loss']:.4f}  test top-1 {record['test_acc1']:6.2f}%{acc5}  "
        f"{record['images_per_s']:,.0f} img/s  {record['time_s']:.1f} s"
        + ("  diverged: BB rolled the epoch back" if record.get("rolled_back") else "")
        + (
            f"  {record['skipped_gradient_values']} non-finite gradient values skipped"
            if record.get("skipped_gradient_values")
            else ""
        )
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Training:
    """Everything a run needs, built by :func:`bbfused.train.prepare`. ``model`` is the bare module (saved and
    evaluated), ``train_model`` what training calls (compiled and/or DDP-wrapped)."""

    args: argparse.Namespace
    shard: Shard
    device: torch.device
    data: Data
    model: nn.Module
    train_model: nn.Module
    eval_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_acc1: float = -math.inf
    best_epoch: int | None = None
    skipped_before: int = 0  # BB's count of skipped non-finite gradient values at the last epoch end
    notes: list[str] = field(default_factory=list)  # printed before the first epoch
    saved_epoch: int | None = None  # the epoch checkpoint.pth holds (None: none written by this run yet)

    @property
    def is_main(self) -> bool:
        return self.shard.rank == 0

    @property
    def start_epoch(self) -> int:
        return len(self.history)

    def describe(self) -> str:
        args = self.args
        data = "MNIST" if args.data == "mnist" else args.data
        line = (
            f"{args.model} on {data}: {len(self.data.train)} steps/epoch of {args.batch_size} images"
            f"{f' x {self.shard.world} processes' if self.shard.world > 1 else ''}, {args.optimizer} lr {args.lr:g}"
        )
        if isinstance(self.optimizer, BB):
            backends = ", ".join(sorted(set(self.optimizer.active_backends.values())))
            line += f" (tau {args.tau_min:.3g}..{args.tau_max:.3g}, {backends})"
        line = f"{line}, weight decay {args.weight_decay:g}, device {self.device}, amp {args.amp}"
        return f"{line}; resuming after epoch {self.start_epoch}" if self.start_epoch else line

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train and evaluate epoch ``epoch`` (0-based); on the main process print its line and write the outputs.
        Returns the epoch's record (``epoch`` is 1-based in it)."""
        args = self.args
        amp_dtype = AMP_DTYPES[args.amp]
        if self.data.train_sampler is not None:
            self.data.train_sampler.set_epoch(epoch)
        start = time.perf_counter()
        safeguarded = isinstance(self.optimizer, BB) and self.optimizer.safeguard
        train = train_one_epoch(
            self.train_model,
            self.optimizer,
            self.data.train,
            self.device,
            amp_dtype=amp_dtype,
            scaler=self.scaler,
            channels_last=args.channels_last,
            world=self.shard.world,
            print_freq=args.print_freq,
            progress=self.is_main,
            description=f"epoch {epoch + 1}/{args.epochs}",
        )
        test = evaluate(
            self.eval_model,
            self.data.test,
            self.device,
            self.data.num_classes,
            amp_dtype=amp_dtype,
            channels_last=args.channels_last,
            world=self.shard.world,
        )
        record = {"epoch": epoch + 1, **train, **test, "time_s": time.perf_counter() - start}
        if safeguarded:
            record["rolled_back"] = epoch in self.optimizer.rolled_back_epochs
            skipped = self.optimizer.skipped_gradient_values
            record["skipped_gradient_values"] = skipped - self.skipped_before
            self.skipped_before = skipped
        self.history.append(record)
        improved = record["test_acc1"] > self.best_acc1
        if improved:
            self.best_acc1, self.best_epoch = record["test_acc1"], epoch + 1
        # Every process takes part in gathering the RNG states; only the main one prints and writes.
        states = self._gather_rng_states() if args.output_dir is not None else None
        if self.is_main:
            # Written first: once the line shows, checkpoint.pth holds this epoch.
            if args.output_dir is not None:
                self._write_outputs(states, improved)
            print(format_record(record, args.epochs), flush=True)
        return record

    def fit(self) -> list[dict[str, Any]]:
        """Train from the start (or the resumed) epoch to ``args.epochs``, then print a summary; returns every
        epoch's record."""
        start = time.perf_counter()
        if self.is_main:
            print(self.describe(), flush=True)
            for note in self.notes:
                print(note, flush=True)
        for epoch in range(self.start_epoch, self.args.epochs):
            self.run_epoch(epoch)
        if self.is_main:
            print(self.summary(time.perf_counter() - start), flush=True)
        return self.history

    def summary(self, seconds: float) -> str:
        """The closing lines: the best epoch, the time, what was rolled back, where the outputs are."""
        trained = len(self.history)
        lines = [f"done: {trained} epochs in {_duration(seconds)}"]
        if self.best_epoch is not None:
            lines[0] += f"; best test top-1 {self.best_acc1:.2f}% at epoch {self.best_epoch}"
        rolled_back = [r["epoch"] for r in self.history if r.get("rolled_back")]
        if rolled_back:
            lines.append(f"BB rolled back epoch(s) {', '.join(map(str, rolled_back))} (diverged; weights restored)")
        out = self.args.output_dir
        if out is not None:
            best = f"{BEST} (epoch {self.best_epoch}), " if self.best_epoch is not None else ""
            lines.append(f"outputs in {out}: {LATEST} (last epoch), {best}{LOG}, {PLOT}")
        return "\n".join(lines)

    def close(self) -> None:
        """Leave the process group after a successful run (all ranks reach this barrier)."""
        if self.shard.world > 1 and dist.is_initialized():
            dist.barrier()  # gloo may abort a process that tears its group down while another is still in it
            dist.destroy_process_group()

    def abort(self) -> None:
        """Leave the process group after a failure without waiting for the other ranks: their pending
        collectives fail at once (gloo: connection closed) instead of waiting out the timeout."""
        if self.shard.world > 1 and dist.is_initialized():
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            try:
                abort() if abort is not None else dist.destroy_process_group()
            except Exception:  # the group may be broken already; the process is exiting anyway
                pass

    def _gather_rng_states(self) -> list[dict[str, Any]]:
        state = rng_state(self.device)
        if self.shard.world == 1:
            return [state]
        states: list[Any] = [None] * self.shard.world
        dist.all_gather_object(states, state)
        return states

    def checkpoint(self, rng_states: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything :meth:`restore` needs to continue after the last epoch; ``rng_states`` has one entry
        per process."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": len(self.history),
            "args": saved_settings(self.args),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": rng_states,
            "history": self.history,
            "best_acc1": self.best_acc1,
            "best_epoch": self.best_epoch,
        }

    def _write_outputs(self, rng_states: list[dict[str, Any]], improved: bool) -> None:
        out = self.args.output_dir
        with deferred_sigint():  # a Ctrl-C lands between the epochs' files, not inside them
            save_checkpoints(out, self.checkpoint(rng_states), improved)
            self.saved_epoch = len(self.history)
            write_log(out / LOG, self.history)
            plot_history(out / PLOT, self.history, f"{self.args.model}, {self.args.optimizer}, {self.args.data}")

    def restore(self, checkpoint: dict[str, Any], path: Path) -> None:
        """Load a checkpoint (already checked) into the built training."""
        optimizer_state = checkpoint["optimizer"]
        if isinstance(self.optimizer, BB):
            saved_steps = optimizer_state["bb"]["steps_per_epoch"]
            if saved_steps != len(self.data.train):
                raise UsageError(
                    f"--resume {path} was trained with {saved_steps} steps per epoch, this run has "
                    f"{len(self.data.train)}; resume with the saved --batch-size and --limit-train (leave them out) "
                    f"and the same number of processes"
                )
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as error:
            raise UsageError(f"--resume {path}: its optimizer state does not fit this run ({error})") from None
        if self.scaler is not None and checkpoint["scaler"] is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        rng_states = checkpoint["rng"]
        if len(rng_states) == self.shard.world:
            set_rng_state(rng_states[self.shard.rank], self.device)
        elif self.is_main:
            print(
                f"note: {path} was saved by {len(rng_states)} processes, this run has {self.shard.world}; "
                f"random numbers (dropout, augmentation) will differ from an uninterrupted run",
                flush=True,
            )
        self.history = list(checkpoint["history"])
        self.best_acc1 = checkpoint["best_acc1"]
        self.best_epoch = checkpoint.get("best_epoch")
        self.saved_epoch = checkpoint["epoch"]
