"""The command line of ``bbfused-train``: parsing, defaults that depend on other options, and checks.

BB's defaults are read from where they are written (``BB``'s signature; each rate control's ``DEFAULT_TAUS``,
through :mod:`bbfused.train.bb_source`), so the command never carries a copy of them; only the paper's bounds for
shallow networks live elsewhere
(:data:`bbfused.train.models.SHALLOW_TAUS`). Parsing reads no file: a ``--resume`` checkpoint's saved settings
are merged in when the run is prepared (:func:`bbfused.train.checkpoints.resume_args`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from .bb_source import backend_names, bb_default, control_taus, preconditioned_first_rate, preconditioner_names
from .errors import UsageError
from .models import SHALLOW_TAUS, is_shallow, model_names
from .schedules import DEFAULT_SCHEDULE, SCHEDULES

OPTIMIZERS = ("bb", "sgd", "nag", "adam", "amsgrad", "adagrad", "rmsprop")
# The initial learning rate when --lr is not given: the paper's 0.1 for BB and SGD, the usual defaults otherwise
# (torch's, but 1e-3 for RMSprop: torch's 1e-2 diverges on the paper's MLP).
DEFAULT_LR = {"bb": 0.1, "sgd": 0.1, "nag": 0.1, "adam": 1e-3, "amsgrad": 1e-3, "adagrad": 1e-2, "rmsprop": 1e-3}
MOMENTUM_OPTIMIZERS = ("sgd", "nag")
AMP_CHOICES = ("none", "bf16", "fp16")


def default_taus(model: str, safeguard: bool) -> tuple[float | None, float | None]:
    """(tau_min, tau_max) for ``model``: the paper's shallow-network bounds for mlp and lenet in the paper's method;
    else None, BB's own defaults (the paper's deep-network bounds, or the default control's rate bounds)."""
    return SHALLOW_TAUS if is_shallow(model) and not safeguard else (None, None)


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
        "--lr-schedule",
        choices=SCHEDULES,
        help=f"the baselines' rate over the run, set once an epoch: constant; cosine annealing to 0 over --epochs; or "
        f"step, divided by 10 at a third and two thirds of --epochs (default {DEFAULT_SCHEDULE}; bb sets its own rate)",
    )
    optim.add_argument(
        "--warmup-epochs",
        type=non_negative_int,
        default=0,
        help="the baselines' linear warmup: epoch e of the first K runs at (e+1)/(K+1) of the rate, and "
        "--lr-schedule follows over the epochs after them (default: 0; bb approaches its rate itself)",
    )
    optim.add_argument(
        "--weight-decay", type=non_negative_float, default=5e-4, help="L2 penalty (default: 5e-4, the paper's)"
    )
    optim.add_argument(
        "--momentum",
        type=fraction,
        help="momentum of sgd, nag and bb (default 0.9 for sgd and nag; bb: its rate control's, 0.9 or 0 in the "
        "paper's method)",
    )
    optim.add_argument(
        "--no-decay-norm-bias",
        action="store_true",
        help="no weight decay on norm and bias parameters (those with at most one dimension)",
    )
    shallow_min, shallow_max = SHALLOW_TAUS
    optim.add_argument(
        "--tau-min",
        type=positive_float,
        help=f"BB's lower rate bound (default: BB's; with --no-bb-safeguard {shallow_min:.3g} for mlp, lenet)",
    )
    optim.add_argument(
        "--tau-max",
        type=positive_float,
        help=f"BB's upper rate bound (default: BB's; with --no-bb-safeguard {shallow_max:g} for mlp, lenet)",
    )
    optim.add_argument(
        "--tau0", type=positive_float, help="the paper's fallback rate numerator (--no-bb-safeguard only)"
    )
    optim.add_argument("--beta", type=beta_value, help="BB gradient EMA factor (default 4/steps per epoch)")
    optim.add_argument("--bb-backend", choices=backend_names(), help="BB kernels (default auto: fastest available)")
    optim.add_argument(
        "--bb-safeguard",
        action=argparse.BooleanOptionalAction,
        help="BB's rate control: bounded rate steps, rollback of a diverged epoch (default: "
        f"{'on' if bb_default('safeguard') else 'off'}; see bbfused/control/); --no-bb-safeguard is the "
        "paper's method exactly",
    )
    optim.add_argument(
        "--bb-preconditioner",
        choices=preconditioner_names(),
        help="BB's step: none (SGD with momentum; the default) or adam (Adam's per-element scaling under BB's rate, "
        f"which starts at min(--lr, {preconditioned_first_rate():g}); with BB's rate control only, see "
        "docs/behaviour.md)",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--epochs", type=positive_int, default=10, help="(default: 10)")
    run.add_argument("--batch-size", type=positive_int, default=128, help="per process (default: 128)")
    run.add_argument("--seed", type=non_negative_int, default=0, help="(default: 0)")
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    run.add_argument("--amp", choices=AMP_CHOICES, default="none", help="mixed precision (fp16 uses GradScaler)")
    run.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="channels-last memory format for model and images",
    )
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    run.add_argument(
        "--resume",
        type=Path,
        metavar="PATH",
        help="continue the run saved in this checkpoint (in its folder) with its saved settings; options given "
        "here override them",
    )
    run.add_argument(
        "--auto-resume",
        action="store_true",
        help="continue the run saved in --output-dir if there is one, else start it: one command that an "
        "automatic restarter (torchrun --max-restarts, a scheduler's requeue) can run again after any failure",
    )
    run.add_argument(
        "--output-dir",
        type=Path,
        metavar="PATH",
        help="where to write log.jsonl, checkpoints and curves.png (default: none, or the --resume folder)",
    )
    run.add_argument(
        "--print-freq",
        type=positive_int,
        default=50,
        metavar="N",
        help="progress bar update every N steps (and at least every 2 seconds)",
    )
    return parser


