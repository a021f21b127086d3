"""A prototype for BB's default, not in the optimizer: the window's mean of d with the momentum buffer where the
window opens, m_a, counted as k more steps, k chosen so that m_a carries the weight the full average gives the steps
before the window.

BB's default takes g as the mean of d over the last n = ⌈T/4⌉ steps of each epoch, read from the points z = θ − c·η·m
where the window opens and closes. The full average (g ← g + β·(d − g), β = 4/T) gives the steps before the window
the weight w = (1 − β)^n at the epoch's end, and the default before 30b56a2 started its window from m_a and so kept
that weight. Here g = (Σ d + k·m_a) / (n + k) with k / (n + k) = w, so k = n·w / (1 − w): about 0.58·n for long
epochs (w → e⁻¹). The window's first point becomes θ_a − (c − k)·η·m_a (= z_a + k·η·m_a) and the closing scale
1 / (η·(n + k)): the same bytes as the default. k = c (``uniform0.25-prior`` of ``uniform_window.py``) was rejected
there; this k is set from the full average's weights, not from any run.

Like ``uniform_window.py`` it patches the optimizer as it was at 822afb8 (torch ops in fp32 around the shipped step,
which that prototype showed equal to the optimizer's default bit for bit with k = 0): run it there.

    python benchmarks/results/window_prior_runs/window_prior.py suite OUT_DIR SETTINGS SEEDS LRS
    python benchmarks/results/window_prior_runs/window_prior.py outside SEEDS [SETTINGS]
    python benchmarks/results/window_prior_runs/window_prior.py table
    python benchmarks/results/window_prior_runs/window_prior.py outside-table
    python benchmarks/results/window_prior_runs/window_prior.py rates SEEDS [LR [SETTING]]  # an outside setting's
    rates (default: the deep ReLU MLP from η0 = 1e-3)
"""

import functools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "uniform_window_runs"))
from prototypes import load_runs, print_setting_moves, score, suite_table, train_outside, train_runs  # noqa: E402
from uniform_window import KeepAfterFirstEpoch, point_coefficient, print_collapses, z_point  # noqa: E402

from bbfused import optimizer  # noqa: E402

METHOD = "bb[mean-with-m]"
FRACTION = 0.25


def prior_steps(steps_per_epoch: int, window_steps: int) -> float:
    """k: m_a's weight k / (n + k) equals (1 − β)^n, the full average's weight of the steps before the window."""
    w = (1.0 - 4.0 / steps_per_epoch) ** window_steps
    return window_steps * w / (1.0 - w)


def install() -> None:
    init_as_shipped, step_as_shipped = optimizer.BB.__init__, optimizer.BB.step
    close_as_shipped = optimizer.BB._close_epoch

    @functools.wraps(init_as_shipped)
    def init(self, *args, **kwargs):
        init_as_shipped(self, *args, **kwargs)
        assert self._buffers.momentum > 0 and self._clock.window.fraction is not None
        self._clock.window = KeepAfterFirstEpoch(FRACTION)
        self._window_weight = None

    @functools.wraps(step_as_shipped)
    def step(self, *args, **kwargs):
        epoch, taken = self._clock.counts()
        opening = self._clock.window.opening_step(self.steps_per_epoch)
        if epoch >= 1 and taken == opening:
            n = self.steps_per_epoch - opening
            k = prior_steps(self.steps_per_epoch, n)
            for buffer in self._buffers:
                eta = self._buffers.lr.to(buffer.ema.dtype)
                start = buffer.param.to(buffer.ema.dtype) - ((point_coefficient(self) - k) * eta) * buffer.momentum
                buffer.ema.copy_(start)  # z_a + k·η·m_a
            self._window_weight = n + k
        return step_as_shipped(self, *args, **kwargs)

    @functools.wraps(close_as_shipped)
    def close(self):
        if self._window_weight is not None and not self._closing:
            eta = self._buffers.lr
            for buffer in self._buffers:
                scale = (1.0 / (eta * self._window_weight)).to(buffer.ema.dtype)
                buffer.ema.sub_(z_point(self, buffer)).mul_(scale)
            self._window_weight = None
        return close_as_shipped(self)

    optimizer.BB.__init__, optimizer.BB.step, optimizer.BB._close_epoch = init, step, close


def outside_table() -> None:
    """Outside the suite: the prototype's runs paired with the default's (the window's mean, ``bb[uniform0.25]``)
    and with the default before it (the window from m, ``bb``), moved a point or more each way; runs at chance."""
    uniform = HERE.parent / "uniform_window_runs"
    baselines = {
        "bb[uniform0.25]": load_runs(uniform / "outside"),
        "bb": {**load_runs(HERE.parent / "ema_window_runs" / "outside"), **load_runs(uniform / "outside_ema_window")},
    }
    runs = load_runs(HERE / "outside")
    for baseline, records in baselines.items():
        print_setting_moves(runs, METHOD, records, baseline)
        print()
    seeds = {seed for (s, _, _, seed) in runs if s == "deep-relu-digits-b64"}
    for name, records in (*baselines.items(), (METHOD, runs)):
        print_collapses(records, name, seeds)


def rates(seeds: str, lr: float = 0.001, setting: str = "deep-relu-digits-b64") -> None:
    """The rate at each epoch's end of the three forms of g on ``setting`` from ``lr``, the final training loss and
    score."""
    uniform = HERE.parent / "uniform_window_runs"
    runs = {
        **load_runs(HERE.parent / "ema_window_runs" / "outside"),
        **load_runs(uniform / "outside_ema_window"),
        **load_runs(uniform / "outside"),
        **load_runs(HERE / "outside"),
    }
    print("| seed | g | score | final training loss | rate at each epoch's end |")
    print("|---|---|---|---|---|")
    for seed in (int(s) for s in seeds.split(",")):
        for name in ("bb", "bb[uniform0.25]", METHOD):
            record = runs[setting, name, lr, seed]
            history = " ".join(f"{rate:.2g}" for rate in record["bb_lr_history"])
            loss = record["train_loss"][-1]
            print(f"| {seed} | `{name}` | {score(record):.1f} | {loss:.3f} | {history} |")


if __name__ == "__main__":
    if sys.argv[1] == "rates":
        rates(sys.argv[2], *([float(sys.argv[3])] if len(sys.argv) > 3 else []), *sys.argv[4:5])
    elif sys.argv[1] == "table":
        suite_table(HERE / "suite", METHOD)
    elif sys.argv[1] == "outside-table":
        outside_table()
    elif sys.argv[1] == "outside":
        install()
        train_outside(HERE / "outside", sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None, METHOD)
    elif sys.argv[1] == "suite":
        install()
        train_runs(*sys.argv[2:6], METHOD)
    else:
        raise SystemExit(__doc__)
