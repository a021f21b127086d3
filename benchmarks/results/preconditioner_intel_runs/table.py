"""The tables of 2026-12-06_cpu_preconditioner_adam_intel.md: ``BB(preconditioner="adam")`` trained again on the
Intel Xeon (run files in ``runs/``), beside the same mode's runs on the AMD EPYC (``../preconditioner_runs/``) and
BB's default as re-recorded on the Intel Xeon (the suite's records):
``python benchmarks/results/preconditioner_intel_runs/table.py``.

With the preconditioner every η0 ≥ 1e-3 is the same run, so each seed's η0 = 1e-3 run stands for the whole η0 grid
(as ``../preconditioner_runs/table.py`` does)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1] / "robustness"))

from prototypes import ADAM_LR, adam_grid, moved_runs  # noqa: E402
from report import best_reference, check, gap_stats, gaps, load_runs, score, signed, stats_cell  # noqa: E402
from suite import LRS, PEERS, RUNS, SEEDS, SETTINGS  # noqa: E402

INTEL = "bb[adam] Intel"
AMD = "bb[adam] AMD"


def main() -> None:
    references = load_runs(RUNS)
    runs = {
        **references,
        **adam_grid(HERE / "runs", INTEL, SEEDS),
        **adam_grid(HERE.parent / "preconditioner_runs", AMD, SEEDS),
    }
    print(
        "| setting | group | best tuned reference | bb (Intel): worst / median / > 3 short "
        f"| {AMD}: seeds 0, 1 | {INTEL}: seeds 0, 1 |"
    )
    print("|---|---|---|---|---|---|")
    for setting, spec in SETTINGS.items():
        best = best_reference(references, setting, LRS, SEEDS)
        if best is None:
            continue
        default = stats_cell(gap_stats(gaps(runs, setting, "bb", LRS, SEEDS, best.mean).values()))
        cells = []
        for name in (AMD, INTEL):
            cells.append(
                " / ".join(signed(score(runs.get((setting, name, ADAM_LR, seed))) - best.mean) for seed in SEEDS)
            )
        group = "holdout" if spec.holdout else "dev"
        print(f"| {setting} | {group} | {best.method} @ {best.lr}: {best.mean:.2f} | {default} | {' | '.join(cells)} |")
    print()
    print("The issue's checks over seeds 0 and 1 and η0 ∈ {1e-3 … 10} on all settings (the report's `check`):")
    print()
    print("| method | worst | settings with a median below -1 | runs > 3 short | runs > 2 short | holds |")
    print("|---|---|---|---|---|---|")
    for method in ("bb", AMD, INTEL):
        result = check(runs, method, "all", tuple(SETTINGS), PEERS, LRS, SEEDS)
        over_two = sum(
            g is not None and g < -2
            for s in SETTINGS
            if (best := best_reference(references, s, LRS, SEEDS)) is not None
            for g in gaps(runs, s, method, LRS, SEEDS, best.mean).values()
        )
        print(
            f"| {method} | {signed(result.worst)} | {', '.join(result.medians_short) or 'none'} "
            f"| {result.short} of {result.count} | {over_two} of {result.count} | {'yes' if result.holds else 'no'} |"
        )
    print()
    changed = moved_runs(runs, AMD, INTEL)
    print("Runs whose score moved by a point or more between the two CPUs: " + ("; ".join(changed) or "none") + ".")


if __name__ == "__main__":
    main()
