"""A prototype for BB's default, not in the optimizer: the gradient average g is updated only over the last
``FRACTION`` of a period's steps (L = ⌈FRACTION·T⌉ of its T). The steps before the window would then leave g alone:
with momentum, 20 bytes an fp32 element instead of 28, torch's fused SGD's count. Three ways to keep g's weights
adding up to about the full average's (1 − (1 − β)^T), the KIND:

- ``correct`` (method ``bb[windowF]``): only the epochs after the first are windowed (the first epoch's periods are
  short); g starts at zero as now and is scaled at the epoch's end by (1 − (1 − β)^T) / (1 − (1 − β)^L).
- ``first`` (method ``bb[window-firstF]``): every period is windowed, and the window's first step sets g to that
  step's direction (β = 1 once), so its weights add up to 1 with no correction.
- ``momentum`` (method ``bb[window-momentumF]``): as ``correct`` from the second epoch on, but with no rescaling: the
  window's average starts from the momentum buffer m (an average of the last ten or so directions) instead of zero,
  so the weights of the recent steps are the full average's and m stands for the older ones.

``correct-adam`` and ``first-adam``: the same in the Adam-scaled mode (``preconditioner="adam"``, methods
``bb[adam-windowF]``, ``bb[adam-window-firstF]``; its every η0 is the same run, so η0 = 1e-3 stands for the grid).

Emulated by zeroing g where the window opens (g starts each period at zero, so the updates before it are dropped;
``first`` divides that step's update by β; ``momentum`` copies m into g instead), so the prototype still moves 28
bytes. Runs are saved as the suite
saves them:

    python benchmarks/results/ema_window_runs/ema_window.py KIND FRACTION OUT_DIR SETTINGS SEEDS LRS
    python benchmarks/results/ema_window_runs/ema_window.py table FOLDER [FOLDER ...]  # beside the default
    python benchmarks/results/ema_window_runs/ema_window.py seeds-table FRACTION [FOLDER FIRST LAST]  # more seeds
    python benchmarks/results/ema_window_runs/ema_window.py rates  # how far each window moves the rates
    python benchmarks/results/ema_window_runs/ema_window.py adam-table FRACTION [FRACTION ...]  # beside the Adam mode
"""

import collections
import functools
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prototypes import (  # noqa: E402
    LRS,
    SEEDS,
    SETTINGS,
    adam_grid,
    adam_seeds,
    best_reference,
    gap_stats,
    gaps,
    load,
    moved_runs,
    score,
    side_by_side,
    sign_test,
    stats_cell,
    train_runs,
)

from bbfused import optimizer  # noqa: E402
from bbfused.buffer_set import BufferSet  # noqa: E402


def window(steps: int, fraction: float) -> int:
    return max(1, math.ceil(steps * fraction))


def window_start(clock, fraction: float, first_too: bool) -> int | None:
    """The step count (steps taken in the epoch) at which the window of the current period opens."""
    epoch, taken = clock.counts()
    steps, periods = clock.steps_per_epoch, clock.periods
    if epoch == 0 and periods.length:
        if not first_too:
            return None
        start = taken // periods.length * periods.length if taken < periods.last_inner_end else periods.last_inner_end
        end = start + periods.length if taken < periods.last_inner_end else steps
        return end - window(end - start, fraction)
    return steps - window(steps, fraction) if epoch >= 1 or first_too else None


