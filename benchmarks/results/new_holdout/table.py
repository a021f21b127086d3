"""The tables of 2026-12-05_cpu_new_holdout_settings.md: BB's default, the paper's BB, ``BB(preconditioner="adam")``
and the look-ahead estimate prototype on the settings added before any BB method ran on them, per group, against
their best tuned reference: ``python benchmarks/results/new_holdout/table.py``.

Runs: the suite's records (references, ``bb``, ``bb-paper``), ``preconditioner_runs/`` (``bb[adam]``, η0 = 1e-3
standing for the whole grid, seeds 0-5) and ``lookahead_runs/runs/`` (``bb[lookahead]``)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1] / "robustness"))

from prototypes import adam_grid  # noqa: E402
from report import best_reference, check, gap_stats, load_runs, score, signed, tuned  # noqa: E402
from suite import DEFAULT_REFERENCES, LRS, PEERS, RUNS, SEEDS  # noqa: E402

GROUPS = {
    "normalisation and dropout": ("gn-cnn", "resmlp-ln", "dropout-digits"),
    "long epochs": ("long-digits", "long-bn-cnn", "long-gn-cnn"),
}
ADAM, ADAM_LR, ADAM_SEEDS = "bb[adam]", 0.001, (0, 1, 2, 3, 4, 5)
METHODS = ("bb", "bb-paper", ADAM, "bb[lookahead]")


def load() -> dict:
    runs = load_runs(RUNS)
    runs.update(load_runs(HERE.parent / "lookahead_runs" / "runs"))
    runs.update(adam_grid(HERE.parent / "preconditioner_runs", ADAM))
    return runs


def main() -> None:
    runs = load()
    for group, settings in GROUPS.items():
        print(f"### {group}")
        print()
        group_tables(runs, settings)
        print()


def group_tables(runs: dict, settings: tuple[str, ...]) -> None:
    methods = [m for m in METHODS if any((s, m, lr, seed) in runs for s in settings for lr in LRS for seed in SEEDS)]
    print("| setting | best tuned reference | sgdm-cosine tuned | best at defaults | " + " | ".join(methods) + " |")
    print("|---|---|---|---|" + "---|" * len(methods))
    for setting in settings:
        best = best_reference(runs, setting, LRS, SEEDS)
        sgdm = tuned(runs, setting, "sgdm-cosine", LRS, SEEDS)
        defaults = max((tuned(runs, setting, m, LRS, SEEDS) for m in DEFAULT_REFERENCES), key=lambda t: t.mean)
        cells = []
        for method in methods:
            stats = gap_stats(
                score(runs[(setting, method, lr, seed)]) - best.mean if (setting, method, lr, seed) in runs else None
                for lr in LRS
                for seed in SEEDS
            )
            cells.append(f"{signed(stats.worst)} / {signed(stats.median)} / {stats.short}")
        print(
            f"| {setting} | {best.method} @ {best.lr}: {best.mean:.2f} | @ {sgdm.lr}: {signed(sgdm.mean - best.mean)} "
            f"| {defaults.method}: {signed(defaults.mean - best.mean)} | " + " | ".join(cells) + " |"
        )
    print()
    print("| method | worst | medians below -1 | runs > 3 short | the peer with the fewest | holds |")
    print("|---|---|---|---|---|---|")
    for method in methods:
        result = check(runs, method, "new", settings, PEERS, LRS, SEEDS)
        peer = "none" if result.fewest_peer is None else "{}: {} of {}".format(*result.fewest_peer)
        print(
            f"| {method} | {signed(result.worst)} | {', '.join(result.medians_short) or 'none'} "
            f"| {result.short} of {result.count} | {peer} | {'yes' if result.holds else 'no'} |"
        )
    print()
    print(f"`{ADAM}` per seed {ADAM_SEEDS} (gap, points):")
    print()
    for setting in settings:
        best = best_reference(runs, setting, LRS, SEEDS)
        gaps = [score(runs[(setting, ADAM, ADAM_LR, seed)]) - best.mean for seed in ADAM_SEEDS]
        print(f"- {setting}: " + ", ".join(signed(g) for g in gaps))


if __name__ == "__main__":
    main()
