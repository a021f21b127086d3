"""``python -m bbfused.train`` (``bbfused-train``): train a classifier with BB or one of the paper's baselines.

Defaults: the paper's MLP on the MNIST files shipped with bbfused. ``--data PATH`` trains on an ImageNet-style
folder (ResNet-50 by default), ``--data synthetic`` on random device batches (pure training throughput).
Launched by ``torchrun --nproc_per_node N`` it trains with DDP; ``--batch-size`` is per process.

The pieces are importable, so experiments can drive training from Python::

    training = prepare(parse_args(["--model", "lenet", "--optimizer", "adam", "--epochs", "5"]))
    try:
        history = training.fit()          # or training.run_epoch(epoch) for epoch in ...
    finally:
        training.close()
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
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

from .backends import BACKEND_NAMES
from .data import Data, DataError, Shard, check_image_folder, folder_data, mnist_data, synthetic_data
from .models import build_model, is_shallow, model_names, torchvision_model_names
from .optimizer import BB

OPTIMIZERS = ("bb", "sgd", "nag", "adam", "amsgrad", "adagrad", "rmsprop")
# The initial learning rate when --lr is not given: the paper's 0.1 for BB and SGD, the usual defaults otherwise
# (torch's, but 1e-3 for RMSprop: torch's 1e-2 diverges on the paper's MLP).
DEFAULT_LR = {"bb": 0.1, "sgd": 0.1, "nag": 0.1, "adam": 1e-3, "amsgrad": 1e-3, "adagrad": 1e-2, "rmsprop": 1e-3}
MOMENTUM_OPTIMIZERS = ("sgd", "nag")
# The paper's BB bounds (tau_min, tau_max): shallow networks and deep ones.
SHALLOW_TAUS, DEEP_TAUS = (1 / 3, 3.0), (0.1, 10.0)
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_FORMAT = "bbfused-train checkpoint"
CHECKPOINT_VERSION = 1
LATEST, BEST, LOG, PLOT = "checkpoint.pth", "best.pth", "log.jsonl", "curves.png"


class UsageError(ValueError):
    """A command-line input that cannot work; the message names the problem and the fix (exit code 2)."""


# ============================================================================================ arguments
def _number(kind: type, test, requirement: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"{text!r} must be {requirement}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v > 0, "an integer > 0")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "> 0")
non_negative_float = _number(float, lambda v: v >= 0, ">= 0")
fraction = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")
beta_value = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")


def build_parser() -> argparse.ArgumentParser:
    """The command line; options not given stay None and :func:`resolve_args` fills in their defaults."""
    parser = argparse.ArgumentParser(
        prog="bbfused-train",
        description="Train a classifier with the Barzilai-Borwein adaptive learning rate (bbfused.BB) or a "
        "baseline optimizer. Use torchrun --nproc_per_node N for data-parallel training.",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        default="mnist",
        help="'mnist' (the files shipped with bbfused), 'synthetic' (random batches kept on the device) or "
        "a folder with train/ and val/ class sub-folders (default: mnist)",
    )
    data.add_argument(
        "--image-size",
        "--resolution",
        type=positive_int,
        metavar="PIXELS",
        help="crop size for folders and synthetic data (default 224); MNIST stays 28x28",
    )
    data.add_argument(
        "--limit-train", type=positive_int, metavar="N", help="train on a fixed random subset of N images"
    )
    data.add_argument(
        "--limit-test", type=positive_int, metavar="N", help="evaluate on a fixed random subset of N images"
    )
    data.add_argument(
        "--workers",
        type=non_negative_int,
        metavar="N",
        help="data loader processes for folders (default: min(8, CPUs))",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", help="mlp, lenet or a torchvision model name (default: mlp for mnist, resnet50 otherwise)"
    )
    model.add_argument("--dropout", type=fraction, help="dropout of the mlp's hidden layers (default 0.2)")

    optim = parser.add_argument_group("optimizer")
    optim.add_argument("--optimizer", default="bb", choices=OPTIMIZERS, help="(default: bb)")
    optim.add_argument(
        "--lr",
        type=positive_float,
        help="initial learning rate (default 0.1 for bb, sgd, nag; 1e-3 for adam, amsgrad, rmsprop; 1e-2 for adagrad)",
    )
    optim.add_argument(
        "--weight-decay", type=non_negative_float, default=5e-4, help="L2 penalty (default: 5e-4, the paper's)"
    )
    optim.add_argument("--momentum", type=fraction, help="momentum of sgd and nag (default 0.9)")
    optim.add_argument(
        "--no-decay-norm-bias",
        action="store_true",
        help="no weight decay on norm and bias parameters (those with at most one dimension)",
    )
    optim.add_argument("--tau-min", type=positive_float, help="BB lower bound (default 1/3 for mlp, lenet; else 0.1)")
    optim.add_argument("--tau-max", type=positive_float, help="BB upper bound (default 3 for mlp, lenet; else 10)")
    optim.add_argument("--tau0", type=positive_float, help="BB fallback rate numerator (default 1)")
    optim.add_argument("--beta", type=beta_value, help="BB gradient EMA factor (default 4/steps per epoch)")
    optim.add_argument("--bb-backend", choices=BACKEND_NAMES, help="BB kernels (default auto: fastest available)")
    optim.add_argument(
        "--bb-safeguard",
        action=argparse.BooleanOptionalAction,
        help="BB's rate control: bounded rate steps, rollback of a diverged epoch (default: on; see "
        "bbfused/control.py); --no-bb-safeguard is the paper's method exactly",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--epochs", type=positive_int, default=10, help="(default: 10)")
    run.add_argument("--batch-size", type=positive_int, default=128, help="per process (default: 128)")
    run.add_argument("--seed", type=non_negative_int, default=0, help="(default: 0)")
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    run.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none", help="mixed precision (fp16 uses GradScaler)")
    run.add_argument("--channels-last", action="store_true", help="channels-last memory format for model and images")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument(
        "--resume", type=Path, metavar="PATH", help="continue the run saved in this checkpoint (in its folder)"
    )
    run.add_argument(
        "--output-dir",
        type=Path,
        metavar="PATH",
        help="where to write log.jsonl, checkpoints and curves.png (default: none, or the --resume folder)",
    )
    run.add_argument(
        "--print-freq", type=positive_int, default=50, metavar="N", help="progress bar update every N steps"
    )
    return parser


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    """Parse and resolve the command line (argparse exits with code 2 on a malformed one)."""
    return resolve_args(build_parser().parse_args(None if argv is None else list(argv)))


def _resolve_device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: this command trains on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} GPU(s)")
    return name


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the defaults that depend on other options and reject combinations that cannot work."""
    source = args.data if args.data in ("mnist", "synthetic") else "folder"
    args.device = _resolve_device(args.device)
    if args.resume is not None and args.output_dir is None:
        args.output_dir = args.resume.parent
    if args.model is None:
        args.model = "mlp" if source == "mnist" else "resnet50"
    if args.model not in model_names():
        raise UsageError(
            f"unknown model {args.model!r}; choose mlp, lenet or a torchvision classification model "
            f"such as resnet18 or resnet50"
        )
    if source == "mnist":
        if args.image_size is not None:
            raise UsageError("--image-size applies to folders and synthetic data; MNIST images are 28x28")
    elif args.image_size is None:
        args.image_size = 224
    if args.dropout is not None and args.model != "mlp":
        raise UsageError(f"--dropout applies to --model mlp only, not {args.model}")
    if args.model == "mlp" and args.dropout is None:
        args.dropout = 0.2
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1) if source == "folder" else 0
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.optimizer in MOMENTUM_OPTIMIZERS:
        if args.momentum is None:
            args.momentum = 0.9
        if args.optimizer == "nag" and args.momentum == 0:
            raise UsageError("--optimizer nag (Nesterov) needs --momentum > 0")
    elif args.momentum is not None:
        raise UsageError(f"--momentum applies to sgd and nag, not {args.optimizer}")
    bb_options = {
        "--tau-min": args.tau_min,
        "--tau-max": args.tau_max,
        "--tau0": args.tau0,
        "--beta": args.beta,
        "--bb-safeguard": args.bb_safeguard,
    }
    if args.optimizer == "bb":
        default_min, default_max = SHALLOW_TAUS if is_shallow(args.model) else DEEP_TAUS
        args.tau_min = default_min if args.tau_min is None else args.tau_min
        args.tau_max = default_max if args.tau_max is None else args.tau_max
        args.tau0 = 1.0 if args.tau0 is None else args.tau0
        args.bb_backend = args.bb_backend or "auto"
        args.bb_safeguard = True if args.bb_safeguard is None else args.bb_safeguard
        if args.tau_min > args.tau_max:
            raise UsageError(f"--tau-min {args.tau_min:g} is above --tau-max {args.tau_max:g}")
    else:
        given = [name for name, value in {**bb_options, "--bb-backend": args.bb_backend}.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} apply to --optimizer bb only, not {args.optimizer}")
    return args