def install(kind: str, fraction: float) -> None:
    first_too = kind.startswith("first")
    from_momentum = kind == "momentum"
    init_as_shipped, step_as_shipped, measure_as_shipped = optimizer.BB.__init__, BufferSet.step, BufferSet.measure

    @functools.wraps(init_as_shipped)
    def init(self, *args, **kwargs):
        init_as_shipped(self, *args, **kwargs)
        self._buffers.window_clock, self._buffers.window_beta = self._clock, self.beta

    def step(self, weight_decays, beta, *args, **kwargs):
        opens = self.window_clock.counts()[1] == window_start(self.window_clock, fraction, first_too)
        if opens:
            for buffer in self.buffers:
                if from_momentum:
                    buffer.ema.copy_(buffer.momentum)
                else:
                    buffer.ema.zero_()
        result = step_as_shipped(self, weight_decays, beta, *args, **kwargs)
        if opens and first_too:
            for buffer in self.buffers:
                buffer.ema.div_(beta)
        return result

    def measure(self, clock, partials=False):
        if kind.startswith("correct") and not clock.in_first_epoch_periods and clock.counts()[0] >= 1:
            steps, decay = clock.closing_steps, 1 - self.window_beta
            correction = (1 - decay**steps) / (1 - decay ** window(steps, fraction))
            for buffer in self.buffers:
                buffer.ema.mul_(correction)
        return measure_as_shipped(self, clock, partials)

    optimizer.BB.__init__ = init
    BufferSet.step = step
    BufferSet.measure = measure


def moved_grid_runs(runs: dict, before: str, after: str) -> str:
    """How many of ``after``'s runs (every η0 and seed) moved up or down by a point or more from ``before``'s, and
    on which settings those that fell are."""
    moves = [
        (setting, score(record) - score(runs[(setting, before, lr, seed)]))
        for (setting, name, lr, seed), record in runs.items()
        if name == after and (setting, before, lr, seed) in runs
    ]
    up, down = sum(m >= 1 for _, m in moves), sum(m <= -1 for _, m in moves)
    mean = sum(m for _, m in moves) / len(moves)
    fell = collections.Counter(setting for setting, m in moves if m <= -1)
    where = ", ".join(f"{setting} {count}" for setting, count in fell.most_common())
    return (
        f"`{after}`: {len(moves)} runs, {up} up and {down} down by a point or more (sign test p = "
        f"{sign_test(up, down):.2f}), mean {mean:+.2f} (down: {where or 'none'})"
    )


RATE_HEADER = (
    "| method | against | runs | median shift | quartiles | runs lower | runs higher |\n|---|---|---|---|---|---|---|"
)


def rate_shift(runs: dict, before: str, after: str) -> str:
    """Per run of ``after`` with a run of ``before`` (same setting, η0, seed): the mean over its epochs of
    log10(rate / ``before``'s rate); their median and quartiles, and how many runs ran lower or higher by more than
    0.05 (12 %)."""
    shifts = []
    for (setting, name, lr, seed), record in runs.items():
        other = runs.get((setting, before, lr, seed))
        if name != after or other is None:
            continue
        pairs = list(zip(record["bb_lr_history"], other["bb_lr_history"]))
        shifts.append(statistics.mean(math.log10(new / old) for new, old in pairs))
    low, _, high = statistics.quantiles(shifts, n=4)
    return (
        f"| `{after}` | `{before}` | {len(shifts)} | {statistics.median(shifts):+.3f} | {low:+.3f} / {high:+.3f} "
        f"| {sum(s < -0.05 for s in shifts)} | {sum(s > 0.05 for s in shifts)} |"
    )


