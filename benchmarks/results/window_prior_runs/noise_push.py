"""How much BB's estimate rises from gradient noise alone, per form of the gradient average g and epoch length T.

A flat parameter vector of 20,000 float64 values takes T steps an epoch along pure noise, d = ξ (no curvature, no
signal), with the default's momentum in EMA form (m ← m + (1 − μ)·(d − m), θ ← θ − η·m, μ = 0.9) at a fixed rate η.
At each epoch end after the first: the rule's estimate ‖Δθ‖² / (T·|Δθᵀy|), y = g_k − g_(k−1), divided by η. With
no curvature every bit of Δθᵀy is the noise in g that Δθ shares, so the ratio is how far noise alone pushes the
estimate above the rate that ran the epoch: where a plateau's curvature asks for a lower rate, a form with a larger
push settles higher. Forms: the full average (g ← g + β·(d − g) from 0 each epoch, β = 4/T); the window from m (that
average over the last n = ⌈T/4⌉ steps, started from m); the window's mean (the default since 30b56a2); the window's
mean with m counted as k steps (``window_prior.py``); the window's mean with Δθᵀy corrected by η·σ̂²·(F_T − S_T), σ̂²
the window's sample variance (``push_neutral_runs/push_neutral.py``), which should show a push of 1.

    python benchmarks/results/window_prior_runs/noise_push.py T[,T...]
    python benchmarks/results/window_prior_runs/noise_push.py analytic T[,T...]  # the window's mean, by formula
    python benchmarks/results/window_prior_runs/noise_push.py suite  # the push against the suite's rates

``suite``: per suite setting, the window's mean's push over the window from m's at the setting's T, against how the
rates of the suite's runs moved when the default went from the window from m (``bb[window-momentum0.25]``,
``ema_window_runs/window-momentum0.25/``) to the window's mean (``bb``): per pair of runs (same η0 and seed) the mean
over epochs 2 on of log10 of the ratio of their rates, and the median over the setting's pairs. Rollbacks and
collapses make single pairs noisy; the question is whether the sign follows the push's.
"""

import math
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from window_prior import prior_steps  # noqa: E402

FORMS = {
    "full": "full average",
    "from-m": "window from m",
    "mean": "window's mean (default)",
    "mean-with-m": "window's mean with m as k steps",
    "mean-neutral": "window's mean, push-neutral",
}


def noise_shares(steps_per_epoch: int, window_steps: int, momentum: float = 0.9) -> tuple[float, float]:
    """(F_T, S_T) of the window's mean under heavy-ball momentum in EMA form, on noise of σ² = E‖d‖² a step:
    E Δθᵀy = −η·σ²·F_T and E‖Δθ‖² = η²·σ²·T·S_T. A direction taken r steps before an epoch's end is in that epoch's Δθ
    with weight 1 − μ^r, and in the next one's with μ^r·(1 − μ^T) (the momentum it left); the window's mean gives each
    of its n steps 1/n, so F_T = 1 − q·(2 − μ^T), q = μ·(1 − μ^n) / ((1 − μ)·n), which crosses zero where n is near
    2μ/(1 − μ): there the push runs away. S_T is the mean squared weight. A long epoch has F_T = S_T = 1."""
    mu, steps, n = momentum, steps_per_epoch, window_steps
    within = sum((1 - mu**r) ** 2 for r in range(1, steps + 1))
    carried = (1 - mu**steps) ** 2 * sum(mu ** (2 * r) for r in range(1, steps + 1)) / (1 - mu ** (2 * steps))
    q = mu * (1 - mu**n) / ((1 - mu) * n)
    return 1 - q * (2 - mu**steps), (within + carried) / steps


def analytic_push(steps_per_epoch: int, momentum: float = 0.9) -> float:
    """The window's mean's push as E‖Δθ‖² / (T·|E Δθᵀy|) on noise: S_T / |F_T| (:func:`noise_shares`)."""
    share, square = noise_shares(steps_per_epoch, max(2, math.ceil(steps_per_epoch / 4)), momentum)
    return square / abs(share)


