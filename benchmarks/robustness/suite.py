"""The robustness suite: does BB's default train every setting from every initial rate, as its peers do?

Each run trains one model (a *setting*) with one optimizer (a *method*) from one initial rate η0 and seed, in a
plain loop as a new user would write it (``opt.step(loss=loss)`` for BB, ``opt.track_buffers(model)`` so a
rolled-back epoch also restores BatchNorm statistics; defaults otherwise), and saves one JSON file: the test
accuracy, every epoch's mean training loss and time, and for BB its rates and rolled-back epochs. Runs already
saved are not trained again, so the peers' runs are recorded once and the suite resumes where it stopped.

    python benchmarks/robustness/suite.py                  # the whole grid, then the report
    python benchmarks/robustness/suite.py --methods bb     # BB's default only (the other runs are reused)
    python benchmarks/robustness/suite.py --quick --out /tmp/r   # a smoke test on tiny settings

The learning-rate-free peers take η0 as their initial estimate ``d0`` (Prodigy, D-Adaptation) with their
recommended ``lr=1``; Schedule-Free SGD, SGD with momentum and Adam take it as ``lr``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing: use the checkout's package

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bbfused import BB  # noqa: E402
from bbfused.data import MNIST_MEAN, MNIST_STD, load_mnist, subset_indices  # noqa: E402
from bbfused.models import lenet, mlp  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
RUNS = RESULTS / "robustness_runs"
LRS = (1e-3, 1e-2, 0.1, 1.0, 10.0)
SEEDS = (0, 1)
PEERS = ("sgdm", "adam", "prodigy", "dadapt-sgd", "schedulefree-sgd")
METHODS = ("bb", "bb-paper", *PEERS)
# What a run's final test accuracy must beat to count as trained: 11.35 % is MNIST's largest class (chance).
COLLAPSE_ACCURACY = 0.5


@dataclass(frozen=True)
class Setting:
    """One model on one data set: ``train_limit`` training images (None: all), batches of ``batch_size``."""

    name: str
    model: str
    data: str
    batch_size: int
    epochs: int
    weight_decay: float
    train_limit: int | None
    description: str


SETTINGS = {
    s.name: s
    for s in (
        Setting("mlp", "mlp", "mnist", 128, 5, 5e-4, 10_000, "the paper's MLP 784-1024-1024-10 (dropout 0.2)"),
        Setting("lenet", "lenet", "mnist", 128, 6, 5e-4, 10_000, "LeNet-5 with ReLU"),
        Setting(
            "bn-cnn", "bn_cnn", "mnist", 256, 6, 5e-4, 20_000,
            "conv8-BN-pool, conv16-BN-pool, fc128, fc10: few steps an epoch",
        ),
        Setting("mlp-batch32", "small_mlp", "mnist", 32, 4, 0.0, 20_000, "MLP 784-512-10, batch 32"),
        Setting("digits", "digits_mlp", "digits", 32, 20, 0.0, None, "MLP 64-256-10 on scikit-learn's digits"),
        Setting("resnet18", "resnet18", "mnist", 64, 6, 5e-4, 4_000, "torchvision ResNet-18 (BatchNorm)"),
    )
}  # fmt: skip
# --quick: every setting's model on a few hundred images for two epochs (a smoke test of the harness).
QUICK_LIMIT, QUICK_EPOCHS = 512, 2


# ----------------------------------------------------------------------------------------------- models
def bn_cnn() -> nn.Sequential:
    """A small BatchNorm CNN: conv8-BN-ReLU-pool, conv16-BN-ReLU-pool, fc128, fc10."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def build_model(name: str) -> nn.Module:
    import torchvision

    builders: dict[str, Callable[[], nn.Module]] = {
        "mlp": mlp,
        "lenet": lenet,
        "bn_cnn": bn_cnn,
        "small_mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10)),
        "digits_mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)),
        "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    }
    return builders[name]()


# ----------------------------------------------------------------------------------------------- data
Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def load_data(setting: Setting, seed: int, quick: bool) -> Tensors:
    """(train images, train labels, test images, test labels) as normalised float32 / int64 tensors."""
    limit = QUICK_LIMIT if quick else setting.train_limit
    if setting.data == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.int64)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
        images, labels = (images[order] - 0.3) / 0.4, labels[order]
        split = 1347  # 75 % train, 25 % test, fixed across seeds
        train_x, train_y, test_x, test_y = images[:split], labels[:split], images[split:], labels[split:]
        if quick:
            train_x, train_y = train_x[:limit], train_y[:limit]
        return train_x, train_y, test_x, test_y
    train_x, train_y, test_x, test_y = load_mnist()
    chosen = subset_indices(len(train_y), limit, seed)
    if chosen is not None:
        train_x, train_y = train_x[chosen], train_y[chosen]
    if quick:
        test_x, test_y = test_x[:limit], test_y[:limit]

    def normalise(images: torch.Tensor) -> torch.Tensor:
        images = (images.float() / 255.0 - MNIST_MEAN) / MNIST_STD
        return images.expand(-1, 3, -1, -1).contiguous() if setting.model == "resnet18" else images

    return normalise(train_x), train_y, normalise(test_x), test_y


