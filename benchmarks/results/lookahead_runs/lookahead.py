"""A prototype for the default rate control, not in the optimizer: BB's estimate on the momentum's look-ahead point
z = θ − η·μ/(1−μ)·m instead of on θ. With the optimizer's momentum (m ← m + (1−μ)(d − m), θ ← θ − η·m),
z_{t+1} = z_t − η·d_t exactly: z moves as plain SGD at the rate η does, so the estimate
‖Δz‖² / (T·|Δzᵀy|) reads the run as the rule reads plain SGD. On θ, a period's last gradient noise has not yet
reached θ through the momentum when the period ends, but it is in the gradient average already, so where noise
dominates the estimate is a multiple of the rate that produced it, above 1 and largest on short periods; on z it is
about that rate (``simulate`` prints both; ../2026-12-05_cpu_lookahead_estimate.md has the numbers).

The period's Δz = Δθ − c·(m_k − m_{k−1}), c = η·μ/(1−μ) with the closing period's rate; the momentum at the last
period end is kept here (a copy per buffer; a rollback zeroes it, as it zeroes m). Runs are saved as the suite
saves them, as method ``bb[lookahead]``:

    python benchmarks/results/lookahead_runs/lookahead.py OUT_DIR SETTINGS SEEDS LRS [adam]
    python benchmarks/results/lookahead_runs/lookahead.py simulate

Results: ../2026-12-05_cpu_lookahead_estimate.md.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prototypes import train_runs  # noqa: E402

from bbfused.control import safeguard  # noqa: E402

close_epoch_as_shipped = safeguard.SafeguardControl.close_epoch
next_rate_as_shipped = safeguard.SafeguardControl.next_rate


def lookahead_sums(buffers, kept: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """‖Δz‖² (in the preconditioner's metric √v̂ + ε with ``preconditioner="adam"``, as the measuring pass takes
    ‖Δθ‖²) and Δzᵀy, float64 over every buffer, before the measuring pass moves the gradient averages."""
    mu = buffers.momentum
    c = float(buffers.lr) * mu / (1 - mu)
    sq = torch.zeros((), dtype=torch.float64)
    dot = torch.zeros((), dtype=torch.float64)
    for buffer in buffers.buffers:
        momentum = buffer.momentum.double()
        before = kept.get(id(buffer), torch.zeros_like(momentum))
        delta = (buffer.param.double() - buffer.prev_params.double()) - c * (momentum - before)
        y = buffer.ema.double() - buffer.prev_ema.double()
        metric = torch.ones_like(delta)
        if buffer.second_moment is not None:
            arguments = buffers.scaling.measure_arguments(buffer.group_index, buffers.master)
            correction = arguments["bias_correction"].double()
            metric = (buffer.second_moment.double() / correction).sqrt() + arguments["eps"]
        sq += (delta.square() * metric).sum()
        dot += (delta * y).sum()
    return sq, dot


def close_epoch(self, buffers, base, clock, taus):
    """The shipped close_epoch; the estimate (``next_rate``) reads ‖Δz‖², Δzᵀy, the divergence tests the measured
    sums (the "stuck" test's movement is ‖Δθ‖²)."""
    kept = self.__dict__.setdefault("prototype_momentum", {})
    self.prototype_sums = lookahead_sums(buffers, kept)
    result = close_epoch_as_shipped(self, buffers, base, clock, taus)
    for buffer in buffers.buffers:  # after the commit: zero where the period was rolled back
        kept[id(buffer)] = buffer.momentum.double().clone()
    return result


def next_rate(self, sums, *args, **kwargs):
    """The shipped next_rate on the look-ahead sums."""
    sums = sums.clone()
    sums[0], sums[1] = (value.to(sums.device) for value in self.prototype_sums)
    return next_rate_as_shipped(self, sums, *args, **kwargs)


def estimates(lam: float, mu: float, steps: int, n: int = 20_000, epochs: int = 12, seed: int = 0) -> list[float]:
    """The estimate on θ and on z, each divided by the rate η = 0.1, for a quadratic 0.5·λ‖θ‖² with unit gradient
    noise and the optimizer's step and gradient average (β = 4/T, reset each period): medians over epochs 5-11."""
    generator = torch.Generator().manual_seed(seed)
    beta, eta = 4 / steps, 0.1
    theta, m = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    snaps = []
    for _ in range(epochs):
        g = torch.zeros(n, dtype=torch.float64)
        for _ in range(steps):
            d = lam * theta + torch.randn(n, dtype=torch.float64, generator=generator)
            g += beta * (d - g)
            m += (1 - mu) * (d - m)
            theta -= eta * m
        snaps.append((theta.clone(), theta - eta * mu / (1 - mu) * m, g))
    found: list[list[float]] = [[], []]
    for (t0, z0, g0), (t1, z1, g1) in zip(snaps[4:], snaps[5:]):
        for k, delta in enumerate((t1 - t0, z1 - z0)):
            found[k].append(float(delta @ delta / (steps * abs(delta @ (g1 - g0)))) / eta)
    return [torch.tensor(f).median().item() for f in found]


def simulate() -> None:
    """Two tables: the estimates against the curvature at T = 42, and the pure-noise bias against T with the
    closed form (1 − μ + βμ) / |1 − μ − βμ| for the estimate on θ (the previous period's momentum, carried into Δθ,
    cancels part of the shared noise; the last steps' noise, not yet in θ, leaves the rest)."""
    print("| λ | momentum | estimate on θ / η | estimate on z / η | 1/(Tλη) |")
    print("|---|---|---|---|---|")
    for lam in (0.0, 0.01, 0.1, 1.0):
        for mu in (0.0, 0.9):
            on_theta, on_z = estimates(lam, mu, 42)
            exact = f"{1 / (42 * lam * 0.1):.3g}" if lam else "∞"
            print(f"| {lam:g} | {mu:g} | {on_theta:.3g} | {on_z:.3g} | {exact} |")
    print()
    print("| T | β = 4/T | estimate on θ / η (λ = 0, μ = 0.9) | closed form | estimate on z / η |")
    print("|---|---|---|---|---|")
    mu = 0.9
    for steps in (10, 20, 38, 42, 64, 78, 200, 469):
        beta = 4 / steps
        on_theta, on_z = estimates(0.0, mu, steps, n=5_000)
        closed = (1 - mu + beta * mu) / abs(1 - mu - beta * mu)
        print(f"| {steps} | {beta:.3g} | {on_theta:.3g} | {closed:.3g} | {on_z:.3g} |")


def install() -> None:
    """Patch the prototype into BB's default control (the decision as torch ops: the Triton kernel is turned off)."""
    safeguard.SafeguardControl.close_epoch = close_epoch
    safeguard.SafeguardControl.next_rate = next_rate
    safeguard.SafeguardControl._decision_kernels = lambda self, buffers: None


def main(argv: list[str]) -> None:
    """OUT_DIR SETTINGS SEEDS LRS [adam]: runs saved as bb[lookahead] (with ``adam``: of
    ``BB(preconditioner="adam")``, saved as bb[lookahead-adam]); or ``simulate``."""
    if argv[:1] == ["simulate"]:
        simulate()
        return
    install()
    adam = argv[4:5] == ["adam"]
    method, kwargs = ("bb[lookahead-adam]", {"preconditioner": "adam"}) if adam else ("bb[lookahead]", None)
    train_runs(*argv[:4], method, kwargs)


if __name__ == "__main__":
    main(sys.argv[1:])
