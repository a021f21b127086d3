"""The summary tables of 2026-12-05_cpu_preconditioned_prototype.md, from the run files next to this script and the
suite's records (references, BB's default): ``python benchmarks/results/preconditioned_prototype_runs/table.py``.
Run files, scores, the best tuned reference and the gap arithmetic are the robustness report's."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "robustness"))

from report import Key, best_reference, gap_stats, load_runs, score, signed  # noqa: E402
from suite import DEFAULT_LR, LRS, RUNS, SEEDS, SETTINGS  # noqa: E402

# Each variant's folder and its method name in the run files.
FIRST = ("pre", "bb[pre]")  # η0 as given, growth 2: the whole η0 grid
# Growth 1.25 at η0 = 1e-3 ("g125"), and at every η0 on two settings and ResNet-18 seed 0 ("g125s"): with the start
# clamp, every η0 is the same run.
KEPT = (("g125", "bb[g125]"), ("g125s", "bb[g125s]"))
SLOW_SEARCH = (("s2", "bb[s2]"),)
NO_STUCK = (("s2ns", "bb[s2ns]"),)
RAMP = (("ramp", "bb[ramp]"),)
GROWTH = 1.25


def stats(gaps: list[float]) -> str:
    """Worst / median / runs more than 3 short (runs)."""
    summary = gap_stats(gaps)
    if summary.count == 0:
        return "·"
    return f"{signed(summary.worst)} / {signed(summary.median)} / {summary.short} ({summary.count})"


def method_gaps(runs: dict[Key, dict], setting: str, method: str, reference: float) -> dict[Key, float]:
    return {key: score(record) - reference for key, record in runs.items() if key[:2] == (setting, method)}


def seeds_cell(setting: str, reference: float, folders: tuple[tuple[str, str], ...]) -> str:
    """A variant started at η0 = 1e-3 (every η0 is the same run): "seed 0 / seed 1 (seeds 2-5)"."""
    gaps: dict[int, float] = {}
    for folder, method in folders:
        for key, gap in method_gaps(load_runs(HERE / folder), setting, method, reference).items():
            gaps.setdefault(key[3], gap)
    cell = " / ".join(signed(gaps[s]) for s in SEEDS if s in gaps) or "·"
    extra = [signed(gaps[s]) for s in sorted(gaps) if s not in SEEDS]
    return cell + (f" ({', '.join(extra)})" if extra else "")


def pair(references: dict[Key, dict], setting: str, reference: float, method: str, lr: object) -> str:
    """A reference method's gap at ``lr`` for the suite's seeds."""
    keys = [(setting, method, lr, seed) for seed in SEEDS]
    return " / ".join(signed(score(references[key]) - reference) for key in keys if key in references) or "·"


def rate_moves(folder: str) -> dict[str, int]:
    """How each epoch's rate followed the last one in the first half of a run (before the end phase): grown by the
    growth limit, kept, grown by less, or lowered, over every run in ``folder``."""
    counts = {"grown by the limit": 0, "kept": 0, "grown by less": 0, "lowered": 0}
    for record in load_runs(HERE / folder).values():
        rates, epochs = record["bb_lr_history"], record["epochs"]
        for k in range(1, max(1, epochs // 2)):
            ratio = rates[k] / rates[k - 1]
            if abs(ratio - GROWTH) < 1e-3:
                counts["grown by the limit"] += 1
            elif abs(ratio - 1.0) < 1e-6:
                counts["kept"] += 1
            else:
                counts["grown by less" if ratio > 1.0 else "lowered"] += 1
    return counts


def main() -> None:
    references = load_runs(RUNS)
    first = load_runs(HERE / FIRST[0])
    print(
        "| setting | group | best tuned reference | BB default, seeds 0, 1: worst / median / > 3 short (runs) "
        "| prototype, η0 as given | prototype, start ≤ 1e-3, growth 1.25: seed 0 / 1 (2-5) "
        "| the same, search x2: seed 0 / 1 (2-5) | and no stuck test | and no estimate (a ramp) "
        "| adamw-cosine @ 1e-3 | prodigy-default |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for setting, spec in SETTINGS.items():
        best = best_reference(references, setting, LRS, SEEDS)
        if best is None:
            continue
        reference = best.mean
        today = list(method_gaps(references, setting, "bb", reference).values())
        first_gaps = list(method_gaps(first, setting, FIRST[1], reference).values())
        print(
            f"| {setting} | {'holdout' if spec.holdout else 'dev'} | {best.method} @ {best.lr}: {reference:.2f} "
            f"| {stats(today)} | {stats(first_gaps)} "
            f"| {seeds_cell(setting, reference, KEPT)} | {seeds_cell(setting, reference, SLOW_SEARCH)} "
            f"| {seeds_cell(setting, reference, NO_STUCK)} | {seeds_cell(setting, reference, RAMP)} "
            f"| {pair(references, setting, reference, 'adamw-cosine', 0.001)} "
            f"| {pair(references, setting, reference, 'prodigy-default', DEFAULT_LR)} |"
        )
    print()
    print("| variant | " + " | ".join(rate_moves("s2")) + " |")
    print("|---|---|---|---|---|")
    for folder in ("g125", "s2", "s2ns", "ramp"):
        print(f"| {folder} | " + " | ".join(str(n) for n in rate_moves(folder).values()) + " |")


if __name__ == "__main__":
    main()
