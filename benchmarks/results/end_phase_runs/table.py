"""The tables of 2026-12-05_cpu_end_phase.md: the end-phase prototypes (``end_phase.py`` next to this script, runs
``bb[anneal-MODE]``) against BB's default and the best tuned reference of every setting:
``python benchmarks/results/end_phase_runs/table.py FOLDER [FOLDER ...]``; with ``--adam`` first, the Adam-scaled
mode (``bb[adam]`` of preconditioner_runs/ against ``bb[anneal-MODE-adam]``), per seed. A folder with BB's default's
runs of its own (``midpoint/``, trained beside its prototype on one CPU) is paired with them too: the runs that moved
by a point or more."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(RESULTS))

from prototypes import (  # noqa: E402
    RUNS,
    SEEDS,
    SETTINGS,
    adam_seeds,
    load_runs,
    moved_line,
    paired_moves,
    print_moves,
    side_by_side,
)

# The planned run lengths the end phase's factors differ most at, and the rest.
FEW_EPOCHS = 6


def print_moves_by_length_and_setting(runs: dict, method: str, baseline: str = "bb") -> None:
    """``method``'s runs paired with ``baseline``'s, moved a point or more each way: by the planned number of epochs
    (the midpoint end phase's factors differ from the shipped ones most in short runs), then per setting (the total
    is :func:`print_moves`' first line)."""
    few, many = [], []
    by_setting = collections.defaultdict(list)
    for setting, move in paired_moves(runs, method, baseline):
        (few if SETTINGS[setting].epochs <= FEW_EPOCHS else many).append(move)
        by_setting[setting].append(move)
    print(moved_line(f"  - runs of at most {FEW_EPOCHS} epochs", few))
    print(moved_line(f"  - runs of more than {FEW_EPOCHS} epochs", many))
    for setting, moves in by_setting.items():
        print(moved_line(f"- {setting}: `{method}` against `{baseline}`", moves))


def main(argv: list[str]) -> None:
    adam = argv[:1] == ["--adam"]
    folders = {folder: load_runs(Path(folder)) for folder in (argv[1:] if adam else argv)}
    references = load_runs(RUNS)
    runs = load_runs(RESULTS / "preconditioner_runs") if adam else dict(references)
    for own in folders.values():
        runs.update(own)
    prototypes = sorted({key[1] for key in runs if key[1].startswith("bb[anneal-") and ("adam" in key[1]) == adam})
    if adam:
        adam_seeds(references, runs, ["bb[adam]", *prototypes])
        return
    side_by_side(references, runs, ["bb", *prototypes])
    for folder, own in folders.items():
        if any(key[1] == "bb" for key in own):
            methods = sorted({key[1] for key in own if key[1] != "bb"})
            seeds = tuple(sorted({key[3] for key in own}))
            if seeds != tuple(SEEDS):
                print(f"\n{folder}, seeds {', '.join(map(str, seeds))}:\n")
                side_by_side(references, own, ["bb", *methods], seeds)
            print()
            for method in methods:
                print_moves(own, [method], baseline="bb")
                print_moves_by_length_and_setting(own, method)


if __name__ == "__main__":
    main(sys.argv[1:])
