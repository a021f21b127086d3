"""The tables of 2026-12-05_cpu_lookahead_estimate.md: the look-ahead estimate (``lookahead.py`` next to this
script, runs ``bb[lookahead]``) against BB's default and the best tuned reference of every setting:
``python benchmarks/results/lookahead_runs/table.py FOLDER [FOLDER ...]``; with ``--adam`` first, the Adam-scaled
mode with and without it, per seed."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "robustness"))

from report import best_reference, check, gap_stats, load_runs, score, signed  # noqa: E402
from suite import LRS, PEERS, RUNS, SEEDS, SETTINGS  # noqa: E402


def cell(runs: dict, setting: str, method: str, best: float) -> str:
    stats = gap_stats(
        score(runs[(setting, method, lr, seed)]) - best if (setting, method, lr, seed) in runs else None
        for lr in LRS
        for seed in SEEDS
    )
    if stats.count == 0:
        return "·"
    missing = f" ({stats.count} of {stats.expected})" if stats.count < stats.expected else ""
    return f"{signed(stats.worst)} / {signed(stats.median)} / {stats.short}{missing}"


def main(folders: list[str]) -> None:
    references = load_runs(RUNS)
    runs = dict(references)
    for folder in folders:
        runs.update(load_runs(Path(folder)))
    methods = ["bb", "bb[lookahead]"]
    print("| setting | group | best tuned reference | " + " | ".join(methods) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for setting, spec in SETTINGS.items():
        best = best_reference(references, setting, LRS, SEEDS)
        if best is None:
            continue
        cells = [cell(runs, setting, m, best.mean) for m in methods]
        if all(c == "·" for c in cells[1:]):
            continue
        group = "holdout" if spec.holdout else "dev"
        print(f"| {setting} | {group} | {best.method} @ {best.lr}: {best.mean:.2f} | " + " | ".join(cells) + " |")
    print()
    print("| method | settings | worst | medians below -1 | runs > 3 short | `bb` on the same settings |")
    print("|---|---|---|---|---|---|")
    for method in methods[1:]:
        done = tuple(s for s in SETTINGS if all((s, method, lr, seed) in runs for lr in LRS for seed in SEEDS))
        result = check(runs, method, "all", done, PEERS, LRS, SEEDS)
        default = check(runs, "bb", "all", done, PEERS, LRS, SEEDS)
        print(
            f"| {method} | {len(done)} | {signed(result.worst)} | {', '.join(result.medians_short) or 'none'} "
            f"| {result.short} of {result.count} | {default.short} of {default.count} |"
        )


def adam_main(folders: list[str], seeds: tuple[int, ...] = (0, 1, 2, 3)) -> None:
    """The Adam-scaled mode (every η0 is the same run, so η0 = 1e-3 stands for the grid): ``bb[adam]`` from
    preconditioner_runs/ against ``bb[lookahead-adam]``, per seed; gaps to the best tuned reference of seeds 0, 1."""
    references = load_runs(RUNS)
    runs = dict(load_runs(HERE.parent / "preconditioner_runs"))
    for folder in folders:
        runs.update(load_runs(Path(folder)))
    methods = ("bb[adam]", "bb[lookahead-adam]")
    print("| setting | best tuned reference | " + " | ".join(f"{m}: gap per seed {seeds}" for m in methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    gaps: dict[str, list[float]] = {m: [] for m in methods}
    medians_short: dict[str, list[str]] = {m: [] for m in methods}
    for setting in SETTINGS:
        best = best_reference(references, setting, LRS, SEEDS)
        keys = {m: [(setting, m, 0.001, seed) for seed in seeds] for m in methods}
        if best is None or not all(k in runs for m in methods for k in keys[m]):
            continue
        cells = []
        for m in methods:
            values = [score(runs[k]) - best.mean for k in keys[m]]
            gaps[m] += values
            if statistics.median(values) < -1:
                medians_short[m].append(setting)
            cells.append(", ".join(signed(v) for v in values))
        print(f"| {setting} | {best.method} @ {best.lr}: {best.mean:.2f} | " + " | ".join(cells) + " |")
    print()
    print("| method | runs | worst | runs > 3 short | runs > 2 short | settings with a median < -1 |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        values = gaps[m]
        print(
            f"| {m} | {len(values)} | {signed(min(values))} | {sum(v < -3 for v in values)} "
            f"| {sum(v < -2 for v in values)} | {', '.join(medians_short[m]) or 'none'} |"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--adam"]:
        adam_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