def push(steps_per_epoch: int, form: str, momentum: float = 0.9, rate: float = 0.1, size: int = 20000,
         epochs: int = 40, seed: int = 0) -> float:  # fmt: skip
    """The median over epochs 2… of the estimate divided by the rate."""
    generator = torch.Generator().manual_seed(seed)
    theta = torch.zeros(size, dtype=torch.float64)
    m = torch.zeros_like(theta)
    beta = 4.0 / steps_per_epoch
    n = max(2, math.ceil(steps_per_epoch / 4))
    opening = steps_per_epoch - n
    k = prior_steps(steps_per_epoch, n)
    previous_theta, previous_g, ratios = theta.clone(), None, []
    for _ in range(epochs):
        g = torch.zeros_like(theta)
        total, weight = None, n
        for step in range(steps_per_epoch):
            d = torch.randn(size, generator=generator, dtype=torch.float64)
            if form == "full":
                g += beta * (d - g)
            elif form == "from-m" and step == opening:
                g = m + beta * (d - m)
            elif form == "from-m" and step > opening:
                g += beta * (d - g)
            elif form.startswith("mean") and step >= opening:
                if step == opening:
                    total = k * m if form == "mean-with-m" else torch.zeros_like(theta)
                    weight = n + k if form == "mean-with-m" else n
                    square_sum = 0.0
                total = total + d
                square_sum += (d @ d).item()
            m += (1 - momentum) * (d - m)
            theta -= rate * m
        if form.startswith("mean"):
            g = total / weight
        if previous_g is not None:
            moved, y = theta - previous_theta, g - previous_g
            shared = (moved @ y).item()
            if form == "mean-neutral":
                share, square = noise_shares(steps_per_epoch, n, momentum)
                shared += rate * (square_sum - n * (g @ g).item()) / (n - 1) * (share - square)
            ratios.append((moved @ moved).item() / (steps_per_epoch * abs(shared)) / rate)
        previous_theta, previous_g = theta.clone(), g
    return statistics.median(ratios)


def suite() -> None:
    sys.path.insert(0, str(HERE.parent))
    from prototypes import RUNS, SETTINGS, load_runs, rate_shift

    old, new = "bb[window-momentum0.25]", "bb"
    runs = {**load_runs(RUNS), **load_runs(HERE.parent / "ema_window_runs" / "window-momentum0.25")}
    pushes: dict[int, float] = {}
    moved: dict[str, list[float]] = {"lower": [], "higher": []}  # the rate ratios where the push moved that way
    print("| setting | T | push: window's mean / window from m | rates: the mean's / from m's (median pair) | pairs |")
    print("|---|---|---|---|---|")
    for name in SETTINGS:
        found = rate_shift(runs, name, new, old)
        if found is None:
            continue
        shift, pairs = found
        steps = next(r["steps_per_epoch"] for (s, m, _, _), r in runs.items() if s == name and m == new)
        if steps not in pushes:
            pushes[steps] = push(steps, "mean") / push(steps, "from-m")
        if abs(math.log10(pushes[steps])) > 0.05:  # the push differs by more than 12 %
            moved["higher" if pushes[steps] > 1 else "lower"].append(shift)
        print(f"| {name} | {steps} | {pushes[steps]:.2f} | {shift:.2f} | {pairs} |", flush=True)
    print()
    for way, shifts in moved.items():
        low, high = sum(r < 10**-0.02 for r in shifts), sum(r > 10**0.02 for r in shifts)
        print(
            f"- the window's mean's push {way} by more than 12 %: {len(shifts)} settings; the median pair's rates "
            f"lower by more than 5 % on {low}, higher on {high}, within 5 % on {len(shifts) - low - high}"
        )


if __name__ == "__main__":
    if sys.argv[1] == "suite":
        suite()
        sys.exit()
    if sys.argv[1] == "analytic":  # the window's mean only, at epoch lengths too long to simulate here
        for steps in (int(t) for t in sys.argv[2].split(",")):
            print(f"- T = {steps}: the window's mean's push {analytic_push(steps):.3f}")
        sys.exit()
    print("| T | n | " + " | ".join(FORMS.values()) + " | window's mean, analytic |")
    print("|---|---|" + "---|" * (len(FORMS) + 1))
    for steps in (int(t) for t in sys.argv[1].split(",")):
        cells = [f"{push(steps, form):.2f}" for form in FORMS] + [f"{analytic_push(steps):.2f}"]
        print(f"| {steps} | {max(2, math.ceil(steps / 4))} | " + " | ".join(cells) + " |", flush=True)
