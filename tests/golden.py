"""Golden trajectories: short training runs whose every rate, rollback and final weight bit is recorded.

A refactoring that must not change what the optimizer computes is checked against them (``test_golden.py``).
The data are synthetic (a fixed random teacher network labels random inputs), so nothing depends on files.
Regenerate only when the numbers are meant to change, and say why in the commit:

    python tests/golden.py            # rewrites tests/golden.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

GOLDEN_FILE = Path(__file__).with_name("golden.json")


def _data(samples: int, features: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, features, generator=generator)
    teacher = torch.randn(features, classes, generator=generator)
    labels = (inputs @ teacher + 0.5 * torch.randn(samples, classes, generator=generator)).argmax(1)
    return inputs, labels


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).to(dtype)


def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 48), nn.BatchNorm1d(48), nn.ReLU(), nn.Linear(48, 10))


def _digest(tensors: list[torch.Tensor]) -> str:
    sha = hashlib.sha256()
    for t in tensors:
        sha.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:24]


def run(
    model_fn: Callable[[], nn.Module],
    epochs: int,
    batch: int = 64,
    dtype: torch.dtype = torch.float32,
    add_group_at: int | None = None,
    end_epoch_calls: bool = False,
    poison_step: int | None = None,
    **bb_kwargs,
) -> dict:
    """Train ``model_fn()`` with ``BB(**bb_kwargs)`` on the synthetic data; the run's record."""
    from bbfused import BB

    torch.manual_seed(0)
    inputs, labels = _data(1024, 32, 10, seed=1)
    inputs = inputs.to(dtype)
    model = model_fn()
    steps = len(labels) // batch
    head = None
    if add_group_at is not None:
        head = nn.Linear(10, 10).to(dtype)
        head.requires_grad_(False)
    if end_epoch_calls:
        opt = BB(model.parameters(), steps_per_epoch=None, beta=4 / steps, **bb_kwargs)
    else:
        opt = BB(model.parameters(), steps_per_epoch=steps, **bb_kwargs)
    opt.track_buffers(model)
    generator = torch.Generator().manual_seed(2)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for step in range(steps):
            if head is not None and epoch * steps + step == add_group_at:
                head.requires_grad_(True)
                opt.add_param_group({"params": head.parameters()})
            index = order[step * batch : (step + 1) * batch]
            out = model(inputs[index])
            if head is not None and head.weight.requires_grad:
                out = out + head(out)
            loss = nn.functional.cross_entropy(out.float(), labels[index])
            opt.zero_grad()
            loss.backward()
            if epoch * steps + step == poison_step:
                with torch.no_grad():
                    first = next(model.parameters()).grad
                    first[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
            opt.step(loss=loss)
            losses.append(float(loss.detach()))
        if end_epoch_calls:
            opt.end_epoch()
    state = opt.state_dict()
    per_param = [t for entry in state["state"].values() for t in entry.values() if isinstance(t, torch.Tensor)]
    weights = [p for p in model.parameters()] + ([p for p in head.parameters()] if head is not None else [])
    return {
        "lr_history": [float(x).hex() for x in opt.lr_history],
        "rolled_back_epochs": opt.rolled_back_epochs,
        "skipped_gradient_values": opt.skipped_gradient_values,
        "last_loss": float(losses[-1]).hex(),
        "weights": _digest(weights),
        "model_buffers": _digest(list(model.buffers())),
        "optimizer_state": _digest(per_param),
    }


def scenarios() -> dict[str, Callable[[], dict]]:
    """Every recorded run, by name: both rate controls, the eager and cpp backends (and Triton, interpreted on a
    CPU), rollbacks (η0 = 30), tracked BatchNorm buffers, bfloat16, a group added mid-epoch, end_epoch() calls and
    a non-finite gradient, a capturable optimizer (which counts its epochs on the device)."""
    found: dict[str, Callable[[], dict]] = {}
    for backend in ("eager", "cpp"):
        for safeguard in (True, False):
            for lr in (0.1, 30.0):
                name = f"mlp_{backend}_{'default' if safeguard else 'paper'}_lr{lr:g}"
                found[name] = lambda b=backend, s=safeguard, lr=lr: run(
                    _mlp, 6, lr=lr, weight_decay=5e-4, backend=b, safeguard=s
                )
        found[f"bn_{backend}_lr3"] = lambda b=backend: run(_bn_net, 5, lr=3.0, backend=b)
        found[f"bf16_{backend}_lr1"] = lambda b=backend: run(
            lambda: _mlp(torch.bfloat16), 4, dtype=torch.bfloat16, lr=1.0, backend=b
        )
        found[f"add_group_{backend}"] = lambda b=backend: run(_mlp, 5, lr=0.5, add_group_at=37, backend=b)
        found[f"nonfinite_{backend}"] = lambda b=backend: run(_mlp, 3, lr=0.3, poison_step=20, backend=b)
        found[f"end_epoch_{backend}"] = lambda b=backend: run(_mlp, 4, lr=0.3, end_epoch_calls=True, backend=b)
        for safeguard in (True, False):
            name = f"capturable_{backend}_{'default' if safeguard else 'paper'}_lr30"
            found[name] = lambda b=backend, s=safeguard: run(_mlp, 5, lr=30.0, backend=b, safeguard=s, capturable=True)
    found["triton_default_lr30"] = lambda: run(_mlp, 3, batch=256, lr=30.0, backend="triton")
    return found


def numerics_fingerprint() -> str:
    """A digest of a few float32 matrix products and convolutions: it differs where this CPU (or torch build)
    rounds differently, which makes the recorded weight bits not comparable."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 257, generator=generator), torch.randn(257, 33, generator=generator)
    x = torch.randn(2, 3, 17, 17, generator=generator)
    w = torch.randn(5, 3, 3, 3, generator=generator)
    return _digest([a @ b, torch.nn.functional.conv2d(x, w), torch.nn.functional.linear(a, b.T)])


def record() -> dict:
    torch.set_num_threads(1)
    return {"numerics": numerics_fingerprint(), "runs": {name: fn() for name, fn in scenarios().items()}}


if __name__ == "__main__":
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    GOLDEN_FILE.write_text(json.dumps(record(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN_FILE}")
