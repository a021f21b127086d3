"""The training loop: one epoch of training, one evaluation, and :class:`Training`, which runs the epochs, prints
what happened and writes the outputs. Rolling back a diverged epoch is BB's own business (``BB.track_buffers``
restores BatchNorm statistics with the weights); the loop only reports it."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..interrupts import deferred_sigint
from ..optimizer import BB
from . import process_group
from .checkpoints import Progress, checkpoint_contents, gather_rng_states, save_checkpoints
from .data import Data, Shard
from .lock import OutputLock
from .outputs import LOG, PLOT, plot_history, write_log
from .report import describe, format_record, summary
from .schedules import apply_schedule

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --amp's choices
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
    # BB's rate control checks each epoch's mean loss (the paper's rule ignores it): every BB step gets it.
    takes_loss = isinstance(optimizer, BB)
    # A Ctrl-C or SIGTERM inside tqdm's constructor would leave an object whose __del__ prints a traceback.
    with deferred_sigint():
        bar = tqdm(
            total=len(loader), desc=description, unit="step", leave=False, disable=not progress, dynamic_ncols=True
        )
    start = last_time = time.perf_counter()
    last_step = last_images = 0
    try:
        for step, (images, labels) in enumerate(loader, 1):
            images, labels = _prepare_images(images, labels, device, channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            kwargs = {"loss": loss} if takes_loss else {}
            if scaler is None:
                loss.backward()
                optimizer.step(**kwargs)
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer, **kwargs)
                scaler.update()
            loss_sum += loss.detach() * labels.shape[0]
            images_seen += labels.shape[0]
            if progress:
                now = time.perf_counter()
                due = step == 1 or step % print_freq == 0 or step == len(loader) or now - last_time >= PROGRESS_SECONDS
                if due:
                    mean_loss = (loss_sum / images_seen).item()
                    rate = (images_seen - last_images) * world / max(now - last_time, 1e-9)
                    # BB's live rate: the first epoch's periods move it within the epoch. After the epoch's last
                    # step it is already the next epoch's: show the one the epoch ran at, as its line does.
                    ended = isinstance(optimizer, BB) and step == len(loader)
                    shown = optimizer.lr_history[-1] if ended else float(lr)
                    bar.set_postfix_str(f"loss {mean_loss:.4f}  lr {shown:.4g}  {rate:,.0f} img/s", refresh=False)
                    bar.update(step - last_step)
                    last_step, last_images, last_time = step, images_seen, now
    finally:
        bar.close()
    totals = _all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(images_seen), device=device)]), world)
    total_loss, total_images = totals.tolist()  # synchronises: the epoch's time includes all its work
    elapsed = time.perf_counter() - start
    return {
        # The rate the epoch ended with (BB: its last period's, what lr_history records).
        "lr": optimizer.lr_history[-1] if isinstance(optimizer, BB) else float(lr_used),
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
    progress: Progress = field(default_factory=Progress)
    skipped_before: int = 0  # BB's count of skipped non-finite gradient values at the last epoch end
    notes: list[str] = field(default_factory=list)  # printed before the first epoch
    lock: OutputLock | None = None  # the output folder's, held by the process that writes

    @property
    def is_main(self) -> bool:
        return self.shard.rank == 0

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every epoch's record so far, the resumed run's included."""
        return self.progress.history

    @property
    def start_epoch(self) -> int:
        return len(self.progress.history)

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """Train and evaluate epoch ``epoch`` (0-based); on the main process print its line and write the outputs.
        Returns the epoch's record (``epoch`` is 1-based in it)."""
        args, data = self.args, self.data
        if data.train_sampler is not None:
            data.train_sampler.set_epoch(epoch)
        if not isinstance(self.optimizer, BB):
            apply_schedule(self.optimizer, args.lr_schedule, args.lr, epoch, args.epochs, args.warmup_epochs)
        start = time.perf_counter()
        common = {"amp_dtype": AMP_DTYPES[args.amp], "channels_last": args.channels_last, "world": self.shard.world}
        train = train_one_epoch(
            self.train_model, self.optimizer, data.train, self.device, scaler=self.scaler, print_freq=args.print_freq,
            progress=self.is_main, description=f"epoch {epoch + 1}/{args.epochs}", **common,
        )  # fmt: skip
        test = evaluate(self.eval_model, data.test, self.device, data.num_classes, **common)
        record = {"epoch": epoch + 1, **train, **test, "time_s": time.perf_counter() - start, **self._bb_fields(epoch)}
        # Without a test set (synthetic data: random labels) no epoch is better: best.pth is the last one.
        improved = self.progress.add(record) or not data.has_test_set
        # Every process takes part in gathering the RNG states; only the main one prints and writes.
        states = gather_rng_states(self.shard, self.device) if args.output_dir is not None else None
        if self.is_main:
            # Written first: once the line shows, checkpoint.pth holds this epoch.
            if args.output_dir is not None:
                self._write_outputs(states, improved)
            print(format_record(record, args.epochs, data.has_test_set), flush=True)
        return record

    def _bb_fields(self, epoch: int) -> dict[str, Any]:
        """Whether BB rolled the epoch back and how many gradient values it skipped (in the paper's mode: no, 0)."""
        if not isinstance(self.optimizer, BB):
            return {}
        skipped, before = self.optimizer.skipped_gradient_values, self.skipped_before
        self.skipped_before = skipped
        return {"rolled_back": epoch in self.optimizer.rolled_back_epochs, "skipped_gradient_values": skipped - before}

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
            seconds = time.perf_counter() - start
            print(summary(self.progress, seconds, self.args.output_dir, self.data.has_test_set), flush=True)
        return self.progress.history

    def describe(self) -> str:
        """The line printed before the first epoch."""
        steps = len(self.data.train)
        return describe(self.args, steps, self.shard.world, self.optimizer, self.device, self.start_epoch)

    def close(self) -> None:
        """Leave the process group after a successful run (all ranks reach this barrier) and the output folder."""
        process_group.leave(self.shard)
        if self.lock is not None:
            self.lock.release()

    def abort(self) -> None:
        """Leave the process group after a failure without waiting for the other ranks, and the output folder
        (removed again if this run created it and wrote nothing into it)."""
        process_group.abort(self.shard)
        if self.lock is not None:
            self.lock.release(remove_created=True)

    def _write_outputs(self, rng_states: list[dict[str, Any]], improved: bool) -> None:
        out, args = self.args.output_dir, self.args
        with deferred_sigint():  # a Ctrl-C lands between the epochs' files, not inside them
            checkpoint = checkpoint_contents(args, self.model, self.optimizer, self.scaler, self.progress, rng_states)
            save_checkpoints(out, checkpoint, improved)
            self.progress.saved_epoch = len(self.progress.history)
            write_log(out / LOG, self.progress.history)
            title = f"{args.model}, {args.optimizer}, {args.data}"
            plot_history(out / PLOT, self.progress.history, title, self.data.has_test_set)
