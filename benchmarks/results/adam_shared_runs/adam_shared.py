"""A prototype, not in the optimizer: the Adam-scaled step (``BB(preconditioner="adam")``) without BB's own gradient
average. The rule's y is taken from the momentum buffer, which in this mode averages the scaled direction d / D
(D = √v̂ + ε, factor 1 − μ = 0.1), and weighed back by D in the measuring pass: Δθᵀy ≈ Σ Δθ · D · Δm. The buffer is
not restarted at an epoch end (it is the step's momentum). The step would then move 28 bytes an fp32 element, the SGD
step's count, instead of 36.

It runs on the eager backend with its measuring pass patched: the step still updates the gradient average, which
nothing reads. Runs are saved as the suite saves them, as method ``bb[adam-shared]``; with ``control`` the same runs
without the patch (``bb[adam-eager]``, the Adam mode on the eager backend):

    python benchmarks/results/adam_shared_runs/adam_shared.py OUT_DIR SETTINGS SEEDS [control]
    python benchmarks/results/adam_shared_runs/adam_shared.py table     # beside the default and the Adam mode
    python benchmarks/results/adam_shared_runs/adam_shared.py seeds     # seeds 0-5 of both, where both have them
"""

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prototypes import (  # noqa: E402
    adam_grid,
    adam_seeds,
    load,
    moved_runs,
    side_by_side,
    train_runs,
)

from bbfused import BB  # noqa: E402
from bbfused.backends import eager  # noqa: E402

# The momentum buffer of each flat buffer, by the address of its gradient average (what the measuring pass gets).
MOMENTUM: dict[int, torch.Tensor] = {}
init_as_shipped = BB.__init__


@functools.wraps(init_as_shipped)  # keeps BB's signature: the suite reads it (epochs=)
def init(self, params, *args, **kwargs):
    init_as_shipped(self, params, *args, **kwargs)
    MOMENTUM.clear()
    for buffer in self._buffers.buffers:
        MOMENTUM[buffer.ema.data_ptr()] = buffer.momentum


def epoch_measure(
    self, param, ema, prev_params, prev_ema, *, enabled=None, second_moment=None, bias_correction=None, eps=0.0
):
    """The Adam mode's measuring pass with y from the momentum: prev_ema keeps the momentum at the last period end."""
    assert enabled is None, "the prototype runs host-counted"
    m = MOMENTUM[ema.data_ptr()].double()
    metric = eager._denominator(second_moment, bias_correction, eps).double()
    theta = param.double()
    delta_theta = theta - prev_params.double()
    delta_m = m - prev_ema.double()
    sums = torch.stack(
        [
            torch.dot(delta_theta * delta_theta, metric),
            torch.dot(delta_theta * metric, delta_m),
            torch.dot(theta, theta),
            torch.dot(m, m),
        ]
    )
    prev_ema.copy_(m)
    return sums


def install() -> None:
    BB.__init__ = init
    eager.EagerBackend.epoch_measure = epoch_measure


KWARGS = {"preconditioner": "adam", "backend": "eager"}

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    if sys.argv[1:2] == ["seeds"]:
        # Seeds 0-5 of both methods on the settings where they were trained with all six.
        references, runs = load([here / "runs", here / "more_seeds"], base=())
        adam_seeds(references, runs, ["bb[adam-eager]", "bb[adam-shared]"], seeds=range(6))
    elif sys.argv[1:2] == ["table"]:
        references, runs = load([])
        runs.update(adam_grid(here.parent / "preconditioner_intel_runs" / "runs", "bb[adam]", (0, 1)))
        for name in ("adam-eager", "adam-shared"):
            runs.update(adam_grid(here / "runs", f"bb[{name}]", (0, 1), source=f"bb[{name}]"))
        side_by_side(references, runs, ["bb", "bb[adam]", "bb[adam-eager]", "bb[adam-shared]"])
        print()
        for a, b in (("bb[adam]", "bb[adam-eager]"), ("bb[adam-eager]", "bb[adam-shared]")):
            moved = moved_runs(runs, a, b)
            print(f"Runs that moved by a point or more, `{a}` → `{b}`: {'; '.join(moved) or 'none'}.")
            print()
    else:
        control = sys.argv[4:5] == ["control"]
        if not control:
            install()
        method = "bb[adam-eager]" if control else "bb[adam-shared]"
        train_runs(sys.argv[1], sys.argv[2], sys.argv[3], "0.001", method, KWARGS)
