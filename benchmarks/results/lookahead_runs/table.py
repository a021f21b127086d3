"""The tables of 2026-12-05_cpu_lookahead_estimate.md: the look-ahead estimate (``lookahead.py`` next to this
script, runs ``bb[lookahead]``) against BB's default and the best tuned reference of every setting:
``python benchmarks/results/lookahead_runs/table.py FOLDER [FOLDER ...]``; with ``--adam`` first, the Adam-scaled
mode with and without it (``bb[adam]`` of preconditioner_runs/, ``bb[lookahead-adam]``), per seed."""

from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(RESULTS))

from prototypes import RUNS, adam_seeds, load, side_by_side  # noqa: E402


def main(argv: list[str]) -> None:
    adam = argv[:1] == ["--adam"]
    references, runs = load(argv[1:] if adam else argv, base=(RESULTS / "preconditioner_runs",) if adam else (RUNS,))
    if adam:
        adam_seeds(references, runs, ["bb[adam]", "bb[lookahead-adam]"])
    else:
        side_by_side(references, runs, ["bb", "bb[lookahead]"])


if __name__ == "__main__":
    main(sys.argv[1:])
