"""Building a run from its settings: the data, the model, the optimizer, and the state of a resumed run
(:mod:`.checkpoints`). Everything that can be wrong with the inputs raises UsageError, DataError or OutputError here,
before any file is written."""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..optimizer import BB
from .checkpoints import load_weights, restore, resume_args, saved_run
from .data import Data, DataError, Shard, check_image_folder, folder_data, mnist_data, synthetic_data
from .errors import UsageError
from .lock import lock_output_dir
from .loop import Training
from .models import build_model, is_shallow, torchvision_model_names
from .options import OPTIMIZERS
from .outputs import (
    LOG,
    check_free_space,
    check_output_location,
    check_previous_run,
    remove_stale_temporaries,
    state_bytes,
    write_log,
)
from .process_group import init_distributed

# Tensors of optimizer state per parameter tensor, for the checkpoint size before the first step.
STATE_SLOTS = {"bb": 4, "sgd": 1, "nag": 1, "adam": 2, "amsgrad": 3, "adagrad": 1, "rmsprop": 2}
# A model with more parameters than this on images at least this large is a GPU-sized job on a CPU.
GPU_SIZED_PARAMETERS = 5_000_000
GPU_SIZED_IMAGE = 128


def parameter_groups(model: nn.Module, weight_decay: float, no_decay_norm_bias: bool) -> list[dict[str, Any]]:
    """One group with ``weight_decay``, or, with ``no_decay_norm_bias``, a second group without decay for
    the parameters of at most one dimension (biases and norm scales and shifts), as timm does."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not no_decay_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(
    name: str, groups: list[dict[str, Any]], args: argparse.Namespace, steps_per_epoch: int
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (one of OPTIMIZERS) over parameter ``groups`` with the resolved ``args``.

    BB ends its epochs itself after ``steps_per_epoch`` steps. On CUDA the torch optimizers that have a
    fused kernel (SGD, NAG, Adam, AMSGrad) use it, so BB is compared with the fastest torch step."""
    if name == "bb":
        return BB(
            groups,
            lr=args.lr,
            steps_per_epoch=steps_per_epoch,
            epochs=args.epochs,
            momentum=args.momentum,
            beta=args.beta,
            tau0=args.tau0,
            tau_min=args.tau_min,
            tau_max=args.tau_max,
            backend=args.bb_backend,
            safeguard=args.bb_safeguard,
            preconditioner=None if args.bb_preconditioner == "none" else args.bb_preconditioner,
        )
    on_cuda = all(p.is_cuda for group in groups for p in group["params"])
    fused = {"fused": True} if on_cuda else {}
    if name in ("sgd", "nag"):
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=name == "nag", **fused)
    if name in ("adam", "amsgrad"):
        return torch.optim.Adam(groups, lr=args.lr, amsgrad=name == "amsgrad", **fused)
    if name == "adagrad":
        return torch.optim.Adagrad(groups, lr=args.lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=args.lr)
    raise UsageError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def build_data(args: argparse.Namespace, shard: Shard, device: torch.device) -> Data:
    """The data source ``args.data`` names, sharded for this process."""
    limits = dict(limit_train=args.limit_train, limit_test=args.limit_test)
    if args.data == "mnist":
        # torchvision models are built for RGB: they see the gray channel three times.
        channels = 3 if args.model in torchvision_model_names() else 1
        return mnist_data(args.batch_size, shard, device, args.seed, **limits, channels=channels)
    if args.data == "synthetic":
        return synthetic_data(args.image_size, args.batch_size, device, args.seed, **limits)
    return folder_data(
        Path(args.data),
        args.image_size,
        args.batch_size,
        args.workers,
        shard,
        args.seed,
        pin_memory=device.type == "cuda",
        **limits,
    )


def gpu_size_hint(args: argparse.Namespace, model: nn.Module, device: torch.device) -> str | None:
    """A one-line note when a GPU-sized job is about to train on a CPU (tens of seconds a step), else None."""
    if device.type != "cpu" or is_shallow(args.model) or args.data == "mnist":
        return None
    parameters = sum(p.numel() for p in model.parameters())
    if parameters < GPU_SIZED_PARAMETERS or args.image_size < GPU_SIZED_IMAGE:
        return None
    return (
        f"note: {args.model} ({parameters / 1e6:.1f} M parameters) on {args.image_size}x{args.image_size} images "
        f"is a GPU-sized job: on this CPU a step of {args.batch_size} images takes seconds to minutes. Train on a "
        f"GPU (--device cuda), or try it small: --model resnet18 --image-size 64 --limit-train 2048"
    )