# ----------------------------------------------------------------------------------------------- methods
def build_optimizer(method: str, model: nn.Module, lr: float, steps_per_epoch: int, weight_decay: float):
    params = list(model.parameters())
    if method in ("bb", "bb-paper"):
        optimizer = BB(
            params, lr=lr, steps_per_epoch=steps_per_epoch, weight_decay=weight_decay, safeguard=method == "bb"
        )
        optimizer.track_buffers(model)
        return optimizer
    if method == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if method == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if method == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=1.0, d0=lr, weight_decay=weight_decay)
    if method == "dadapt-sgd":
        from dadaptation import DAdaptSGD

        return DAdaptSGD(params, lr=1.0, d0=lr, momentum=0.9, weight_decay=weight_decay)
    if method == "schedulefree-sgd":
        from schedulefree import SGDScheduleFree

        return SGDScheduleFree(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def _set_mode(model: nn.Module, optimizer, train: bool) -> None:
    """Schedule-Free's contract: the optimizer switches between its training and its averaged weights."""
    model.train(train)
    if hasattr(optimizer, "train") and hasattr(optimizer, "eval"):
        optimizer.train() if train else optimizer.eval()


# ----------------------------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Run:
    setting: str
    method: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}_{self.method}_lr{self.lr:g}_seed{self.seed}"


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), 1000):
            logits = model(images[start : start + 1000])
            correct += int((logits.argmax(1) == labels[start : start + 1000]).sum())
    return correct / len(labels)


def train(run: Run, quick: bool = False) -> dict:
    """Train ``run``; returns its record (see the module docstring)."""
    setting = SETTINGS[run.setting]
    epochs = QUICK_EPOCHS if quick else setting.epochs
    torch.manual_seed(run.seed)
    train_x, train_y, test_x, test_y = load_data(setting, run.seed, quick)
    model = build_model(setting.model)
    # Full batches only (a DataLoader with drop_last=True): a last batch of a few images is a noisy full-size
    # step that every method would take differently.
    steps = len(train_y) // setting.batch_size
    optimizer = build_optimizer(run.method, model, run.lr, steps, setting.weight_decay)
    generator = torch.Generator().manual_seed(run.seed)
    losses, seconds = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        _set_mode(model, optimizer, True)
        order = torch.randperm(len(train_y), generator=generator)
        total = torch.zeros((), dtype=torch.float64)
        for step in range(steps):
            batch = order[step * setting.batch_size : (step + 1) * setting.batch_size]
            loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            if isinstance(optimizer, BB):
                optimizer.step(loss=loss)
            else:
                optimizer.step()
            total += loss.detach()
        losses.append(float(total) / steps)
        seconds.append(time.perf_counter() - start)
    _set_mode(model, optimizer, False)
    test_accuracy = accuracy(model, test_x, test_y)
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {
        "run": asdict(run),
        "quick": quick,
        "epochs": epochs,
        "test_accuracy": test_accuracy if finite else None,
        "train_loss": [loss if math.isfinite(loss) else None for loss in losses],
        "epoch_seconds": seconds,
        "bb_lr_history": optimizer.lr_history if isinstance(optimizer, BB) else None,
        "rolled_back_epochs": optimizer.rolled_back_epochs if isinstance(optimizer, BB) else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _train_to_file(run: Run, path: Path, quick: bool) -> tuple[str, float]:
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = train(run, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=1))
    os.replace(temporary, path)
    return run.name, time.perf_counter() - start


def runs_of(settings: list[str], methods: list[str], lrs: list[float], seeds: list[int]) -> list[Run]:
    """Method by method, so that a sweep stopped early has whole methods."""
    return [Run(s, m, lr, seed) for m in methods for s in settings for seed in seeds for lr in lrs]


def run_all(runs: list[Run], folder: Path, jobs: int, quick: bool, retrain: bool = False) -> list[dict]:
    """Train every run without a file in ``folder`` (all of them with ``retrain``) on ``jobs`` processes of one
    thread each; returns every run's record."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [run for run in runs if retrain or not (folder / f"{run.name}.json").exists()]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already in {folder}; training {len(todo)}", flush=True)
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency of bbfused; a bare checkout may lack it
        tqdm = None
    progress = tqdm(total=len(todo), unit="run", disable=tqdm is None or not todo) if tqdm else None
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max(1, jobs), mp_context=context) as pool:
        futures = [pool.submit(_train_to_file, run, folder / f"{run.name}.json", quick) for run in todo]
        for future in concurrent.futures.as_completed(futures):
            name, seconds = future.result()
            message = f"done {name} in {seconds:.0f} s"
            progress.write(message) if progress else print(message, flush=True)
            if progress:
                progress.update()
    if progress:
        progress.close()
    return [json.loads((folder / f"{run.name}.json").read_text()) for run in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated (default: all)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS), help="initial rates η0")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--jobs", type=int, default=2, help="processes of one thread each (default 2)")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the harness")
    parser.add_argument("--retrain", action="store_true", help="train the selected runs again even if saved")
    parser.add_argument("--out", type=Path, default=None, help=f"run folder (default {RUNS.relative_to(REPO_ROOT)})")
    parser.add_argument("--report", type=Path, default=None, help="where report.py writes (default: none)")
    args = parser.parse_args(argv)
    settings, methods = args.settings.split(","), args.methods.split(",")
    for name, chosen, known in (("setting", settings, SETTINGS), ("method", methods, METHODS)):
        unknown = [value for value in chosen if value not in known]
        if unknown:
            parser.error(f"unknown {name} {', '.join(unknown)}; choose from {', '.join(known)}")
    try:
        lrs = [float(v) for v in args.lrs.split(",")]
        seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError as error:
        parser.error(f"--lrs takes numbers and --seeds integers, comma-separated: {error}")
    folder = args.out or RUNS
    run_all(runs_of(settings, methods, lrs, seeds), folder, args.jobs, args.quick, args.retrain)
    if args.report is not None:
        from report import write_report

        write_report(folder, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