# ============================================================================================ building blocks
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
            beta=args.beta,
            tau0=args.tau0,
            tau_min=args.tau_min,
            tau_max=args.tau_max,
            backend=args.bb_backend,
            safeguard=args.bb_safeguard,
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


def learning_rate(optimizer: torch.optim.Optimizer) -> torch.Tensor | float:
    """The learning rate the next step uses: BB's device tensor (reading it syncs), a float otherwise."""
    return optimizer.lr_tensor if isinstance(optimizer, BB) else optimizer.param_groups[0]["lr"]


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

    The loss is accumulated on the device; the host reads it only every ``print_freq`` steps for the bar."""
    model.train()
    lr = learning_rate(optimizer)
    lr_used = lr.clone() if isinstance(lr, torch.Tensor) else lr  # BB rewrites its tensor at the epoch's end
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    images_seen = 0
    watches_loss = isinstance(optimizer, BB) and optimizer.safeguard  # its safeguard checks each epoch's loss
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
        if progress and (step % print_freq == 0 or step == len(loader)):
            mean_loss = (loss_sum / images_seen).item()  # the only host sync, every print_freq steps
            now = time.perf_counter()
            rate = (images_seen - last_images) * world / (now - last_time)
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


# ============================================================================================ outputs
def check_output_dir(path: Path, resume: Path | None) -> None:
    """Raise UsageError unless ``path`` is, or can be created as, a writable folder that holds no run other
    than the one ``resume`` continues. Writes nothing that stays."""
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
    previous = [name for name in (LATEST, BEST, LOG) if (path / name).exists()]
    if previous and (resume is None or resume.resolve().parent != path.resolve()):
        raise UsageError(
            f"--output-dir {path} already holds a run ({', '.join(previous)}); continue it with --resume "
            f"{path / LATEST} or choose another folder"
        )


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, so a crash never leaves a half-written ``path``."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def write_log(path: Path, history: list[dict[str, float]]) -> None:
    """The epochs as JSON lines, one object per epoch."""
    _atomic_write(path, lambda p: p.write_text("".join(json.dumps(record) + "\n" for record in history)))


def plot_history(path: Path, history: list[dict[str, float]], title: str) -> None:
    """A PNG with the learning rate, the train loss and the test accuracy per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [record["epoch"] for record in history]
    figure = Figure(figsize=(12, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    panels = [("lr", "learning rate", "log"), ("train_loss", "train loss", "log"), ("test_acc1", "test top-1 %", None)]
    for axes, (key, label, scale) in zip(figure.subplots(1, 3), panels):
        axes.plot(epochs, [record[key] for record in history], marker="o")
        if key == "test_acc1" and "test_acc5" in history[0]:
            axes.plot(epochs, [record["test_acc5"] for record in history], marker="s", label="top-5")
            axes.legend()
        if scale:
            axes.set_yscale(scale)
        axes.set_xlabel("epoch")
        axes.set_title(label)
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    _atomic_write(path, lambda p: figure.savefig(p, format="png", dpi=100))


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


def load_checkpoint(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Read a checkpoint of this command and check it fits ``args`` (same model and optimizer)."""
    if not path.is_file():
        raise UsageError(f"--resume {path}: no such file; pass the checkpoint.pth of an earlier run")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file: torch raises several kinds
        raise UsageError(f"--resume {path} is not a readable checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"--resume {path} is not a bbfused-train checkpoint; pass the checkpoint.pth of a run")
    saved = checkpoint["args"]
    for option in ("model", "optimizer"):
        if saved[option] != getattr(args, option):
            raise UsageError(
                f"--resume {path} is a checkpoint of --{option} {saved[option]}, but this run has --{option} "
                f"{getattr(args, option)}; resume with --{option} {saved[option]} or start a new run"
            )
    if checkpoint["epoch"] >= args.epochs:
        raise UsageError(
            f"--resume {path} has already trained {checkpoint['epoch']} epochs; pass --epochs above that to continue"
        )
    return checkpoint


# ============================================================================================ the run
def init_distributed(device_name: str) -> tuple[Shard, torch.device]:
    """This process's shard and device. Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on
    GPUs (each process takes the GPU of its local rank), gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device_name)
    if world == 1:
        return Shard(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Shard(rank, world), device


@dataclass
class Training:
    """Everything a run needs, built by :func:`prepare`. ``model`` is the bare module (saved and evaluated),
    ``train_model`` what training calls (compiled and/or DDP-wrapped)."""

    args: argparse.Namespace
    shard: Shard
    device: torch.device
    data: Data
    model: nn.Module
    train_model: nn.Module
    eval_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    history: list[dict[str, float]] = field(default_factory=list)
    best_acc1: float = -math.inf
    skipped_before: int = 0  # BB's count of skipped non-finite gradient values at the last epoch end

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

    def run_epoch(self, epoch: int) -> dict[str, float]:
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
        # A rolled-back epoch: BB restored the weights and (track_buffers) the BatchNorm statistics already.
        rolled_back = safeguarded and epoch in self.optimizer.rolled_back_epochs
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
            record["rolled_back"] = rolled_back
            skipped = self.optimizer.skipped_gradient_values
            record["skipped_gradient_values"] = skipped - self.skipped_before
            self.skipped_before = skipped
        self.history.append(record)
        improved = record["test_acc1"] > self.best_acc1
        self.best_acc1 = max(self.best_acc1, record["test_acc1"])
        # Every process takes part in gathering the RNG states; only the main one prints and writes.
        states = self._gather_rng_states() if args.output_dir is not None else None
        if self.is_main:
            print(format_record(record, args.epochs), flush=True)
            if args.output_dir is not None:
                self._write_outputs(states, improved)
        return record

    def fit(self) -> list[dict[str, float]]:
        """Train from the start (or the resumed) epoch to ``args.epochs``; returns every epoch's record."""
        if self.is_main:
            print(self.describe(), flush=True)
        for epoch in range(self.start_epoch, self.args.epochs):
            self.run_epoch(epoch)
        return self.history

    def close(self) -> None:
        """Leave the process group (under torchrun); call once training is over."""
        if self.shard.world > 1 and dist.is_initialized():
            dist.barrier()  # gloo may abort a process that tears its group down while another is still in it
            dist.destroy_process_group()

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
            "args": {key: str(value) if isinstance(value, Path) else value for key, value in vars(self.args).items()},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": rng_states,
            "history": self.history,
            "best_acc1": self.best_acc1,
        }

    def _write_outputs(self, rng_states: list[dict[str, Any]], improved: bool) -> None:
        out = self.args.output_dir
        out.mkdir(parents=True, exist_ok=True)
        checkpoint = self.checkpoint(rng_states)
        _atomic_write(out / LATEST, lambda p: torch.save(checkpoint, p))
        if improved:
            _atomic_write(out / BEST, lambda p: torch.save(checkpoint, p))
        write_log(out / LOG, self.history)
        plot_history(out / PLOT, self.history, f"{self.args.model}, {self.args.optimizer}, {self.args.data}")

    def restore(self, checkpoint: dict[str, Any], path: Path) -> None:
        """Load a checkpoint (already checked by :func:`load_checkpoint`) into the built training."""
        optimizer_state = checkpoint["optimizer"]
        if isinstance(self.optimizer, BB):
            saved_steps = optimizer_state["bb"]["steps_per_epoch"]
            if saved_steps != len(self.data.train):
                raise UsageError(
                    f"--resume {path} was trained with {saved_steps} steps per epoch, this run has "
                    f"{len(self.data.train)}; use the same --batch-size, --limit-train and number of processes"
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
        if self.is_main and self.args.output_dir is not None:
            # The log restarts from the checkpoint, dropping epochs a crash left after it.
            self.args.output_dir.mkdir(parents=True, exist_ok=True)
            write_log(self.args.output_dir / LOG, self.history)


def format_record(record: dict[str, float], epochs: int) -> str:
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


def prepare(args: argparse.Namespace) -> Training:
    """Check the inputs, then build data, model and optimizer (and restore ``args.resume``). Everything that
    can be wrong with the inputs raises UsageError or DataError here, before any file is written."""
    if args.output_dir is not None:
        check_output_dir(args.output_dir, args.resume)
    if args.data not in ("mnist", "synthetic"):
        check_image_folder(Path(args.data))
    checkpoint = None if args.resume is None else load_checkpoint(args.resume, args)
    shard, device = init_distributed(args.device)
    try:
        return _build(args, shard, device, checkpoint)
    except BaseException:
        if shard.world > 1:
            dist.destroy_process_group()
        raise


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
    model = build_model(args.model, data.num_classes, data.in_channels, data.image_size, dropout=args.dropout or 0.0)
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as error:
            raise UsageError(
                f"--resume {args.resume} holds weights that do not fit {args.model} on this data "
                f"({str(error).splitlines()[0]}); resume with the data and model of the saved run"
            ) from None
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
    if checkpoint is not None:
        training.restore(checkpoint, args.resume)  # last: it restores the random number generators
    return training


def run(args: argparse.Namespace) -> list[dict[str, float]]:
    """Prepare, train every epoch, clean up; returns the per-epoch records."""
    training = prepare(args)
    try:
        return training.fit()
    finally:
        training.close()


def main(argv: Iterable[str] | None = None) -> int:
    """The command: 0 on success, 2 on bad input (the message says what to change)."""
    try:
        args = parse_args(argv)
        run(args)
    except SystemExit as exit_:  # argparse's own errors (and --help)
        return exit_.code if isinstance(exit_.code, int) else 2
    except (UsageError, DataError) as error:
        print(f"bbfused-train: error: {error}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
