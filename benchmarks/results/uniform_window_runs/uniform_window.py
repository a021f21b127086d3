"""A prototype for BB's default, not in the optimizer: the rule's gradient average ḡ is the plain mean of the
directions d over the last ``FRACTION`` of each epoch after the first (n = ⌈FRACTION·T⌉ steps), read from two points
instead of averaged step by step.

With the default's momentum in EMA form (m ← m + (1 − μ)(d − m), θ ← θ − η·m) the point z = θ − η·μ/(1 − μ)·m takes
plain SGD steps, z ← z − η·d, as long as η holds within the epoch (the default's rate does: the end phase's factor
moves once an epoch). So Σ d over the window = (z_a − z_b) / η, z_a where the window opens and z_b at the epoch's end:
the step would never read or write g (20 bytes an fp32 element, torch's fused SGD's count), the window's opening
would write z_a into g, and the epoch end would read m once more. Here the same arithmetic runs as torch ops in fp32
around the shipped step, whose g is left alone in those epochs (``EMA_KEEP``). FRACTION 1: the whole epoch, z_a taken
at its first step. Method ``bb[uniformF]``. Runs are saved as the suite saves them:

    python benchmarks/results/uniform_window_runs/uniform_window.py FRACTION OUT_DIR SETTINGS SEEDS LRS
    python benchmarks/results/uniform_window_runs/uniform_window.py table FOLDER [FOLDER ...]  # beside the defaults

The prototype patches the optimizer as it was at 822afb8, before it took the window's mean itself (30b56a2): run it
there. ``table`` sets its runs beside the default it replaced (``bb[window-momentum0.25]``, g averaged over the last
quarter from m) and the suite's ``bb`` runs (the default of the day).
    python benchmarks/results/uniform_window_runs/uniform_window.py outside FRACTION SEEDS [SETTINGS]
    python benchmarks/results/uniform_window_runs/uniform_window.py outside-table  # paired with the default
    python benchmarks/results/uniform_window_runs/uniform_window.py short-table  # short epochs, more seeds

``short-table`` pairs the suite's ``bb`` runs on seeds 2-11 of its two cheapest settings with short epochs
(bn-digits-large, 10 steps; mixer, 24) as the default was before (``short_epochs/ema_window/``, trained at 822afb8)
and as it is (``short_epochs/window_mean/``, at 30b56a2).

``outside`` trains on the four settings of ``ema_window_runs/outside.py`` (designed after the windowed average was
adopted, never tuned on) into ``uniform_window_runs/outside/``; ``outside-table`` pairs each run with the run of the
same setting, η0 and seed of the default before (the average from m, ``bb``) and of the average over every step
(``bb[full-average]``), in ``ema_window_runs/outside/`` and, for the seeds added here (4-11 of the deep ReLU MLP,
trained at 822afb8 with ``outside.py bb``), ``uniform_window_runs/outside_ema_window/``.
"""

