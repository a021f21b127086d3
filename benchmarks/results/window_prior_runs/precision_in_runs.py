"""How closely BB's default reads the window's mean of d from its two points in real runs: at every epoch end after
the first, the g the epoch end finds against the float64 mean of the directions the window's steps took, and the
rule's sum Δθᵀy with each. Runs on the optimizer as it is (the window's mean is the default since 30b56a2).

    python benchmarks/results/window_prior_runs/precision_in_runs.py SETTING LR SEEDS

SETTING: a suite setting or one of ``ema_window_runs/outside.py``. Per run: the median and largest relative error of
g and of Δθᵀy over the run's epochs, and the largest while the rate was at least 1e-3.
"""

import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "ema_window_runs"))
from outside import OUTSIDE  # noqa: E402
from prototypes import SETTINGS, Run, train  # noqa: E402

from bbfused import optimizer  # noqa: E402
from bbfused.buffer_set import BufferSet  # noqa: E402

RATE_FLOOR = 1e-3  # below it a step's update nears θ's rounding (uniform_window_runs/precision.py)
STEP_AS_SHIPPED, MEASURE_AS_SHIPPED = optimizer.BB.step, BufferSet.measure


class Recorder:
    """Patches BB's step to keep each step's d in float64, and the epoch-end pass to compare g with their mean."""

    def __init__(self) -> None:
        self.directions: list[torch.Tensor] = []
        self.records: list[dict] = []
        self.previous_mean = None
        self.optimizer = None

    def install(self) -> None:
        recorder = self

        def step(bb, *args, **kwargs):
            weight_decay = bb.param_groups[0]["weight_decay"]
            recorder.directions.append(
                torch.cat([b.grad.double().flatten() + weight_decay * b.param.double().flatten() for b in bb._buffers])
            )
            recorder.optimizer = bb
            return STEP_AS_SHIPPED(bb, *args, **kwargs)

        def measure(buffers, clock, partials=False):
            recorder.compare(buffers)
            return MEASURE_AS_SHIPPED(buffers, clock, partials)

        optimizer.BB.step, BufferSet.measure = step, measure

    def compare(self, buffers: BufferSet) -> None:
        taken, steps_per_epoch = len(self.directions), self.optimizer.steps_per_epoch
        if taken < 2 * steps_per_epoch or taken % steps_per_epoch:
            return  # the first epoch's periods, whose g is the average over every step
        window = self.optimizer._clock.window.window_steps(steps_per_epoch)

        def flat(name: str) -> torch.Tensor:
            return torch.cat([getattr(b, name).double().flatten() for b in buffers.buffers])

        mean = torch.stack(self.directions[-window:]).mean(0)
        g, previous_g = flat("ema"), flat("prev_ema")
        record = {"lr": self.optimizer.lr_history[-1], "g": ((g - mean).norm() / mean.norm()).item()}
        if self.previous_mean is not None:
            moved = flat("param") - flat("prev_params")
            exact = moved @ (mean - self.previous_mean)
            record["sum"] = abs((moved @ (g - previous_g) - exact).item()) / abs(exact.item())
        self.records.append(record)
        self.previous_mean = mean


def main(setting_name: str, lr: float, seeds: str) -> None:
    SETTINGS.update({setting.name: setting for setting in OUTSIDE})
    errors = "g: median / largest | Δθᵀy: median / largest"
    print(f"| seed | score | {errors} | largest while η ≥ {RATE_FLOOR:g}: g / Δθᵀy |")
    print("|---|---|---|---|---|")
    for seed in (int(s) for s in seeds.split(",")):
        recorder = Recorder()
        recorder.install()
        record = train(Run(setting_name, "bb", lr, seed))
        errors = {key: [r[key] for r in recorder.records if key in r] for key in ("g", "sum")}
        fast = {key: [r[key] for r in recorder.records if key in r and r["lr"] >= RATE_FLOOR] for key in errors}
        cells = [f"{statistics.median(v):.1e} / {max(v):.1e}" for v in errors.values()]
        high = " / ".join(f"{max(v):.1e}" if v else "–" for v in fast.values())
        print(f"| {seed} | {record['score']:.1f} | {cells[0]} | {cells[1]} | {high} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), sys.argv[3])