def prepare(args: argparse.Namespace) -> Training:
    """Check the inputs, then build data, model and optimizer. With ``args.resume`` the run continues from that
    checkpoint, with its saved settings unless an option typed on the command line overrides one
    (:func:`bbfused.train.checkpoints.resume_args`). Everything that can be wrong with the inputs raises
    UsageError, DataError or OutputError here, before any file is written."""
    checkpoint = None
    if getattr(args, "auto_resume", False) and args.resume is None:
        args.resume = saved_run(args.output_dir)
    if args.resume is not None:
        args, checkpoint = resume_args(args)
    lock = None
    if args.output_dir is not None:
        check_output_location(args.output_dir)
        if int(os.environ.get("RANK", "0")) == 0:  # the process that writes
            lock = lock_output_dir(args.output_dir)
    try:
        if args.output_dir is not None:
            check_previous_run(args.output_dir, args.resume)
            if lock is not None:
                remove_stale_temporaries(args.output_dir)  # killed runs'; they hold space this run needs
        if args.data not in ("mnist", "synthetic"):
            check_image_folder(Path(args.data))
        shard, device = init_distributed(args.device)
        try:
            training = _build(args, shard, device, checkpoint)
        except BaseException:
            if shard.world > 1:
                dist.destroy_process_group()
            raise
    except BaseException:
        if lock is not None:
            lock.release(remove_created=True)
        raise
    training.lock = lock
    if lock is not None and lock.stale_owner is not None:
        pid, host = lock.stale_owner
        training.notes.append(
            f"note: the run of pid {pid}{f' on {host}' if host else ''} in {args.output_dir} ended without "
            f"releasing its lock (it was killed); this run took it over"
        )
    return training


def _build(args: argparse.Namespace, shard: Shard, device: torch.device, checkpoint: dict[str, Any] | None) -> Training:
    # Rank 0's initial weights reach every process through DDP; dropout differs per process.
    torch.manual_seed(args.seed + shard.rank)
    random.seed(args.seed + shard.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = build_data(args, shard, device)
    if len(data.train) == 0:
        raise DataError(
            f"--data {args.data} gives no full training batch: each of the {shard.world} process(es) gets fewer "
            f"than --batch-size {args.batch_size} images; lower --batch-size"
        )
    try:
        model = build_model(args.model, data.num_classes, data.in_channels, data.image_size, args.dropout or 0.0)
    except ValueError as error:  # a model that cannot take this data's images
        raise UsageError(f"--model {args.model} on --data {args.data}: {error}") from None
    if checkpoint is not None:
        load_weights(model, checkpoint, args)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    compiled = torch.compile(model) if args.compile else model
    train_model = compiled
    if shard.world > 1:
        # gradient_as_bucket_view stays False: BB's gradients are views of its own flat buffer.
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(compiled, device_ids=device_ids)
    groups = parameter_groups(model, args.weight_decay, args.no_decay_norm_bias)
    optimizer = build_optimizer(args.optimizer, groups, args, steps_per_epoch=len(data.train))
    if isinstance(optimizer, BB):
        optimizer.track_buffers(model)  # a rolled-back epoch restores BatchNorm's running statistics too
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    training = Training(args, shard, device, data, model, train_model, compiled, optimizer, scaler)
    hint = gpu_size_hint(args, model, device)
    if hint is not None:
        training.notes.append(hint)
    for change in getattr(args, "overridden", []):
        training.notes.append(f"note: resuming with {change}")
    if args.output_dir is not None and shard.rank == 0:
        # torch's optimizers create their state at the first step: count it from the parameters instead.
        parameter_bytes = state_bytes([p for group in groups for p in group["params"]])
        optimizer_bytes = max(state_bytes(optimizer.state_dict()), STATE_SLOTS[args.optimizer] * parameter_bytes)
        check_free_space(args.output_dir, state_bytes(model.state_dict()) + optimizer_bytes)
    if checkpoint is not None:
        # Last: it restores the random number generators.
        training.progress = restore(checkpoint, args.resume, optimizer, scaler, len(data.train), shard, device)
        if shard.rank == 0 and args.output_dir is not None:
            # The log restarts from the checkpoint, dropping epochs a crash left after it.
            args.output_dir.mkdir(parents=True, exist_ok=True)
            write_log(args.output_dir / LOG, training.progress.history)
    return training