import collections
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prototypes import (  # noqa: E402
    LRS,
    SETTINGS,
    load,
    load_runs,
    moved_line,
    print_moves,
    print_setting_moves,
    score,
    side_by_side,
    train_runs,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ema_window_runs"))
from outside import OUTSIDE  # noqa: E402

from bbfused import optimizer  # noqa: E402
from bbfused.average_window import EMA_KEEP, EMA_UPDATE, AverageWindow  # noqa: E402

# The default before this prototype (g averaged over the last quarter, started from m): its 380 suite runs, which the
# optimizer at 7ff0f42 reproduced bit for bit (2026-12-06_cpu_ema_window.md).
EMA_WINDOW = "bb[window-momentum0.25]"


class KeepAfterFirstEpoch(AverageWindow):
    """g is averaged step by step in the first epoch only; later the prototype sets it at the epoch's end."""

    def mode(self, epoch, taken, steps_per_epoch):
        return EMA_UPDATE if epoch == 0 else EMA_KEEP


def point_coefficient(opt) -> float:
    """c in z = θ − c·η·m: μ / (1 − μ) for heavy ball, μ² / (1 − μ) for Nesterov (z then steps z ← z − η·d)."""
    mu = opt._buffers.momentum
    return (mu * mu if opt._buffers.nesterov else mu) / (1 - mu)


def z_point(opt, buffer) -> "torch.Tensor":  # noqa: F821
    eta = opt._buffers.lr.to(buffer.ema.dtype)
    return buffer.param.to(buffer.ema.dtype) - (point_coefficient(opt) * eta) * buffer.momentum


def install(fraction: float, prior: bool = False) -> None:
    """The prototype in BB: the window's mean of d over the last ``fraction`` of each epoch after the first; with
    ``prior`` the momentum buffer where the window opens counts as c more steps (c = μ / (1 − μ)): the window's first
    point is then θ itself, z_a + c·η·m_a, and the mean (Σ d + c·m_a) / (n + c)."""
    _install(fraction, point_coefficient if prior else lambda opt: 0.0)


def _install(fraction: float, prior_steps) -> None:
    init_as_shipped, step_as_shipped, close_as_shipped = optimizer.BB.__init__, optimizer.BB.step, None
    close_as_shipped = optimizer.BB._close_epoch

    @functools.wraps(init_as_shipped)
    def init(self, *args, **kwargs):
        init_as_shipped(self, *args, **kwargs)
        assert self._buffers.momentum > 0 and self._clock.window.fraction is not None
        self._clock.window = KeepAfterFirstEpoch(fraction)
        self._uniform_steps = None

    @functools.wraps(step_as_shipped)
    def step(self, *args, **kwargs):
        epoch, taken = self._clock.counts()
        opening = self._clock.window.opening_step(self.steps_per_epoch)
        if epoch >= 1 and taken == opening:
            prior = prior_steps(self)
            for buffer in self._buffers:
                if prior:
                    buffer.ema.copy_(buffer.param.to(buffer.ema.dtype))  # z_a + c·η·m_a
                else:
                    buffer.ema.copy_(z_point(self, buffer))
            self._uniform_steps = self.steps_per_epoch - opening + prior
        return step_as_shipped(self, *args, **kwargs)

    @functools.wraps(close_as_shipped)
    def close(self):
        if self._uniform_steps is not None and not self._closing:
            eta = self._buffers.lr
            for buffer in self._buffers:
                scale = (1.0 / (eta * self._uniform_steps)).to(buffer.ema.dtype)
                buffer.ema.sub_(z_point(self, buffer)).mul_(scale)
            self._uniform_steps = None
        return close_as_shipped(self)

    optimizer.BB.__init__, optimizer.BB.step, optimizer.BB._close_epoch = init, step, close


CHANCE = 20  # a digits classifier below this test accuracy (%) has collapsed (10 classes)


def outside_table(here: Path) -> None:
    """Per outside setting and prototype: runs paired with the default's (``bb``, the average from m) and with the
    average over every step (``bb[full-average]``), how many moved a point or more each way."""
    default = {**load_runs(here.parent / "ema_window_runs" / "outside"), **load_runs(here / "outside_ema_window")}
    runs = load_runs(here / "outside")
    for baseline in ("bb", "bb[full-average]"):
        for method in sorted({m for (s, m, lr, seed) in runs if (s, baseline, lr, seed) in default}):
            print_setting_moves(runs, method, default, baseline)
        print()
    for low, high in ((0, 30), (30, 60)):  # the deep ReLU MLP's first 30 seeds and the 30 added after them
        halves = [
            score(record) - score(default[setting, "bb", lr, seed])
            for (setting, method, lr, seed), record in runs.items()
            if setting == "deep-relu-digits-b64"
            and method == "bb[uniform0.25]"
            and low <= seed < high
            and (setting, "bb", lr, seed) in default
        ]
        print(moved_line(f"- deep-relu-digits-b64, seeds {low}-{high - 1}: `bb[uniform0.25]` against `bb`", halves))
    for name, records in (("bb", default), ("bb[uniform0.25]", runs)):
        print_collapses(records, name)


def print_collapses(records: dict, method: str, seeds: set[int] | None = None) -> None:
    """``method``'s runs of the deep ReLU MLP outside the suite that ended below CHANCE, per η0 (of ``seeds``; None:
    every seed)."""
    scores = [
        (lr, score(r))
        for (s, m, lr, seed), r in records.items()
        if s == "deep-relu-digits-b64" and m == method and (seeds is None or seed in seeds)
    ]
    low = [lr for lr, value in scores if value < CHANCE]
    per_lr = ", ".join(f"{low.count(lr)} from η0 = {lr:g}" for lr in LRS)
    print(f"- deep-relu-digits-b64, `{method}`: {len(low)} of {len(scores)} runs below {CHANCE} % ({per_lr})")


def short_table(here: Path) -> None:
    """Per setting and over both: the new default's runs paired with the old's, moved a point or more each way."""
    before = load_runs(here / "short_epochs" / "ema_window")
    after = load_runs(here / "short_epochs" / "window_mean")
    moves = collections.defaultdict(list)
    for key, record in sorted(after.items()):
        if key in before:
            moves[key[0]].append(score(record) - score(before[key]))
    every = [move for setting_moves in moves.values() for move in setting_moves]
    for setting, setting_moves in [*moves.items(), ("both", every)]:
        print(moved_line(f"- {setting}: the window's mean against the average from m", setting_moves))


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    if sys.argv[1] == "short-table":
        short_table(here)
    elif sys.argv[1] == "outside-table":
        outside_table(here)
    elif sys.argv[1] == "outside":
        SETTINGS.update({setting.name: setting for setting in OUTSIDE})
        name, seeds = sys.argv[2], sys.argv[3]
        settings = sys.argv[4] if len(sys.argv) > 4 else ",".join(s.name for s in OUTSIDE)
        install(float(name.removesuffix("-prior")), prior=name.endswith("-prior"))
        train_runs(here / "outside", settings, seeds, ",".join(str(lr) for lr in LRS), f"bb[uniform{name}]")
    elif sys.argv[1] == "table":
        folders = [here.parent / "ema_window_runs" / "window-momentum0.25", *(Path(f) for f in sys.argv[2:])]
        references, runs = load(folders)
        methods = sorted({m for (_, m, _, _) in runs if m.startswith("bb[uniform")})
        side_by_side(references, runs, [EMA_WINDOW, *methods, "bb"])
        print()
        print_moves(runs, [*methods, "bb"], baseline=EMA_WINDOW)
    else:
        name = sys.argv[1]
        install(float(name.removesuffix("-prior")), prior=name.endswith("-prior"))
        train_runs(*sys.argv[2:6], f"bb[uniform{name}]")