def method(kind: str, fraction: str) -> str:
    """The runs' method name for a KIND (``correct``, ``first``, ``momentum``, optionally with ``-adam``)."""
    base, _, adam = kind.partition("-")
    window_name = {"correct": "window", "first": "window-first", "momentum": "window-momentum"}[base]
    return f"bb[{'adam-' if adam else ''}{window_name}{fraction}]"


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    if sys.argv[1:2] == ["adam-table"]:
        # The mode's seeds 0 and 1 as the suite's tables have them (C++ backend), seeds 2-5 from its eager-backend
        # control of the momentum-buffer prototype (no run of the mode moved by a point between the two backends).
        references, runs = load([])
        runs.update(adam_grid(here.parent / "preconditioner_intel_runs" / "runs", "bb[adam]", (0, 1)))
        more = here.parent / "adam_shared_runs" / "more_seeds"
        runs.update(adam_grid(more, "bb[adam]", range(2, 6), source="bb[adam-eager]"))
        methods = [method("correct-adam", fraction) for fraction in sys.argv[2:]]
        for fraction, name in zip(sys.argv[2:], methods):
            runs.update(adam_grid(here / f"adam-window{fraction}", name, source=name))
        # Seeds 2-5 of the mode and of the quarter window on the two settings the quarter cost most.
        runs.update(adam_grid(here / "adam_more_seeds", "bb[adam]", range(2, 6)))
        quarter = method("correct-adam", "0.25")
        runs.update(adam_grid(here / "adam_more_seeds", quarter, range(2, 6), source=quarter))
        side_by_side(references, runs, ["bb[adam]", *methods])
        print()
        adam_seeds(references, runs, ["bb[adam]", *methods], seeds=range(6))
        if quarter in methods:
            print()
            adam_seeds(references, runs, ["bb[adam]", quarter], seeds=range(6))
        for name in methods:
            moved = moved_runs(runs, "bb[adam]", name, seeds=range(6))
            print(f"\nRuns of `{name}` that moved by a point or more: {'; '.join(moved) or 'none'}.")
    elif sys.argv[1:2] == ["rates"]:
        references, runs = load([here / name for name in ("window0.5", "window0.25", "window-momentum0.25")])
        runs.update(adam_grid(here.parent / "preconditioner_intel_runs" / "runs", "bb[adam]", (0, 1)))
        for fraction in ("0.5", "0.25"):
            name = method("correct-adam", fraction)
            runs.update(adam_grid(here / f"adam-window{fraction}", name, (0, 1), source=name))
        print(RATE_HEADER)
        for fraction in ("0.5", "0.25"):
            print(rate_shift(runs, "bb", method("correct", fraction)))
        print(rate_shift(runs, "bb", method("momentum", "0.25")))
        for fraction in ("0.5", "0.25"):
            print(rate_shift(runs, "bb[adam]", method("correct-adam", fraction)))
    elif sys.argv[1:2] == ["seeds-table"]:
        # More seeds of the default and of the prototypes, every η0, against the best tuned reference of seeds 0, 1:
        # seeds 2-5 in more_seeds/ (default), or FOLDER FIRST LAST.
        folder, first, last = sys.argv[3:6] if len(sys.argv) > 3 else ("more_seeds", 2, 5)
        references, runs = load([here / folder], base=())
        seeds = range(int(first), int(last) + 1)
        kinds = {key[1] for key in runs}
        methods = ["bb", *(m for m in (method(kind, sys.argv[2]) for kind in ("correct", "momentum")) if m in kinds)]
        print("| setting | best tuned reference | " + " | ".join(methods) + " |")
        print("|---|---|" + "---|" * len(methods))
        for setting in SETTINGS:
            best = best_reference(references, setting, LRS, SEEDS)
            cells = [stats_cell(gap_stats(gaps(runs, setting, m, LRS, seeds, best.mean).values())) for m in methods]
            if cells[0] != "·":
                print(f"| {setting} | {best.method} @ {best.lr}: {best.mean:.2f} | " + " | ".join(cells) + " |")
        print()
        for name in methods[1:]:
            print(moved_grid_runs(runs, "bb", name))
        print()
        print(RATE_HEADER)
        for name in methods[1:]:
            print(rate_shift(runs, "bb", name))
    elif sys.argv[1:2] == ["table"]:
        folders = sys.argv[2:]
        runs = load([here / folder for folder in folders])
        methods = sorted({key[1] for key in runs[1] if key[1].startswith("bb[window")})
        side_by_side(*runs, ["bb", *methods])
        print()
        for name in methods:
            print(moved_grid_runs(runs[1], "bb", name))
    else:
        kind, fraction = sys.argv[1:3]
        install(kind, float(fraction))
        adam = {"preconditioner": "adam"} if kind.endswith("-adam") else None
        train_runs(*sys.argv[3:7], method(kind, fraction), bb_kwargs=adam)
