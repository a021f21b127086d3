"""One training run of the paper's experiments, driven through ``bbfused.train`` and saved as one JSON file.

Every experiment script builds a list of :class:`Run` and hands it to :func:`run_all`, which trains each run
that has no JSON file yet (so an interrupted sweep resumes where it stopped) on ``jobs`` worker processes of
one thread each. A run stops early once a weight is not finite (diverged): later epochs cannot recover. (BB with
its safeguard restores finite weights at the end of such an epoch, so it goes on.)
"""

from __future__ import annotations

import concurrent.futures
import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing: use the checkout's package

import torch  # noqa: E402

from bbfused.optimizer import BB  # noqa: E402
from bbfused.train import parse_args, prepare  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
RUNS = RESULTS / "paper_runs"  # one folder of run files per experiment
# The methods of the paper's Figures 2-3 and the training command's options that select them: "bb" is the
# paper's method exactly, "bb-safe" BB with the safeguard that rolls back a diverged epoch (the default);
# "sgd-cosine" and "sgd-step" are not the paper's: they are the recipes a user tunes instead of BB, SGD with cosine
# annealing or with the rate divided by 10 after a third and two thirds of the epochs.
METHODS = {
    "bb": ["--optimizer", "bb", "--no-bb-safeguard"],
    "bb-safe": ["--optimizer", "bb", "--bb-safeguard"],
    "sgd": ["--optimizer", "sgd"],
    "sgd-cosine": ["--optimizer", "sgd", "--lr-schedule", "cosine"],
    "sgd-step": ["--optimizer", "sgd", "--lr-schedule", "step"],
    "nag": ["--optimizer", "nag"],
    "adam": ["--optimizer", "adam"],
    "amsgrad": ["--optimizer", "amsgrad"],
    "adagrad": ["--optimizer", "adagrad"],
    "rmsprop": ["--optimizer", "rmsprop"],
}
BASELINES = ("sgd", "nag", "adam", "amsgrad", "adagrad", "rmsprop")


@dataclass(frozen=True)
class Run:
    """One training run: ``method`` (a METHODS key) from initial learning rate ``lr``; ``options`` are further
    ``bbfused-train`` options (data, data limits, AMP, ...), part of the run's name; ``device`` is not."""

    method: str
    lr: float
    seed: int
    epochs: int
    model: str = "mlp"
    options: tuple[str, ...] = field(default=())
    device: str = "cpu"

    @property
    def name(self) -> str:
        base = f"{self.model}_{self.method}_lr{self.lr:g}_seed{self.seed}_e{self.epochs}"
        options = [Path(option).name if os.sep in option else option.lstrip("-") for option in self.options]
        return "_".join([base, *options])

    def argv(self) -> list[str]:
        return [
            *METHODS[self.method],
            "--model", self.model,
            "--lr", repr(self.lr),
            "--seed", str(self.seed),
            "--epochs", str(self.epochs),
            "--device", self.device,
            "--print-freq", "1000000",
            *self.options,
        ]  # fmt: skip


def train(run: Run) -> dict:
    """Train ``run`` epoch by epoch; returns its record: the run, every epoch's record (``lr`` is the rate
    the epoch used; ``rolled_back`` for BB, never true in the paper's mode), BB's rate history, ‖θ‖² at the
    start and after each epoch, whether it diverged, and the wall time in seconds."""
    start = time.perf_counter()
    training = prepare(parse_args(run.argv()))
    diverged_after = None
    sq_norms = [param_sq_norm(training.model)]
    try:
        for epoch in range(run.epochs):
            training.run_epoch(epoch)
            sq_norms.append(param_sq_norm(training.model))
            if not all(bool(torch.isfinite(p).all()) for p in training.model.parameters()):
                diverged_after = epoch + 1
                break
    finally:
        training.close()
    optimizer = training.optimizer
    return {
        "run": asdict(run),
        "argv": run.argv(),
        "history": training.history,
        "bb_lr_history": optimizer.lr_history if isinstance(optimizer, BB) else None,
        "param_sq_norms": sq_norms,
        "diverged_after_epoch": diverged_after,
        "wall_s": time.perf_counter() - start,
    }


def param_sq_norm(model: torch.nn.Module) -> float:
    """‖θ‖² over all parameters (float64): what BB's safeguard compares from one epoch end to the next."""
    return sum(float(p.detach().double().square().sum()) for p in model.parameters())


def _train_to_file(run: Run, path: Path) -> tuple[str, float]:
    result = train(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=1))
    os.replace(temporary, path)
    return run.name, result["wall_s"]


def run_all(
    runs: list[Run], folder: Path, jobs: int, reuse: tuple[Path, ...] = (), retrain: bool = False
) -> list[dict]:
    """Train every run of ``runs`` without a ``folder/<name>.json`` yet, then return every run's record in the
    order of ``runs``. ``jobs`` > 1: that many processes of one thread each; 1: in this process, with its
    threads. A run already saved in a ``reuse`` folder (by another experiment) is copied instead of trained.
    ``retrain``: train every run again, replacing its file (saved runs here and in ``reuse`` are not used)."""
    folder.mkdir(parents=True, exist_ok=True)
    for run in runs if not retrain else ():
        done = [other / f"{run.name}.json" for other in reuse if (other / f"{run.name}.json").exists()]
        if done and not (folder / done[0].name).exists():
            shutil.copy(done[0], folder / done[0].name)
    todo = [run for run in runs if retrain or not (folder / f"{run.name}.json").exists()]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already in {folder}; training {len(todo)}", flush=True)
    if jobs == 1:
        for run in todo:
            name, seconds = _train_to_file(run, folder / f"{run.name}.json")
            print(f"done {name} in {seconds:.0f} s", flush=True)
    elif todo:
        context = multiprocessing.get_context("spawn")
        pool = concurrent.futures.ProcessPoolExecutor(
            jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(1,)
        )
        with pool:
            futures = [pool.submit(_train_to_file, run, folder / f"{run.name}.json") for run in todo]
            for future in concurrent.futures.as_completed(futures):
                name, seconds = future.result()
                print(f"done {name} in {seconds:.0f} s", flush=True)
    return [json.loads((folder / f"{run.name}.json").read_text()) for run in runs]


def parse_lrs(text: str) -> list[float]:
    """``"1e-3,1e-2"`` -> [0.001, 0.01]."""
    return [float(value) for value in text.split(",")]
