"""A prototype for BB's default, not in the optimizer: the gradient average's factor β moved off the paper's 4/T
where, under momentum, the noise a period's Δθ and y share would lift the estimate past 3 times the rate that
produced it (T of about 19-71 at momentum 0.9). The patch is ``../2026-12-05_cpu_noise_gain.patch`` (the default
control's ``default_beta``); the runs in ``runs/`` were trained with it applied (commit 54d010e), as method
``bb[noise-gain]``:

    git apply benchmarks/results/2026-12-05_cpu_noise_gain.patch
    python benchmarks/robustness/suite.py --settings SETTINGS --methods bb --variant noise-gain --bb-kwargs '{}' \\
        --seeds 0,1 --jobs 2 --retrain --out benchmarks/results/noise_gain_runs/runs

    python benchmarks/results/noise_gain_runs/noise_gain.py simulate   # the estimate / rate in pure noise
    python benchmarks/results/noise_gain_runs/noise_gain.py table      # the suite's tables

Results: ../2026-12-05_cpu_noise_gain.md.
"""

import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from prototypes import load, side_by_side  # noqa: E402
from suite import SETTINGS  # noqa: E402

METHOD = "bb[noise-gain]"
GAIN, MOMENTUM = 3.0, 0.9


def paper_beta(steps: int) -> float:
    return min(1.0, 4.0 / steps)


def beta_for_noise_gain(beta: float, momentum: float, gain: float) -> float:
    """The patch's rule: β nearest ``beta``, on its side of (1 − μ)/μ, where the closed form
    (1 − μ + βμ) / |1 − μ − βμ| of the pure-noise multiple is at most ``gain``."""
    if momentum == 0.0 or math.isinf(gain):
        return beta
    singular = (1.0 - momentum) / momentum
    low, high = singular * (gain - 1.0) / (gain + 1.0), singular * (gain + 1.0) / (gain - 1.0)
    if low < beta < singular:
        return low
    if singular <= beta < high:
        return min(1.0, high)
    return beta


def noise_multiple(steps: int, beta: float, momentum: float, nesterov: bool = False, n: int = 5_000) -> float:
    """The estimate divided by the rate η = 0.1 that produced it, where the gradient is unit noise only: the
    optimizer's momentum step and gradient average (reset each period); median over epochs 5-11."""
    generator = torch.Generator().manual_seed(0)
    eta = 0.1
    theta, m = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    snaps = []
    for _ in range(12):
        g = torch.zeros(n, dtype=torch.float64)
        for _ in range(steps):
            d = torch.randn(n, dtype=torch.float64, generator=generator)
            g += beta * (d - g)
            m += (1 - momentum) * (d - m)
            theta -= eta * ((1 - momentum) * d + momentum * m if nesterov else m)
        snaps.append((theta.clone(), g))
    found = []
    for (t0, g0), (t1, g1) in zip(snaps[4:], snaps[5:]):
        delta = t1 - t0
        found.append(float(delta @ delta / (steps * abs(delta @ (g1 - g0)))) / eta)
    return torch.tensor(found).median().item()


def simulate() -> None:
    print("| T | 4/T | multiple at 4/T | the band's β | multiple at it | Nesterov at 4/T | Nesterov at the band's β |")
    print("|---|---|---|---|---|---|---|")
    for steps in (12, 19, 24, 32, 38, 42, 64, 78, 200, 469):
        beta = paper_beta(steps)
        moved = beta_for_noise_gain(beta, MOMENTUM, GAIN)
        cells = [noise_multiple(steps, b, MOMENTUM, nesterov) for nesterov in (False, True) for b in (beta, moved)]
        numbers = " | ".join(f"{value:.3g}" for value in (beta, cells[0], moved, *cells[1:]))
        print(f"| {steps} | {numbers} |")


def table() -> None:
    """Settings whose β the band leaves alone (the same β: the same run bit for bit, as the mlp runs in ``runs/``
    show) take the suite's ``bb`` runs as theirs."""
    references, runs = load([HERE / "runs"])
    unchanged = []
    for setting, spec in SETTINGS.items():
        steps = spec.steps_per_epoch()
        if beta_for_noise_gain(paper_beta(steps), MOMENTUM, GAIN) == paper_beta(steps):
            unchanged.append(setting)
            for key, record in list(runs.items()):
                if key[0] == setting and key[1] == "bb":
                    runs.setdefault((setting, METHOD, *key[2:]), record)
    print("Settings whose β the band leaves alone (their bb runs stand for bb[noise-gain]):", ", ".join(unchanged))
    print()
    side_by_side(references, runs, ["bb", METHOD])


if __name__ == "__main__":
    {"simulate": simulate, "table": table}[sys.argv[1]]()
