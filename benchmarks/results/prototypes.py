"""Running a prototype of BB's rate control on the robustness suite, and its tables beside BB's default and the best
tuned reference of every setting: what the prototype result scripts (``*_runs/``) share.

- :func:`train_runs`: train and save the runs of one method (the prototype patched in by the caller), as the suite
  saves them; saved runs are skipped.
- :func:`side_by_side`: per setting, each method's worst / median gap / runs more than 3 points short over every η0
  and seeds 0 and 1, then the issue's checks for each prototype method on the settings where it has every run.
- :func:`prototype_main`: a prototype script's command line: train its runs, or print its table.
- :func:`adam_seeds`: the Adam-scaled mode, where every η0 is the same run (η0 = 1e-3 stands for the grid), its gap
  per seed for each method.
- :func:`adam_grid`: the Adam-scaled mode's η0 = 1e-3 runs of a folder, each standing for every η0 of the grid.
- :func:`moved_runs`: the runs of an Adam-scaled mode whose score moved by a point or more from one method to another.
- :func:`paired_moves`: each run's score change against a baseline's run of the same setting, η0 and seed.
- :func:`print_moves`: runs paired with a baseline's, moved a point or more each way, by the settings' epoch lengths.
- :func:`print_setting_moves`: the same per setting and over all of them.
- :func:`suite_table`: a prototype's suite runs beside BB's default, the checks and the moves.
- :func:`train_outside`: train a prototype on the settings of ``ema_window_runs/outside.py``.
- :func:`rate_shift`: how one method's rates sit against another's on a setting, over paired runs.
"""

from __future__ import annotations

import collections
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "robustness"))

from report import best_reference, check, gap_stats, gaps, load_runs, score, signed, stats_cell  # noqa: E402
from suite import DEFAULT_LR, LRS, PEERS, RUNS, SEEDS, SETTINGS, Run, train  # noqa: E402

ADAM_LR = 0.001
EPOCH_LENGTHS = (("T <= 24", 24), ("25 <= T <= 64", 64), ("T > 64", None))  # steps an epoch


