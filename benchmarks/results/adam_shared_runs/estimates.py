"""Each rate period's BB estimate and rate in one suite run of the Adam mode (eager backend), with the estimate from
BB's own average (``mode``) or from the momentum buffer (``shared``, ``adam_shared.py``'s prototype):

    python benchmarks/results/adam_shared_runs/estimates.py SETTING SEED mode|shared
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import adam_shared  # noqa: E402
from prototypes import ADAM_LR, Run, train  # noqa: E402

from bbfused.control import safeguard  # noqa: E402
from bbfused.rule import bb_ratio  # noqa: E402

PERIODS: list[tuple[float, float, float, float]] = []
next_rate_as_shipped = safeguard.SafeguardControl.next_rate


def next_rate(self, sums, diverged, rose, steps, bounds, search_open=True, risen=None):
    new, searching, ceiling = next_rate_as_shipped(self, sums, diverged, rose, steps, bounds, search_open, risen)
    PERIODS.append((float(self.rate), float(bb_ratio(sums, steps)), float(sums[0]), float(sums[1])))
    return new, searching, ceiling


if __name__ == "__main__":
    setting, seed, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if kind == "shared":
        adam_shared.install()
    safeguard.SafeguardControl.next_rate = next_rate
    record = train(Run(setting, f"bb[adam-{kind}]", ADAM_LR, seed), bb_kwargs=adam_shared.KWARGS)
    print(f"{setting} seed {seed} {kind}: {record['score']:.2f} %")
    print("| period | r | estimate | estimate / r | ΔθᵀDΔθ | Δθᵀy |")
    print("|---|---|---|---|---|---|")
    for k, (rate, estimate, delta_sq, dot) in enumerate(PERIODS):
        print(f"| {k} | {rate:.3g} | {estimate:.3g} | {estimate / rate:.3g} | {delta_sq:.3g} | {dot:.3g} |")
