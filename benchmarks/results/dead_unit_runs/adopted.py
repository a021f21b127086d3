"""The dead-unit test as the optimizer has it (bbfused/control/live_gradients.py) against the prototype it came from
(``dead_units.py``, runs ``bb[dead0.5]`` here) and against the default without it (the suite's ``bb`` runs at
``BASE``, read through git): every (setting, η0, seed) of seeds 0 and 1, and the issue's checks.

    python benchmarks/results/dead_unit_runs/adopted.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(HERE.parents[1] / "robustness"))

from report import best_reference, check, load_runs, score, signed  # noqa: E402
from suite import LRS, PEERS, RUNS, SEEDS, SETTINGS, Run  # noqa: E402

BASE = "5e45055"  # the last commit whose suite runs are the default without the test
PROTOTYPE = "bb[dead0.5]"


def base_runs() -> dict:
    """The suite's ``bb`` runs at BASE, keyed as load_runs keys them."""
    runs = {}
    for setting in SETTINGS:
        for lr in LRS:
            for seed in SEEDS:
                path = (RUNS / f"{Run(setting, 'bb', lr, seed).name}.json").relative_to(REPO)
                text = subprocess.run(
                    ["git", "show", f"{BASE}:{path}"], cwd=REPO, capture_output=True, text=True, check=True
                ).stdout
                runs[(setting, "bb-before", lr, seed)] = json.loads(text)
    return runs


def main() -> None:
    runs = {**load_runs(RUNS), **load_runs(HERE), **base_runs()}
    print("| setting | best tuned reference | before: runs > 3 short, median | with the test: the same | "
          "runs the prototype gave otherwise |")  # fmt: skip
    print("|---|---|---|---|---|")
    totals = {"before": 0, "now": 0, "count": 0, "differ": 0}
    for setting in SETTINGS:
        best = best_reference(runs, setting, LRS, SEEDS)
        keys = [(lr, seed) for lr in LRS for seed in SEEDS]
        before = [score(runs[(setting, "bb-before", lr, seed)]) - best.mean for lr, seed in keys]
        now = [score(runs[(setting, "bb", lr, seed)]) - best.mean for lr, seed in keys]
        pairs = {key: (score(runs[(setting, PROTOTYPE, *key)]), score(runs[(setting, "bb", *key)])) for key in keys}
        differ = [f"{lr:g}/{seed}: {old:.2f} → {new:.2f}" for (lr, seed), (old, new) in pairs.items() if old != new]
        short_before, short_now = sum(g < -3 for g in before), sum(g < -3 for g in now)
        totals["before"] += short_before
        totals["now"] += short_now
        totals["count"] += len(keys)
        totals["differ"] += len(differ)
        print(
            f"| {setting} | {best.method} @ {best.lr}: {best.mean:.2f} "
            f"| {short_before}, {signed(statistics.median(before))} | {short_now}, {signed(statistics.median(now))} "
            f"| {'; '.join(differ) or 'none'} |"
        )
    print(
        f"| all | | {totals['before']} of {totals['count']} | {totals['now']} of {totals['count']} "
        f"| {totals['differ']} runs |"
    )
    print()
    print("| method | settings | worst | medians below -1 | runs > 3 short | holds |")
    print("|---|---|---|---|---|---|")
    groups = {"all": tuple(SETTINGS), "holdout": tuple(s for s, spec in SETTINGS.items() if spec.holdout)}
    for method in ("bb-before", "bb"):
        for group, settings in groups.items():
            result = check(runs, method, group, settings, PEERS, LRS, SEEDS)
            print(
                f"| {method} | {group} ({len(settings)}) | {signed(result.worst)} "
                f"| {', '.join(result.medians_short) or 'none'} | {result.short} of {result.count} "
                f"| {'yes' if result.holds else 'no'} |"
            )


if __name__ == "__main__":
    main()