def train_runs(out: str | Path, settings: str, seeds: str, lrs: str, method: str, bb_kwargs: Any = None) -> None:
    """Train ``method`` on every comma-separated setting, seed and η0 (``default``: a peer at its defaults) into
    ``out``, one file a run."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for setting in settings.split(","):
        for seed in (int(s) for s in seeds.split(",")):
            for lr in (x if x == DEFAULT_LR else float(x) for x in lrs.split(",")):
                run = Run(setting, method, lr, seed)
                path = out / f"{run.name}.json"
                if path.exists():
                    continue
                record = train(run, bb_kwargs=bb_kwargs)
                path.write_text(json.dumps(record))
                print(setting, lr, seed, round(record["score"], 2), record["rolled_back_epochs"], flush=True)


def load(folders: Sequence[str | Path], base: Sequence[Path] = (RUNS,)) -> tuple[dict, dict]:
    """(the suite's records, those with every run file of ``base`` and ``folders`` added)."""
    references = load_runs(RUNS)
    runs = {}
    for folder in (*base, *folders):
        runs.update(load_runs(Path(folder)))
    return references, runs


def side_by_side(references: dict, runs: dict, methods: Sequence[str], seeds: Sequence[int] = SEEDS) -> None:
    """``methods[0]`` is the baseline (``bb``); the others are the prototypes compared with it, over ``seeds``. The
    issue's checks follow for the suite's own seeds only: they need the references' runs of the same seeds."""
    print("| setting | group | best tuned reference | " + " | ".join(methods) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for setting, spec in SETTINGS.items():
        best = best_reference(references, setting, LRS, SEEDS)
        if best is None:
            continue
        cells = [
            stats_cell(gap_stats(gaps(runs, setting, method, LRS, seeds, best.mean).values())) for method in methods
        ]
        if all(c == "·" for c in cells[1:]):
            continue
        group = "holdout" if spec.holdout else "dev"
        print(f"| {setting} | {group} | {best.method} @ {best.lr}: {best.mean:.2f} | " + " | ".join(cells) + " |")
    if tuple(seeds) != tuple(SEEDS):
        return
    print()
    print(f"| method | settings | worst | medians below -1 | runs > 3 short | `{methods[0]}` on the same settings |")
    print("|---|---|---|---|---|---|")
    for method in methods[1:]:
        done = tuple(s for s in SETTINGS if all((s, method, lr, seed) in runs for lr in LRS for seed in seeds))
        result = check(runs, method, "all", done, PEERS, LRS, seeds)
        baseline = check(runs, methods[0], "all", done, PEERS, LRS, seeds)
        print(
            f"| {method} | {len(done)} | {signed(result.worst)} | {', '.join(result.medians_short) or 'none'} "
            f"| {result.short} of {result.count} | {baseline.short} of {baseline.count} |"
        )


def adam_seeds(references: dict, runs: dict, methods: Sequence[str], seeds: Sequence[int] = (0, 1, 2, 3)) -> None:
    """Per setting where every method has every seed at η0 = 1e-3: each method's gap per seed; then per method the
    runs, the worst gap, the runs more than 3 and 2 points short and the settings whose median is below -1."""
    header = " | ".join(f"{m}: gap per seed {tuple(seeds)}" for m in methods)
    print(f"| setting | best tuned reference | {header} |")
    print("|---|---|" + "---|" * len(methods))
    found: dict[str, list[float]] = {m: [] for m in methods}
    medians_short: dict[str, list[str]] = {m: [] for m in methods}
    for setting in SETTINGS:
        best = best_reference(references, setting, LRS, SEEDS)
        keys = {m: [(setting, m, ADAM_LR, seed) for seed in seeds] for m in methods}
        if best is None or not all(k in runs for m in methods for k in keys[m]):
            continue
        cells = []
        for m in methods:
            values = [score(runs[k]) - best.mean for k in keys[m]]
            found[m] += values
            if statistics.median(values) < -1:
                medians_short[m].append(setting)
            cells.append(", ".join(signed(v) for v in values))
        print(f"| {setting} | {best.method} @ {best.lr}: {best.mean:.2f} | " + " | ".join(cells) + " |")
    print()
    print("| method | runs | worst | runs > 3 short | runs > 2 short | settings with a median < -1 |")
    print("|---|---|---|---|---|---|")
    for m in methods:
        values = found[m]
        print(
            f"| {m} | {len(values)} | {signed(min(values))} | {sum(v < -3 for v in values)} "
            f"| {sum(v < -2 for v in values)} | {', '.join(medians_short[m]) or 'none'} |"
        )


def prototype_main(argv: Sequence[str], method: str, runs: Path, install: Any) -> None:
    """``SCRIPT OUT_DIR SETTINGS SEEDS LRS``: ``install()`` the prototype, then train ``method``'s runs;
    ``SCRIPT table``: its runs in ``runs`` beside BB's default, and the checks."""
    if list(argv[1:2]) == ["table"]:
        side_by_side(*load([runs]), ["bb", method])
    else:
        install()
        train_runs(*argv[1:5], method)


def adam_grid(
    folder: Path, name: str = "bb[adam]", seeds: Sequence[int] | None = None, source: str = "bb[adam]"
) -> dict:
    """The ``source`` runs (an Adam-scaled mode) at η0 = 1e-3 in ``folder`` (of ``seeds``; None: every seed), each
    standing for every η0 of the grid (in that mode every η0 is the same run), keyed as method ``name``."""
    runs = {}
    for (setting, method, lr, seed), record in load_runs(folder).items():
        if method == source and lr == ADAM_LR and (seeds is None or seed in seeds):
            runs.update({(setting, name, grid_lr, seed): record for grid_lr in LRS})
    return runs


def sign_test(up: int, down: int) -> float:
    """Two-sided sign test of ``up`` runs against ``down``: how often a fair coin splits up + down runs at least this
    unevenly."""
    tail = sum(math.comb(up + down, k) for k in range(min(up, down) + 1)) / 2 ** (up + down)
    return min(1.0, 2 * tail)


def moved_line(label: str, moves: Sequence[float]) -> str:
    """``label`` over paired runs whose scores moved by ``moves``: how many moved a point or more each way, with the
    sign test, the mean and the median."""
    if not moves:
        return f"{label}: no paired runs"
    up, down = sum(m >= 1 for m in moves), sum(m <= -1 for m in moves)
    return (
        f"{label} over {len(moves)} paired runs: {up} up and {down} down by a point or more (sign test p = "
        f"{sign_test(up, down):.2f}), mean {statistics.mean(moves):+.2f}, median {statistics.median(moves):+.2f}"
    )


def moved_runs(runs: dict, before: str, after: str, seeds: Sequence[int] = SEEDS) -> list[str]:
    """``"SETTING seed S: BEFORE → AFTER"`` for every setting and seed whose η0 = 1e-3 run of method ``after`` scores a
    point or more away from that of ``before`` (both recorded)."""
    moved = []
    for setting in SETTINGS:
        for seed in seeds:
            keys = [(setting, method, ADAM_LR, seed) for method in (before, after)]
            if all(key in runs for key in keys):
                old, new = (score(runs[key]) for key in keys)
                if abs(new - old) >= 1:
                    moved.append(f"{setting} seed {seed}: {old:.2f} → {new:.2f}")
    return moved


def paired_runs(
    runs: dict, method: str, baseline: str, baseline_runs: dict | None = None
) -> list[tuple[tuple[str, float, int], dict, dict]]:
    """((setting, η0, seed), run, baseline's run) for every run of ``method`` in ``runs`` that ``baseline`` has a run
    of in ``baseline_runs`` (default: ``runs``), in the runs' sorted order."""
    baseline_runs = runs if baseline_runs is None else baseline_runs
    return [
        ((setting, lr, seed), record, baseline_runs[setting, baseline, lr, seed])
        for (setting, m, lr, seed), record in sorted(runs.items())
        if m == method and (setting, baseline, lr, seed) in baseline_runs
    ]


def paired_moves(runs: dict, method: str, baseline: str, baseline_runs: dict | None = None) -> list[tuple[str, float]]:
    """(setting, score change) of every run of ``method`` in ``runs`` against ``baseline``'s run of the same setting,
    η0 and seed in ``baseline_runs`` (default: ``runs``), in the runs' sorted order."""
    return [
        (setting, score(record) - score(before))
        for (setting, _, _), record, before in paired_runs(runs, method, baseline, baseline_runs)
    ]


def print_moves(runs: dict, methods: Sequence[str], baseline: str = "bb") -> None:
    """Per method: its runs paired with ``baseline``'s (same setting, η0, seed), moved a point or more each way; then
    the same by the settings' epoch lengths."""
    for method in methods:
        moves = collections.defaultdict(list)
        for setting, move in paired_moves(runs, method, baseline):
            steps = SETTINGS[setting].steps_per_epoch()
            moves[next(name for name, top in EPOCH_LENGTHS if top is None or steps <= top)].append(move)
        every = [move for length_moves in moves.values() for move in length_moves]
        lengths = [(f"- `{method}` against `{baseline}`", every)]
        lengths += [(f"  - {name}", moves[name]) for name, _ in EPOCH_LENGTHS if moves[name]]
        for label, values in lengths:
            print(moved_line(label, values))


def print_setting_moves(runs: dict, method: str, baseline_runs: dict, baseline: str) -> None:
    """``method``'s runs in ``runs`` paired with ``baseline``'s in ``baseline_runs`` (same setting, η0, seed): per
    setting and over all of them, how many moved a point or more each way."""
    moves = collections.defaultdict(list)
    for setting, move in paired_moves(runs, method, baseline, baseline_runs):
        moves[setting].append(move)
    every = [move for setting_moves in moves.values() for move in setting_moves]
    for setting, setting_moves in [*moves.items(), ("all", every)]:
        print(moved_line(f"- {setting}: `{method}` against `{baseline}`", setting_moves))


def suite_table(folder: Path, method: str) -> None:
    """``method``'s suite runs in ``folder`` beside BB's default: :func:`side_by_side`, then :func:`print_moves`."""
    references, runs = load([folder])
    side_by_side(references, runs, ["bb", method])
    print()
    print_moves(runs, [method], baseline="bb")


def train_outside(out: Path, seeds: str, settings: str | None, method: str) -> None:
    """Train ``method`` (the prototype installed by the caller) on the settings of ``ema_window_runs/outside.py``
    (``settings``: comma-separated names; None: all four), every η0, into ``out``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "ema_window_runs"))
    from outside import OUTSIDE  # imported here: outside.py imports this module

    SETTINGS.update({setting.name: setting for setting in OUTSIDE})
    names = settings or ",".join(setting.name for setting in OUTSIDE)
    train_runs(out, names, seeds, ",".join(str(lr) for lr in LRS), method)


def rate_shift(runs: dict, setting: str, method: str, baseline: str) -> tuple[float, int] | None:
    """``method``'s rates over ``baseline``'s on ``setting``: per pair of runs (same η0 and seed) the mean over epochs
    2 on of log10 of the ratio of their rates, and the median over the pairs as a ratio; with the number of pairs
    (None: no pair)."""
    shifts = []
    for (name, m, lr, seed), record in runs.items():
        if name != setting or m != method or (name, baseline, lr, seed) not in runs:
            continue
        after, before = record["bb_lr_history"], runs[name, baseline, lr, seed]["bb_lr_history"]
        logs = [math.log10(a / b) for a, b in zip(after[2:], before[2:]) if a > 0 and b > 0]
        if logs:
            shifts.append(statistics.mean(logs))
    return (10 ** statistics.median(shifts), len(shifts)) if shifts else None
