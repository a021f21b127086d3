"""The share of gradient values different from zero, at the end of each of the first epoch's first three periods and
of every epoch, in runs of BB's default (the rule is not applied): the trace behind 2026-12-05_cpu_dead_units.md.
"halved at" lists the points where the share fell below half of the one before.

    python benchmarks/results/dead_unit_runs/live_fraction.py SETTINGS 0.001,0.01,0.1,1,10 0,1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "robustness"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import suite  # noqa: E402
from dead_units import nonzero_share  # noqa: E402

from bbfused import BB  # noqa: E402

step_without_count = BB.step
shares: list[float] = []


def step(self: BB, *args, **kwargs):
    shares.append(nonzero_share(self))
    return step_without_count(self, *args, **kwargs)


def main(argv: list[str]) -> None:
    """SETTINGS LRS SEEDS: one line a run."""
    BB.step = step
    for setting in argv[0].split(","):
        for seed in [int(s) for s in argv[2].split(",")]:
            for lr in [float(x) for x in argv[1].split(",")]:
                shares.clear()
                record = suite.train(suite.Run(setting, "bb", lr, seed))
                steps = record["steps_per_epoch"]
                quarter = max(2, steps // 4)  # the first epoch's period, as bbfused.clock.Periods has it
                ends = [quarter - 1, 2 * quarter - 1, 3 * quarter - 1]
                ends += [epoch * steps + steps - 1 for epoch in range(len(shares) // steps)]
                live = [shares[i] for i in ends if i < len(shares)]
                halved = [i for i in range(1, len(live)) if live[i] < 0.5 * live[i - 1]]
                print(
                    setting, lr, seed, "score", round(record["score"], 1), "live", [round(x, 2) for x in live],
                    "halved at", halved, "rolled back", record["rolled_back_epochs"], flush=True,
                )  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
