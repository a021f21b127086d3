"""How much BB's estimate rises from gradient noise alone, per form of the gradient average g and epoch length T.

A flat parameter vector of 20,000 float64 values takes T steps an epoch along pure noise, d = ξ (no curvature, no
signal), with the default's momentum in EMA form (m ← m + (1 − μ)·(d − m), θ ← θ − η·m, μ = 0.9) at a fixed rate η.
At each epoch end after the first: the rule's estimate ‖Δθ‖² / (T·|Δθᵀy|), y = g_k − g_(k−1), divided by η. With
no curvature every bit of Δθᵀy is the noise in g that Δθ shares, so the ratio is how far noise alone pushes the
estimate above the rate that ran the epoch: where a plateau's curvature asks for a lower rate, a form with a larger
push settles higher. Forms: the full average (g ← g + β·(d − g) from 0 each epoch, β = 4/T); the window from m (that
average over the last n = ⌈T/4⌉ steps, started from m); the window's mean (the default since 30b56a2); the window's
mean with m counted as k steps (``window_prior.py``).

    python benchmarks/results/window_prior_runs/noise_push.py T[,T...]
"""

import math
import statistics
import sys

import torch

FORMS = {
    "full": "full average",
    "from-m": "window from m",
    "mean": "window's mean (default)",
    "mean-with-m": "window's mean with m as k steps",
}


def push(steps_per_epoch: int, form: str, momentum: float = 0.9, rate: float = 0.1, size: int = 20000,
         epochs: int = 40, seed: int = 0) -> float:  # fmt: skip
    """The median over epochs 2… of the estimate divided by the rate."""
    generator = torch.Generator().manual_seed(seed)
    theta = torch.zeros(size, dtype=torch.float64)
    m = torch.zeros_like(theta)
    beta = 4.0 / steps_per_epoch
    n = max(2, math.ceil(steps_per_epoch / 4))
    opening = steps_per_epoch - n
    w = (1 - beta) ** n  # the full average's weight of the steps before the window
    k = n * w / (1 - w)
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
            elif form in ("mean", "mean-with-m") and step >= opening:
                if step == opening:
                    total = k * m if form == "mean-with-m" else torch.zeros_like(theta)
                    weight = n + k if form == "mean-with-m" else n
                total = total + d
            m += (1 - momentum) * (d - m)
            theta -= rate * m
        if form in ("mean", "mean-with-m"):
            g = total / weight
        if previous_g is not None:
            moved, y = theta - previous_theta, g - previous_g
            ratios.append((moved @ moved).item() / (steps_per_epoch * abs((moved @ y).item())) / rate)
        previous_theta, previous_g = theta.clone(), g
    return statistics.median(ratios)


if __name__ == "__main__":
    print("| T | n | " + " | ".join(FORMS.values()) + " |")
    print("|---|---|" + "---|" * len(FORMS))
    for steps in (int(t) for t in sys.argv[1].split(",")):
        cells = [f"{push(steps, form):.2f}" for form in FORMS]
        print(f"| {steps} | {max(2, math.ceil(steps / 4))} | " + " | ".join(cells) + " |", flush=True)
