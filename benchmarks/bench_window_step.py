"""Time BB's momentum step in each of its gradient-average modes (``bbfused.average_window``) against
``torch.optim.SGD(momentum=0.9, fused=True)`` on ResNet-50's parameter count, in one process.

After its first epoch BB's default leaves its gradient average g alone (EMA_KEEP) but at the two ends of each epoch's
last quarter: the window's first step writes its point into g (WINDOW_OPEN), its last turns g into the window's mean
(WINDOW_CLOSE). EMA_UPDATE, the first epoch's step (and every step without the window), is timed for reference. The
step's kernel runs here directly over one flat fp32 buffer of that many elements (the optimizer steps such buffers);
each row is the median per-call time over samples of back-to-back calls, cycling over enough copies to defeat the
caches, and its ratio to torch's fused SGD over the same number of elements. Bytes an element (fp32): EMA_UPDATE
and WINDOW_CLOSE read θ, grad, g, m and write θ, g, m (28); EMA_KEEP leaves g (20); WINDOW_OPEN writes g unread (24);
torch's fused SGD reads θ, grad, buf and writes θ, buf (20). The epoch's mean weighs the modes as an epoch of
``--steps`` steps after the first takes them (ImageNet ResNet-50 at batch 256: 5005).

    python benchmarks/bench_window_step.py [--backend cpp] [--steps 5005] [--out benchmarks/results/NAME.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import TimerSettings, measure  # noqa: E402
from shapes import parameter_set  # noqa: E402

from bbfused.average_window import EMA_KEEP, EMA_UPDATE, WINDOW_CLOSE, WINDOW_OPEN, AverageWindow  # noqa: E402
from bbfused.backends import Backend, load_backend  # noqa: E402
from bbfused.control.safeguard import AVERAGE_WINDOW  # noqa: E402

MODES = {"update": EMA_UPDATE, "keep": EMA_KEEP, "open": WINDOW_OPEN, "close": WINDOW_CLOSE}
BYTES = {"update": 28, "keep": 20, "open": 24, "close": 28, "sgd-fused": 20}
SETTINGS = TimerSettings(warmup_s=0.5, budget_s=6.0, max_samples=60, min_samples=15, min_sample_s=0.05)
ROTATE_BYTES = 1 << 30  # each cycle moves more than any cache holds


def step_buffers(numel: int, device: torch.device) -> dict[str, torch.Tensor]:
    """θ, grad, g and m of one flat fp32 buffer of ``numel`` values, standard-normal (never zeros)."""
    return {name: torch.randn(numel, device=device) for name in ("param", "grad", "ema", "momentum_buffer")}


def mode_step(
    backend: Backend, buffers: dict[str, torch.Tensor], lr: torch.Tensor, mode: int, steps: int, weight_decay: float
) -> Callable[[], None]:
    """One momentum step (μ = 0.9, β = 4 / ``steps``, the window of an epoch of ``steps``) of ``backend`` over
    ``buffers`` in gradient-average ``mode``."""
    return functools.partial(
        backend.step, buffers["param"], buffers["grad"], buffers["ema"], lr=lr, weight_decay=weight_decay,
        beta=4 / steps, momentum_buffer=buffers["momentum_buffer"], momentum=0.9, ema_mode=mode,
        window_steps=AverageWindow(AVERAGE_WINDOW).window_steps(steps),
    )  # fmt: skip


def epoch_shares(steps: int) -> dict[str, float]:
    """How an epoch of ``steps`` steps after the first splits over the modes."""
    window = AverageWindow(AVERAGE_WINDOW)
    modes = [window.mode(1, taken, steps) for taken in range(steps)]
    return {name: modes.count(mode) / steps for name, mode in MODES.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="cpp", help="cpp (CPU) or triton (CUDA)")
    parser.add_argument("--steps", type=int, default=5005, help="steps an epoch, for the epoch's mean")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.backend == "triton" else "cpu")
    numel = sum(math.prod(shape) for shape in parameter_set("resnet50"))
    copies = max(1, min(8, math.ceil(ROTATE_BYTES / (numel * 28))))
    backend = load_backend(args.backend, device)
    lr = torch.tensor(0.1, dtype=torch.float64, device=device)

    def flat() -> torch.Tensor:
        return torch.randn(numel, device=device)

    sets = [step_buffers(numel, device) for _ in range(copies)]
    rows = {}
    for name, mode in MODES.items():
        calls = [mode_step(backend, s, lr, mode, args.steps, weight_decay=5e-5) for s in sets]
        rows[name] = measure(calls, device, SETTINGS).median
    params = [[torch.nn.Parameter(flat())] for _ in range(copies)]
    for group in params:
        group[0].grad = flat()
    optimizers = [torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-5, fused=True) for p in params]
    for opt in optimizers:
        opt.step()  # its momentum buffer exists before timing
    rows["sgd-fused"] = measure([opt.step for opt in optimizers], device, SETTINGS).median
    shares = epoch_shares(args.steps)
    epoch_mean = sum(shares[name] * rows[name] for name in MODES)
    baseline = rows["sgd-fused"]
    report = {
        "conditions": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "backend": args.backend,
            "elements": numel,
            "copies": copies,
            "steps_per_epoch": args.steps,
        },
        "rows": {
            name: {"median_ms": seconds * 1e3, "x_sgd_fused": seconds / baseline, "bytes_per_element": BYTES[name]}
            for name, seconds in rows.items()
        },
        "epoch_shares": shares,
        "epoch_mean": {
            "median_ms": epoch_mean * 1e3,
            "x_sgd_fused": epoch_mean / baseline,
            "bytes_per_element": sum(shares[name] * BYTES[name] for name in MODES),
        },
    }
    print(f"{'row':<16}{'median ms':>11}{'x sgd-fused':>13}{'B/elem':>8}")
    for name, row in [*report["rows"].items(), ("epoch mean", report["epoch_mean"])]:
        print(f"{name:<16}{row['median_ms']:>11.2f}{row['x_sgd_fused']:>13.2f}{row['bytes_per_element']:>8.1f}")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