def given_options(argv: list[str]) -> frozenset[str]:
    """The destinations of the options present on the command line ``argv`` (not filled in by a default)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(parser.parse_args(argv)))


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    """Parse the command line (argparse exits with code 2 on a malformed one) and resolve it with
    :func:`resolve_args`. With ``--resume`` the saved run's settings fill in every option not typed here, so
    resolving waits for the checkpoint, which :func:`bbfused.train.prepare` reads. Reads no file.
    ``args.given_options`` names the options typed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.given_options = given_options(argv)
    if args.auto_resume and (args.resume is not None or args.output_dir is None):
        raise UsageError(
            "--auto-resume finds the checkpoint in --output-dir itself: pass --output-dir, and no --resume"
        )
    return args if args.resume is not None else resolve_args(args)


def resolve_device(name: str | None) -> str:
    """``name`` checked against the devices here (cuda when available for None)."""
    import torch  # here: parsing, and the checks that need no device, stay free of it

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


def data_source(data: str) -> str:
    """The kind of ``--data``: "mnist", "synthetic" or "folder"."""
    return data if data in ("mnist", "synthetic") else "folder"


def same_data(typed: str, saved: str) -> bool:
    """Whether ``--data`` as typed names the data a run was saved with: a folder by where it resolves to."""
    if data_source(typed) != "folder" or data_source(saved) != "folder":
        return typed == saved
    return os.path.realpath(typed) == os.path.realpath(saved)


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the defaults that depend on other options and reject combinations that cannot work. The checks
    that need torch (a torchvision model's name, the device) come last, so a mistake elsewhere is reported
    without loading it. A data folder is kept as an absolute path, so that a run resumes from any directory."""
    source = data_source(args.data)
    if source == "folder":
        args.data = os.path.abspath(args.data)
    if args.resume is not None and args.output_dir is None:
        args.output_dir = args.resume.parent
    if args.model is None:
        args.model = "mlp" if source == "mnist" else "resnet50"
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
    if args.optimizer == "bb" and args.lr_schedule is not None:
        raise UsageError(
            f"--lr-schedule {args.lr_schedule} applies to the baseline optimizers: bb sets its own rate and "
            f"anneals it over the second half of --epochs; drop --lr-schedule"
        )
    if args.optimizer == "bb" and args.warmup_epochs:
        raise UsageError(
            f"--warmup-epochs {args.warmup_epochs} applies to the baseline optimizers: bb approaches its rate "
            f"itself from --lr; drop --warmup-epochs"
        )
    if args.optimizer != "bb" and args.lr_schedule is None:
        args.lr_schedule = DEFAULT_SCHEDULE
    if args.warmup_epochs >= args.epochs:
        raise UsageError(
            f"--warmup-epochs {args.warmup_epochs} leaves no epoch of the schedule in --epochs {args.epochs}; "
            f"pass --epochs above {args.warmup_epochs} or fewer warmup epochs"
        )
    if args.optimizer in MOMENTUM_OPTIMIZERS:
        if args.momentum is None:
            args.momentum = 0.9
        if args.optimizer == "nag" and args.momentum == 0:
            raise UsageError("--optimizer nag (Nesterov) needs --momentum > 0")
    elif args.momentum is not None and args.optimizer != "bb":
        raise UsageError(f"--momentum applies to sgd, nag and bb, not {args.optimizer}")
    bb_options = {
        "--tau-min": args.tau_min,
        "--tau-max": args.tau_max,
        "--tau0": args.tau0,
        "--beta": args.beta,
        "--bb-safeguard": args.bb_safeguard,
        "--bb-preconditioner": args.bb_preconditioner,
    }
    if args.optimizer == "bb":
        args.bb_backend = args.bb_backend or bb_default("backend")
        args.bb_safeguard = bb_default("safeguard") if args.bb_safeguard is None else args.bb_safeguard
        default_min, default_max = default_taus(args.model, args.bb_safeguard)
        args.tau_min = default_min if args.tau_min is None else args.tau_min
        args.tau_max = default_max if args.tau_max is None else args.tau_max
        if args.tau0 is not None and args.bb_safeguard:
            raise UsageError("--tau0 is the paper's fallback rate: it applies with --no-bb-safeguard only")
        args.bb_preconditioner = args.bb_preconditioner or "none"
        if args.bb_preconditioner != "none" and not args.bb_safeguard:
            raise UsageError(
                f"--bb-preconditioner {args.bb_preconditioner} needs BB's rate control: the paper's method "
                f"(--no-bb-safeguard) is SGD exactly; drop one of the two"
            )
        _, control_min, control_max = control_taus(args.bb_safeguard)
        tau_min = control_min if args.tau_min is None else args.tau_min
        tau_max = control_max if args.tau_max is None else args.tau_max
        if tau_min > tau_max:
            raise UsageError(f"--tau-min {tau_min:g} is above --tau-max {tau_max:g}")
    else:
        given = [name for name, value in {**bb_options, "--bb-backend": args.bb_backend}.items() if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} apply to --optimizer bb only, not {args.optimizer}")
    if not is_shallow(args.model) and args.model not in model_names():
        raise UsageError(
            f"unknown model {args.model!r}; choose mlp, lenet or a torchvision classification model "
            f"such as resnet18 or resnet50"
        )
    args.device = resolve_device(args.device)
    return args
