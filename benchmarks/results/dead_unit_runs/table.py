"""The tables of 2026-12-05_cpu_dead_units.md: the dead-unit prototype (``dead_units.py`` next to this script, runs
``bb[dead0.5]``) against BB's default and the best tuned reference of every setting, from the run files here and
the suite's records: ``python benchmarks/results/dead_unit_runs/table.py``. Its "BB default" columns read the
suite's ``bb`` runs, which since the optimizer has the rule (``adopted.py``) are the default with it: run it at commit
5e45055 to reproduce the report."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "robustness"))

from report import best_reference, check, gap_stats, load_runs, score, signed  # noqa: E402
from suite import LRS, PEERS, RUNS, SEEDS, SETTINGS  # noqa: E402

METHOD = "bb[dead0.5]"
LOSS_METHOD = "bb[dead0.5-loss]"  # with the loss condition: loss_condition/, two settings
# Settings added to the suite before the prototype ran on them (the second pair: before the loss condition was
# tried, and so also before the prototype ran on them).
BEFORE_RULE = ("deep-relu-wide", "narrow-ae-mnist", "deep-relu-mnist-b32", "noisy-relu-digits")
PAIRED_SEEDS = (2, 3)


def cell(runs: dict, setting: str, method: str, best: float) -> str:
    stats = gap_stats(
        score(runs[(setting, method, lr, seed)]) - best if (setting, method, lr, seed) in runs else None
        for lr in LRS
        for seed in SEEDS
    )
    if stats.count == 0:
        return "·"
    rollbacks = sum(len(runs[(setting, method, lr, seed)]["rolled_back_epochs"]) for lr in LRS for seed in SEEDS
                    if (setting, method, lr, seed) in runs)  # fmt: skip
    missing = f", {stats.count} of {stats.expected} runs" if stats.count < stats.expected else ""
    return f"{signed(stats.worst)} / {signed(stats.median)} / {stats.short}{missing} ({rollbacks} rollbacks)"


def main() -> None:
    references = load_runs(RUNS)
    runs = {**references, **load_runs(HERE), **load_runs(HERE / "loss_condition")}
    print(
        "| setting | group | best tuned reference | BB default: worst / median / > 3 short | dead-unit rule: the same "
        "| with the loss condition |"
    )
    print("|---|---|---|---|---|---|")
    for setting, spec in SETTINGS.items():
        best = best_reference(references, setting, LRS, SEEDS)
        if best is None:
            continue
        group = "before the rule" if setting in BEFORE_RULE else "holdout" if spec.holdout else "dev"
        today, rule = cell(runs, setting, "bb", best.mean), cell(runs, setting, METHOD, best.mean)
        loss = cell(runs, setting, LOSS_METHOD, best.mean)
        print(f"| {setting} | {group} | {best.method} @ {best.lr}: {best.mean:.2f} | {today} | {rule} | {loss} |")
    print()
    print("The issue's checks over seeds 0 and 1 and η0 ∈ {1e-3 … 10} (the robustness report's `check`):")
    print()
    print("| method | settings | worst | medians below -1 | runs > 3 short | holds |")
    print("|---|---|---|---|---|---|")
    done = tuple(s for s in SETTINGS if all((s, METHOD, lr, seed) in runs for lr in LRS for seed in SEEDS))
    groups = {"all with the rule's runs": done, "chosen before the rule": BEFORE_RULE}
    for method in ("bb", METHOD):
        for group, settings in groups.items():
            result = check(runs, method, group, settings, PEERS, LRS, SEEDS)
            print(
                f"| {method} | {group} ({len(settings)}) | {signed(result.worst)} "
                f"| {', '.join(result.medians_short) or 'none'} | {result.short} of {result.count} "
                f"| {'yes' if result.holds else 'no'} |"
            )


def paired_seeds(references: dict) -> None:
    """BB's default and the rule on seeds 2 and 3 (seeds_2_3/), where the rule fired on seeds 0 and 1: the runs more
    than 3 points short of the best tuned reference (of seeds 0 and 1) and the median of the paired differences."""
    runs = load_runs(HERE / "seeds_2_3")
    print("| setting | BB default: runs > 3 short | dead-unit rule: runs > 3 short | rule − default, median (points) |")
    print("|---|---|---|---|")
    total = [0, 0, 0]
    for setting in SETTINGS:
        pairs = [
            (score(runs[(setting, "bb", lr, seed)]), score(runs[(setting, METHOD, lr, seed)]))
            for lr in LRS
            for seed in PAIRED_SEEDS
            if (setting, "bb", lr, seed) in runs and (setting, METHOD, lr, seed) in runs
        ]
        best = best_reference(references, setting, LRS, SEEDS)
        if not pairs or best is None:
            continue
        short = [sum(pair[i] - best.mean < -3 for pair in pairs) for i in (0, 1)]
        total = [total[0] + short[0], total[1] + short[1], total[2] + len(pairs)]
        difference = statistics.median(rule - default for default, rule in pairs)
        print(f"| {setting} | {short[0]} of {len(pairs)} | {short[1]} of {len(pairs)} | {signed(difference)} |")
    print(f"| all | {total[0]} of {total[2]} | {total[1]} of {total[2]} | |")


if __name__ == "__main__":
    main()
    print()
    print("Seeds 2 and 3 on the settings where the rule fired (paired runs):")
    print()
    paired_seeds(load_runs(RUNS))
