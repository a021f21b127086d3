"""How exactly the window's two points give the mean of d in fp32 (and why 16-bit parameters do not take the window).

A flat buffer of 20,000 values steps as BB's default does (momentum 0.9 in EMA form, weight decay 5e-5, the
parameters stored in DTYPE), with directions d = a fixed mean plus noise three times its size, each of scale GRAD;
after 50 steps the window opens and runs for STEPS steps. Printed: the relative error of the mean read from the two
points, (z_a − z_b) / (η·n) with z = θ − η·μ/(1 − μ)·m in fp32, against the mean of d summed in float64; and of its
inner product with the window's displacement of θ, the kind of sum the rule takes (Δθᵀy).

    python benchmarks/results/uniform_window_runs/precision.py
"""

import torch

MU, WEIGHT_DECAY, N, WARMUP = 0.9, 5e-5, 20_000, 50
CASES = [  # (η, the scale of d, the window's steps)
    (0.1, 1e-3, 1250), (0.01, 1e-3, 1250), (1e-3, 1e-4, 1250), (0.1, 1e-4, 10), (1e-3, 1e-5, 10), (1e-4, 1e-5, 100),
]  # fmt: skip


def errors(eta: float, grad: float, steps: int, dtype: torch.dtype) -> tuple[float, float | None]:
    generator = torch.Generator().manual_seed(0)
    theta = (torch.randn(N, generator=generator, dtype=torch.float64) * 0.02).to(dtype)
    m = torch.zeros(N)
    lr = torch.tensor(eta, dtype=torch.float32)
    coefficient = MU / (1 - MU)
    mean_direction = torch.randn(N, generator=generator) * grad
    total = torch.zeros(N, dtype=torch.float64)
    for t in range(WARMUP + steps):
        if t == WARMUP:
            opened, theta_opened = theta.float() - (lr * coefficient) * m, theta.clone()
        d = mean_direction + torch.randn(N, generator=generator) * grad * 3 + WEIGHT_DECAY * theta.float()
        if t >= WARMUP:
            total += d.double()
        m = m + (1 - MU) * (d - m)
        theta = (theta.float() - lr * m).to(dtype)
    closed = theta.float() - (lr * coefficient) * m
    read = (opened.double() - closed.double()) / (eta * steps)
    exact = total / steps
    displacement = theta.double() - theta_opened.double()
    mean_error = ((read - exact).norm() / exact.norm()).item()
    if not displacement.any():
        return mean_error, None  # no value of θ moved: the rounding swallowed every step
    sum_error = ((displacement @ read - displacement @ exact).abs() / (displacement @ exact).abs()).item()
    return mean_error, sum_error


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("| parameters | η | scale of d | window steps | mean: relative error | Δθᵀ(mean): relative error |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for eta, grad, steps in CASES:
            mean_error, sum_error = errors(eta, grad, steps, dtype)
            name = str(dtype).removeprefix("torch.")
            moved = "θ never moved" if sum_error is None else f"{sum_error:.1e}"
            print(f"| {name} | {eta:g} | {grad:g} | {steps} | {mean_error:.1e} | {moved} |")
