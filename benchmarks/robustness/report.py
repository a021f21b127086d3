"""The robustness suite's report: per setting, how far each run of BB (and of every peer) ends from the best tuned
reference, the user's alternative; BB's rates and rolled-back epochs; the issue's three checks for dev and holdout
settings; and a figure of the gaps. Missing runs are marked, so the report is useful mid-sweep.

    python benchmarks/robustness/report.py            # benchmarks/results/robustness.md and robustness.png
    python benchmarks/robustness/report.py --runs DIR --out FILE.md --methods 'bb,bb[mom]' --json FILE.json

The best tuned reference of a setting: over the reference methods, the best mean over the seeds at the method's
best η0 (a ``-default`` method has the one η0 "default"). A run's gap: its score minus that mean, in points (a
negative gap is a shortfall). Scores are test accuracy (%), or explained variance (%) for a regression setting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import (  # noqa: E402
    BB_METHODS,
    COLLAPSE_ACCURACY,
    DEFAULT_LR,
    DEFAULT_REFERENCES,
    LR,
    LRS,
    REFERENCES,
    RESULTS,
    RUNS,
    SEEDS,
    SETTINGS,
    is_bb,
    variant_of,
)

# The "done when": from every η0 and seed BB ends within 2 points of the best tuned reference, the median
# run within 1 point, and BB has fewer runs more than 3 points short than any peer.
WORST_GAP = -2.0
MEDIAN_GAP = -1.0
SHORT_GAP = -3.0
# The figure shows gaps down to this; lower ones are drawn on its edge as down-pointing triangles.
FIGURE_FLOOR = -10.0
# The learning-rate-free peers at their defaults whose step is SGD with momentum, as BB's default's is.
SGD_DEFAULT_PEERS = ("dadapt-sgd-default", "schedulefree-sgd-default")
# The tuned recipe that BB's SGD step replaces in the ResNet training it is for.
SGD_RECIPE = "sgdm-cosine"
# Every method of the suite whose step is SGD's (with or without momentum): BB's default and the paper's BB, and the
# references without a per-element scaling. The best of them, tuned per setting, bounds what an SGD-step default
# can reach.
SGD_STEP_METHODS = (
    "bb", "bb-paper", "sgdm", "sgdm-cosine", "dadapt-sgd", "schedulefree-sgd", *SGD_DEFAULT_PEERS,
)  # fmt: skip

Key = tuple[str, str, LR, int]  # (setting, method, η0, seed)


def load_runs(folder: Path) -> dict[Key, dict]:
    """Every run file of ``folder`` by (setting, method, η0, seed)."""
    runs = {}
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        run = record["run"]
        runs[(run["setting"], run["method"], run["lr"], run["seed"])] = record
    return runs


def score(record: dict | None) -> float | None:
    """A run's test score in % (higher is better); None for a missing run. Older records hold only the accuracy,
    None when the weights ended non-finite, which counts as 0."""
    if record is None:
        return None
    if "score" in record:
        return float(record["score"])
    return 0.0 if record["test_accuracy"] is None else 100.0 * record["test_accuracy"]


def lr_key(lr: LR) -> tuple[int, float]:
    """Sort order of η0: numbers ascending, then "default"."""
    return (1, 0.0) if isinstance(lr, str) else (0, float(lr))


def lr_label(lr: LR) -> str:
    return lr if isinstance(lr, str) else f"{lr:g}"


def method_lrs(
    method: str, lrs: Sequence[float], runs: dict[Key, dict] | None = None, setting: str | None = None
) -> list[LR]:
    """The η0 a method is run from: the grid, and any other η0 it has runs from on ``setting`` (an extra η0 of
    BB's counts; the references are not expected there); only "default" for a method at its defaults."""
    if method.endswith("-default"):
        return [DEFAULT_LR]
    extra = set()
    if runs is not None:
        extra = {key[2] for key in runs if key[0] == setting and key[1] == method and not isinstance(key[2], str)}
    return sorted(set(lrs) | extra)


def method_order(methods: Iterable[str]) -> list[str]:
    """BB's default, its variants (by name), the paper's BB, then the references in the suite's order."""
    methods = set(methods)
    variants = sorted(m for m in methods if variant_of(m) is not None)
    ordered = [m for m in ("bb", *variants, "bb-paper", *REFERENCES) if m in methods]
    return ordered + sorted(methods - set(ordered))


# ----------------------------------------------------------------------------------------------- arithmetic
@dataclass(frozen=True)
class Tuned:
    """A method's best η0 on a setting by the mean score over the seeds, that mean, and its seeds' scores."""

    method: str
    lr: LR
    mean: float
    scores: tuple[float, ...]


def tuned(runs: dict[Key, dict], setting: str, method: str, lrs: Sequence[float], seeds: Sequence[int]) -> Tuned | None:
    """The method tuned over η0 (only η0 where every seed ran count); None when no η0 has every seed."""
    best = None
    for lr in method_lrs(method, lrs, runs, setting):
        scores = [score(runs.get((setting, method, lr, seed))) for seed in seeds]
        if any(s is None for s in scores):
            continue
        mean = statistics.fmean(scores)
        if best is None or mean > best.mean:
            best = Tuned(method, lr, mean, tuple(scores))
    return best


def best_reference(
    runs: dict[Key, dict],
    setting: str,
    lrs: Sequence[float],
    seeds: Sequence[int],
    references: Sequence[str] = REFERENCES,
) -> Tuned | None:
    """The best of the reference methods, each tuned over η0; None while none has a complete η0."""
    candidates = [t for t in (tuned(runs, setting, m, lrs, seeds) for m in references) if t is not None]
    return max(candidates, key=lambda t: t.mean) if candidates else None


def gaps(
    runs: dict[Key, dict], setting: str, method: str, lrs: Sequence[float], seeds: Sequence[int], reference: float
) -> dict[tuple[LR, int], float | None]:
    """Every (η0, seed) run's score minus ``reference``, in points; None for a run not (yet) recorded."""
    result = {}
    for lr in method_lrs(method, lrs, runs, setting):
        for seed in seeds:
            value = score(runs.get((setting, method, lr, seed)))
            result[(lr, seed)] = None if value is None else value - reference
    return result


@dataclass(frozen=True)
class GapStats:
    """Over a method's recorded runs: the worst and median gap and how many are more than 3 points short."""

    worst: float | None
    median: float | None
    short: int
    count: int  # runs recorded
    expected: int  # runs of the grid

    @property
    def missing(self) -> int:
        return self.expected - self.count


def gap_stats(values: Iterable[float | None]) -> GapStats:
    values = list(values)
    present = [v for v in values if v is not None]
    return GapStats(
        worst=min(present) if present else None,
        median=statistics.median(present) if present else None,
        short=sum(v < SHORT_GAP for v in present),
        count=len(present),
        expected=len(values),
    )


@dataclass(frozen=True)
class Check:
    """The issue's three checks for one method over a group of settings."""

    method: str
    group: str
    worst: float | None  # the worst gap over the group's runs
    medians_short: list[str]  # settings whose median gap is below MEDIAN_GAP
    short: int
    count: int
    fewest_peer: tuple[str, int, int] | None  # (peer, short, count) with the smallest share of short runs
    missing: int  # runs of this method or of the references not recorded yet
    settings_run: int = 0  # settings where the method has a recorded run and a reference

    @property
    def worst_holds(self) -> bool:
        return self.worst is not None and self.worst >= WORST_GAP

    @property
    def median_holds(self) -> bool:
        return self.count > 0 and not self.medians_short

    @property
    def short_holds(self) -> bool:
        """Fewer short runs than every peer, as shares (a default peer has one run per seed, not one per η0);
        none short always holds."""
        if self.count == 0:
            return False
        if self.short == 0 or self.fewest_peer is None:
            return self.short == 0
        _, peer_short, peer_count = self.fewest_peer
        return self.short / self.count < peer_short / peer_count

    @property
    def holds(self) -> bool:
        return self.worst_holds and self.median_holds and self.short_holds


def check(
    runs: dict[Key, dict],
    method: str,
    group: str,
    settings: Sequence[str],
    peers: Sequence[str],
    lrs: Sequence[float],
    seeds: Sequence[int],
    references: Sequence[str] = REFERENCES,
) -> Check:
    """``method``'s checks over ``settings`` against the best tuned of ``references`` on each, and ``peers``'
    counts of runs more than 3 points short over the same settings."""
    worst, medians_short, short, count, missing, settings_run = None, [], 0, 0, 0, 0
    peer_counts: dict[str, list[int]] = {peer: [0, 0] for peer in peers}
    for setting in settings:
        reference = best_reference(runs, setting, lrs, seeds, references)
        missing += sum(
            (setting, m, lr, seed) not in runs for m in references for lr in method_lrs(m, lrs) for seed in seeds
        )
        if reference is None:
            missing += len(method_lrs(method, lrs, runs, setting)) * len(seeds)
            continue
        stats = gap_stats(gaps(runs, setting, method, lrs, seeds, reference.mean).values())
        missing += stats.missing
        if stats.count:
            settings_run += 1
            worst = stats.worst if worst is None else min(worst, stats.worst)
            if stats.median < MEDIAN_GAP:
                medians_short.append(setting)
        short += stats.short
        count += stats.count
        for peer in peers:
            peer_stats = gap_stats(gaps(runs, setting, peer, lrs, seeds, reference.mean).values())
            peer_counts[peer][0] += peer_stats.short
            peer_counts[peer][1] += peer_stats.count
    shares = [(peer, s, n) for peer, (s, n) in peer_counts.items() if n]
    fewest = min(shares, key=lambda t: t[1] / t[2]) if shares else None
    return Check(method, group, worst, medians_short, short, count, fewest, missing, settings_run)


# ----------------------------------------------------------------------------------------------- formatting
def signed(value: float | None) -> str:
    return "·" if value is None else f"{value:+.1f}"


def stats_cell(stats: GapStats) -> str:
    if stats.count == 0:
        return "·"
    text = f"{stats.worst:+.1f} / {stats.median:+.1f} / {stats.short}"
    return text + (f" ({stats.count}/{stats.expected})" if stats.missing else "")


def _conditions(runs: dict[Key, dict]) -> str:
    """The recorded conditions of the runs: torch, threads, runs at a time, CPU, load. Runs saved before the
    suite recorded the CPU and concurrency ran two at a time (the report of that time says so)."""
    records = list(runs.values())
    if not records:
        return "no runs yet."

    def counted(values: Iterable[Any]) -> str:
        counter = Counter(v for v in values if v is not None)
        if len(counter) == 1:
            return f"{next(iter(counter))}"
        return ", ".join(f"{value} ({n} runs)" for value, n in counter.most_common())

    older = sum(r.get("jobs") is None for r in records)
    recorded = [r for r in records if r.get("jobs") is not None]
    parts = [
        f"torch {counted(r.get('torch') for r in records)}",
        f"threads per run {counted(r.get('threads') for r in records)}",
    ]
    if recorded:
        loads = [r["load_average"][0] for r in recorded if r.get("load_average") and r["load_average"][0] is not None]
        parts.append(
            f"{len(recorded)} runs: {counted(r.get('jobs') for r in recorded)} at a time on "
            f"{counted(r.get('cpu') for r in recorded)} ({counted(r.get('cpu_count') for r in recorded)} cores)"
            + (f", 1-minute load average at a run's start median {statistics.median(loads):.1f}" if loads else "")
        )
    if older:
        parts.append(f"{older} older runs: 2 at a time on the same 2-core machine (not recorded in the run files)")
    return "; ".join(parts) + ". The machine is shared with other work: times are indicative."


def _seconds(record: dict) -> float:
    return record.get("seconds") or sum(record["epoch_seconds"])


def _constructor_note(runs: dict[Key, dict], method: str) -> str:
    """How ``method``'s BB runs were built: whether BB got epochs=, other arguments, the checkouts."""
    records = [r for (_, m, _, _), r in runs.items() if m == method]
    if not records:
        return ""
    built = [r.get("bb_constructor") for r in records]
    unknown = sum(b is None for b in built)
    with_epochs = sum(b is not None and "epochs" in b for b in built)
    others = Counter(
        json.dumps({k: v for k, v in sorted(b.items()) if k not in ("weight_decay", "epochs")})
        for b in built
        if b is not None
    )
    commits = Counter(r.get("bbfused_commit") or "not recorded" for r in records)
    parts = [f"`epochs=` given in {with_epochs} of {len(records)} runs"]
    if unknown:
        parts.append(f"{unknown} older runs record no constructor arguments")
    if others:
        parts.append("other arguments " + "; ".join(f"`{k}` ({n})" for k, n in others.most_common()))
    parts.append("checkout " + ", ".join(f"{c} ({n})" for c, n in commits.most_common()))
    return f"`{method}`: " + ", ".join(parts) + "."


def write_report(
    folder: Path,
    out: Path,
    figure: Path | None = None,
    methods: Sequence[str] | None = None,
    lrs: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    title: str = "Robustness suite: how far BB's default ends from what the user would otherwise have run",
    generator: str = "python benchmarks/robustness/report.py",
    trainer: str = "python benchmarks/robustness/suite.py",
) -> str:
    """Write the report of the runs in ``folder`` to ``out`` (and the gap figure to ``figure``); returns its text.
    ``methods``: the methods shown (default: every method with runs; the references always count for the best
    reference). ``lrs`` / ``seeds``: the grid (default: the suite's); a method's runs from another η0 count too.
    ``title``, ``generator`` and ``trainer`` (the commands that write the report and train its runs) head it."""
    runs = load_runs(folder)
    lrs = sorted(lrs if lrs is not None else LRS)
    seeds = sorted(seeds if seeds is not None else SEEDS)  # the references' seeds: a mean needs them all
    # The dev settings first, then the holdout ones (the settings a policy is not tuned on).
    settings = [s for s in SETTINGS if any(key[0] == s for key in runs)]
    settings = [s for s in settings if not SETTINGS[s].holdout] + [s for s in settings if SETTINGS[s].holdout]
    shown = method_order(methods if methods is not None else {key[1] for key in runs})
    bb_shown = [m for m in shown if is_bb(m)]
    peers_shown = [m for m in shown if not is_bb(m)]
    groups = {
        "dev": [s for s in settings if not SETTINGS[s].holdout],
        "holdout": [s for s in settings if SETTINGS[s].holdout],
    }
    references = {s: best_reference(runs, s, lrs, seeds) for s in settings}
    lines = [
        f"# {title}",
        "",
        f"Generated by `{generator}` from the {len(runs)} run files in `{folder.name}/` (`{trainer}` trains them). "
        "Scores: final test accuracy (%), or for a regression "
        "setting the test set's explained variance 100 (1 - MSE / Var) (%, 0 when worse than the mean image). "
        "The **best tuned reference** of a setting is the best, over the reference methods, of the mean over the "
        f"seeds ({', '.join(map(str, seeds))}) at the method's best η0; a run's **gap** is its score minus that, in "
        "points (negative: short of it). `·` marks a run not recorded yet.",
        "",
        f"Conditions: {_conditions(runs)}",
        "",
        "Methods: `bb` BB's default (given `epochs=` where BB takes it); `bb[NAME]` BB's default with a variant's "
        "constructor arguments; `bb-paper` the paper's BB (`safeguard=False`). References: `sgdm` / `adam` torch "
        "SGD (momentum 0.9) and Adam at a constant rate η0; `sgdm-cosine` / `adamw-cosine` the same (AdamW with "
        "torch's default decoupled weight decay 0.01) with cosine annealing over the run; `prodigy` / `dadapt-sgd` "
        "(momentum 0.9) with η0 as their initial estimate d0 and lr 1; `schedulefree-sgd` (momentum 0.9) with lr "
        "η0; `prodigy-default`, `dadapt-sgd-default` (momentum 0.9), `schedulefree-sgd-default` at their documented "
        "defaults (d0 1e-6, lr 1), without a schedule. Every method gets the setting's weight decay (but AdamW) and "
        "gradient clipping.",
        "",
    ]
    lines += _settings_table(runs, settings)
    lines += _reference_table(runs, settings, references, lrs, seeds)
    lines += _summary_tables(runs, settings, references, bb_shown, peers_shown, lrs, seeds)
    lines += _checks_section(runs, groups, bb_shown, lrs, seeds)
    lines += _defaults_section(runs, settings, bb_shown, lrs, seeds)
    lines += _sgd_recipe_section(runs, settings, references, bb_shown, lrs, seeds)
    lines += tuned_bound_section(runs, settings, references, shown, lrs, seeds)
    out.parent.mkdir(parents=True, exist_ok=True)
    if figure is not None and settings:
        figure.parent.mkdir(parents=True, exist_ok=True)
        _plot(runs, settings, references, shown, lrs, seeds, figure)
        lines += [f"![gap to the best tuned reference per setting, every run]({figure.name})", ""]
    for group, title in (("dev", "Dev settings"), ("holdout", "Holdout settings (not to be tuned on)")):
        if groups[group]:
            lines += [f"## {title}", ""]
        for setting in groups[group]:
            lines += _setting_section(runs, setting, references[setting], shown, bb_shown, lrs, seeds)
    lines += _recorded_section(runs, settings, shown, lrs, seeds)
    text = "\n".join(lines)
    out.write_text(text)
    return text


def _settings_table(runs: dict[Key, dict], settings: list[str]) -> list[str]:
    lines = [
        "## Settings",
        "",
        "| setting | group | model | training samples | batch | steps / epoch | epochs | weight decay | else | "
        "median s / run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in settings:
        s = SETTINGS[name]
        seconds = [_seconds(r) for (setting, *_), r in runs.items() if setting == name and not r.get("quick")]
        extra = []
        if s.label_noise:
            extra.append(f"{100 * s.label_noise:.0f} % labels random")
        if s.clip_grad_norm is not None:
            extra.append(f"clip norm {s.clip_grad_norm:g}")
        if s.task == "regress":
            extra.append("regression (explained variance)")
        median = f"{statistics.median(seconds):.0f}" if seconds else "·"
        lines.append(
            f"| {name} | {'holdout' if s.holdout else 'dev'} | {s.description} | {s.train_limit or 'all'} | "
            f"{s.batch_size} | {s.steps_per_epoch()} | {s.epochs} | {s.weight_decay:g} | {', '.join(extra) or '–'} | "
            f"{median} |"
        )
    return [*lines, ""]


def _reference_table(
    runs: dict[Key, dict], settings: list[str], references: dict[str, Tuned | None], lrs, seeds
) -> list[str]:
    lines = [
        "## The best tuned reference per setting",
        "",
        "The reference a run is measured against, with the best tuned SGD with momentum and cosine annealing and the "
        "best learning-rate-free method at its defaults for comparison (method @ η0: mean score; seeds' scores). "
        "*partial*: some reference runs are not recorded yet, so the reference may still rise.",
        "",
        "| setting | group | best tuned reference | sgdm-cosine tuned | best at defaults |",
        "|---|---|---|---|---|",
    ]

    def show(t: Tuned | None) -> str:
        if t is None:
            return "·"
        seeds_text = " / ".join(f"{v:.1f}" for v in t.scores)
        return f"{t.method} @ {lr_label(t.lr)}: **{t.mean:.2f}** ({seeds_text})"

    for setting in settings:
        missing = sum(
            (setting, m, lr, seed) not in runs for m in REFERENCES for lr in method_lrs(m, lrs) for seed in seeds
        )
        defaults = [tuned(runs, setting, m, lrs, seeds) for m in REFERENCES if m.endswith("-default")]
        defaults = [t for t in defaults if t is not None]
        best_default = max(defaults, key=lambda t: t.mean) if defaults else None
        partial = f" *partial ({missing} missing)*" if missing else ""
        lines.append(
            f"| {setting} | {'holdout' if SETTINGS[setting].holdout else 'dev'} | {show(references[setting])}{partial} "
            f"| {show(tuned(runs, setting, 'sgdm-cosine', lrs, seeds))} | {show(best_default)} |"
        )
    return [*lines, ""]


def _summary_tables(runs, settings, references, bb_shown, peers_shown, lrs, seeds) -> list[str]:
    lines = [
        "## Gaps per setting: worst / median / runs more than 3 points short",
        "",
        "Each cell over a method's runs on the setting (every η0 and seed; a default method: one run per seed): the "
        "worst gap, the median gap, the number of runs more than 3 points short; `(n/N)` when only n of its N runs "
        "are recorded.",
        "",
    ]
    for title, methods in (("BB", bb_shown), ("The references and other peers", peers_shown)):
        if not methods:
            continue
        lines += [
            f"**{title}**",
            "",
            "| setting | " + " | ".join(methods) + " |",
            "|---|" + "---|" * len(methods),
        ]
        for setting in settings:
            reference = references[setting]
            cells = []
            for method in methods:
                if reference is None:
                    cells.append("·")
                    continue
                cells.append(stats_cell(gap_stats(gaps(runs, setting, method, lrs, seeds, reference.mean).values())))
            holdout = " (holdout)" if SETTINGS[setting].holdout else ""
            lines.append(f"| {setting}{holdout} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _checks_section(runs, groups: dict[str, list[str]], bb_shown: list[str], lrs, seeds) -> list[str]:
    lines = [
        "## The issue's checks",
        "",
        f"Per BB method and group of settings: (1) every run's gap ≥ {WORST_GAP:g}; (2) on every setting the median "
        f"gap ≥ {MEDIAN_GAP:g}; (3) a smaller share of runs more than {-SHORT_GAP:g} points short than every peer "
        "(the references, whose default methods have one run per seed; none short always holds). The holdout "
        "settings are not to be tuned on.",
        "",
        "| method | group | (1) worst gap | (2) settings with median < "
        f"{MEDIAN_GAP:g} | (3) runs > {-SHORT_GAP:g} short | peer with fewest | holds |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in bb_shown:
        for group, settings in groups.items():
            if not settings:
                continue
            c = check(runs, method, group, settings, REFERENCES, lrs, seeds)
            if c.count == 0:
                lines.append(f"| {method} | {group} | · | · | · | · | no runs |")
                continue
            peer = f"{c.fewest_peer[0]}: {c.fewest_peer[1]}/{c.fewest_peer[2]}" if c.fewest_peer else "·"
            verdict = "yes" if c.holds else "no"
            if c.missing:
                verdict += f" (incomplete: {c.missing} runs missing)"
            lines.append(
                f"| {method} | {group} | {signed(c.worst)} {'✓' if c.worst_holds else '✗'} | "
                f"{', '.join(c.medians_short) or 'none'} {'✓' if c.median_holds else '✗'} | "
                f"{c.short}/{c.count} {'✓' if c.short_holds else '✗'} | {peer} | {verdict} |"
            )
    return [*lines, ""]


def _defaults_section(runs, settings: list[str], bb_shown: list[str], lrs, seeds) -> list[str]:
    """Each BB method against what a user who tunes nothing would otherwise run: the learning-rate-free peers at their
    documented defaults."""
    against = (("any", DEFAULT_REFERENCES), ("SGD-type", SGD_DEFAULT_PEERS))
    lines = [
        "## Against the learning-rate-free peers at their defaults",
        "",
        "The user who tunes nothing. Per setting, each BB method's runs (every η0 and seed) against the best peer at "
        f"its documented defaults (the mean over the seeds), of any kind ({', '.join(DEFAULT_REFERENCES)}) and of "
        f"those whose step is SGD with momentum, as BB's default's is ({', '.join(SGD_DEFAULT_PEERS)}). Cells: worst / "
        f"median gap / runs more than {-SHORT_GAP:g} points short.",
        "",
        "| setting | best peer at defaults | "
        + " | ".join(bb_shown)
        + " | best SGD-type peer at defaults | "
        + " | ".join(bb_shown)
        + " |",
        "|---|---|" + "---|" * len(bb_shown) + "---|" + "---|" * len(bb_shown),
    ]
    for setting in settings:
        cells = []
        for _, peers in against:
            best = best_reference(runs, setting, lrs, seeds, peers)
            if best is None:
                cells += ["·"] * (1 + len(bb_shown))
                continue
            cells.append(f"{best.method}: {best.mean:.2f}")
            cells += [stats_cell(gap_stats(gaps(runs, setting, m, lrs, seeds, best.mean).values())) for m in bb_shown]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"| method | against | settings with a median ≥ {MEDIAN_GAP:g} | runs > {-SHORT_GAP:g} short |",
        "|---|---|---|---|",
    ]
    for method in bb_shown:
        for kind, peers in against:
            result = check(runs, method, kind, settings, (), lrs, seeds, peers)
            if result.settings_run:
                good = result.settings_run - len(result.medians_short)
                lines.append(
                    f"| {method} | {kind} | {good} of {result.settings_run} | {result.short} of {result.count} |"
                )
    return [*lines, ""]


def _sgd_recipe_section(runs, settings: list[str], references, bb_shown: list[str], lrs, seeds) -> list[str]:
    """Each BB method against the one recipe BB's SGD step replaces, tuned SGD with momentum and cosine annealing,
    and how far that recipe itself is from the best tuned reference: where it is far, matching the recipe does not
    pass the issue's check."""
    lines = [
        "## Against tuned SGD with momentum and cosine annealing",
        "",
        f"The recipe BB's SGD step replaces. Per setting, `{SGD_RECIPE}` at its best η0 (the mean over the seeds), "
        "how far it is itself from the best tuned reference, and each BB method's runs (every η0 and seed) against "
        f"it. Cells: worst / median gap / runs more than {-SHORT_GAP:g} points short.",
        "",
        f"| setting | {SGD_RECIPE} tuned | its gap to the best tuned reference | " + " | ".join(bb_shown) + " |",
        "|---|---|---|" + "---|" * len(bb_shown),
    ]
    behind = []  # the settings where the recipe itself is short of the best tuned reference
    for setting in settings:
        recipe, best = tuned(runs, setting, SGD_RECIPE, lrs, seeds), references[setting]
        if recipe is None or best is None:
            lines.append(f"| {setting} | · | · | " + " | ".join("·" for _ in bb_shown) + " |")
            continue
        if recipe.mean - best.mean < SHORT_GAP:
            behind.append(setting)
        cells = [stats_cell(gap_stats(gaps(runs, setting, m, lrs, seeds, recipe.mean).values())) for m in bb_shown]
        lines.append(
            f"| {setting} | @ {lr_label(recipe.lr)}: {recipe.mean:.2f} | {signed(recipe.mean - best.mean)} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        f"Settings where the tuned recipe itself ends more than {-SHORT_GAP:g} points short of the best tuned "
        f"reference: {', '.join(behind) or 'none'}.",
        "",
        f"| method | settings with a median ≥ {MEDIAN_GAP:g} | runs > {-SHORT_GAP:g} short "
        "| of them on the settings above |",
        "|---|---|---|---|",
    ]
    for method in bb_shown:
        result = check(runs, method, "all", settings, (), lrs, seeds, (SGD_RECIPE,))
        on_behind = check(runs, method, "behind", behind, (), lrs, seeds, (SGD_RECIPE,))
        if result.settings_run:
            good = result.settings_run - len(result.medians_short)
            lines.append(
                f"| {method} | {good} of {result.settings_run} | {result.short} of {result.count} | {on_behind.short} |"
            )
    return [*lines, ""]


def tuned_bound_section(
    runs: dict[Key, dict],
    settings: list[str],
    references: dict[str, Tuned | None],
    shown: list[str],
    lrs: Sequence[float],
    seeds: Sequence[int],
) -> list[str]:
    """The issue's first two checks for each method tuned per setting with hindsight (its best η0 by the mean over
    the seeds), for the winning method itself and for BB's methods untuned: how far the bound is from what tuning
    reaches."""
    lines = [
        "## The first two checks for a tuned method",
        "",
        "Each method at its best η0 on each setting (the mean over the seeds, chosen with hindsight; a `-default` "
        "method at its defaults; BB's methods too), its seeds' gaps to the best tuned reference: on how many "
        f"settings a seed ends more than {-WORST_GAP:g} points short (check 1 fails there) and the seeds' median is "
        f"below {MEDIAN_GAP:g} (check 2). The first row is the best tuned reference itself, the winning method "
        "at its η0 on each setting: its mean is the bar, so only the spread between its seeds is left. The second "
        f"is the best SGD step on each setting: the best of {', '.join(f'`{m}`' for m in SGD_STEP_METHODS)}, each at "
        "its best η0, chosen with hindsight twice over. Where it fails, none of the suite's SGD-step methods meets "
        "the checks even tuned, and a default with SGD's step would have to beat all of them there, untuned. The "
        "last rows are the checks as the issue asks them of BB: every η0 and seed, untuned.",
        "",
        f"| method | settings | a run > {-WORST_GAP:g} short | median < {MEDIAN_GAP:g} | both checks hold | "
        "worst run |",
        "|---|---|---|---|---|---|",
    ]

    def seed_gaps(found: Tuned | None, best: Tuned) -> list[float]:
        return [] if found is None else [value - best.mean for value in found.scores]

    def every_run_gaps(method: str, setting: str, best: Tuned) -> list[float]:
        return [gap for gap in gaps(runs, setting, method, lrs, seeds, best.mean).values() if gap is not None]

    def best_sgd_step_gaps(setting: str, best: Tuned) -> list[float]:
        return seed_gaps(best_reference(runs, setting, lrs, seeds, SGD_STEP_METHODS), best)

    rows = [
        ("the best tuned reference", lambda setting, best: seed_gaps(best, best)),
        ("the best SGD step, tuned", best_sgd_step_gaps),
    ]
    rows += [
        (
            f"`{m}`" if m.endswith("-default") else f"`{m}`, tuned",
            lambda setting, best, m=m: seed_gaps(tuned(runs, setting, m, lrs, seeds), best),
        )
        for m in shown
    ]
    rows += [
        (f"`{m}`, every η0", lambda setting, best, m=m: every_run_gaps(m, setting, best)) for m in shown if is_bb(m)
    ]
    beyond_sgd = []
    for label, gaps_of in rows:
        worst, seed_short, median_short, both, count = None, 0, 0, 0, 0
        for setting in settings:
            best = references[setting]
            stats = gap_stats(gaps_of(setting, best)) if best is not None else None
            if stats is None or not stats.count:
                continue
            count += 1
            worst = stats.worst if worst is None else min(worst, stats.worst)
            fails_worst = stats.worst < WORST_GAP
            fails_median = stats.median < MEDIAN_GAP
            seed_short += fails_worst
            median_short += fails_median
            both += not (fails_worst or fails_median)
            if gaps_of is best_sgd_step_gaps and (fails_worst or fails_median):
                beyond_sgd.append(setting)
        if count:
            lines.append(f"| {label} | {count} | {seed_short} | {median_short} | {both} | {signed(worst)} |")
    if beyond_sgd:
        lines += ["", f"Where no SGD step meets both checks, even tuned: {', '.join(beyond_sgd)}."]
    return [*lines, ""]


def _setting_section(runs, setting: str, reference: Tuned | None, shown, bb_shown, lrs, seeds) -> list[str]:
    spec = SETTINGS[setting]
    lines = [
        f"### {setting}{' (holdout)' if spec.holdout else ''}: {spec.description}",
        "",
        f"{spec.train_limit or 'all'} training samples, batch {spec.batch_size} ({spec.steps_per_epoch()} steps an "
        f"epoch), {spec.epochs} epochs, weight decay {spec.weight_decay:g}"
        + (f", {100 * spec.label_noise:.0f} % of training labels random" if spec.label_noise else "")
        + (f", gradients clipped to norm {spec.clip_grad_norm:g}" if spec.clip_grad_norm is not None else "")
        + (", score: explained variance (%)" if spec.task == "regress" else ", score: accuracy (%)")
        + ".",
        "",
    ]
    if reference is None:
        return [*lines, "No reference method has every seed of an η0 yet: no gaps.", ""]
    lines += [
        f"Best tuned reference: **{reference.method} @ η0 = {lr_label(reference.lr)}: {reference.mean:.2f}**. "
        f"Cells: the gap per seed ({', '.join(map(str, seeds))}).",
        "",
    ]
    columns = sorted({lr for m in shown for lr in method_lrs(m, lrs, runs, setting)}, key=lr_key)
    header = "| method | " + " | ".join(f"η0 = {lr_label(lr)}" for lr in columns)
    lines += [
        header + " | worst | median | > 3 short | tuned: η0, mean | s / run |",
        "|---|" + "---|" * (len(columns) + 5),
    ]
    score_lines = []
    for method in shown:
        own = method_lrs(method, lrs, runs, setting)
        method_gaps = gaps(runs, setting, method, lrs, seeds, reference.mean)
        cells, score_cells = [], []
        for lr in columns:
            if lr not in own:
                cells.append("")
                score_cells.append("")
                continue
            cells.append(" / ".join(signed(method_gaps[(lr, seed)]) for seed in seeds))
            values = [score(runs.get((setting, method, lr, seed))) for seed in seeds]
            score_cells.append(" / ".join("·" if v is None else f"{v:.1f}" for v in values))
        stats = gap_stats(method_gaps.values())
        best = tuned(runs, setting, method, lrs, seeds)
        seconds = [_seconds(r) for (s, m, _, _), r in runs.items() if s == setting and m == method]
        count = f" ({stats.count}/{stats.expected})" if stats.missing else ""
        lines.append(
            f"| {method} | " + " | ".join(cells) + f" | {signed(stats.worst)} | {signed(stats.median)} | "
            f"{stats.short}{count} | {f'{lr_label(best.lr)}, {best.mean:.1f}' if best else '·'} | "
            f"{f'{statistics.median(seconds):.0f}' if seconds else '·'} |"
        )
        score_lines.append(f"| {method} | " + " | ".join(score_cells) + " |")
    lines += [
        "",
        "<details><summary>Scores (%) per seed</summary>",
        "",
        "| method | " + " | ".join(f"η0 = {lr_label(lr)}" for lr in columns) + " |",
        "|---|" + "---|" * len(columns),
        *score_lines,
        "",
        "</details>",
        "",
    ]
    for method in bb_shown:
        if method == "bb-paper":
            continue  # the paper's BB has no rate control; its rates are not the question
        rows = []
        for lr in method_lrs(method, lrs, runs, setting):
            for seed in seeds:
                record = runs.get((setting, method, lr, seed))
                if record is None:
                    continue
                rates = ", ".join(f"{r:.3g}" for r in record["bb_lr_history"])
                rolled = ", ".join(map(str, record["rolled_back_epochs"])) or "none"
                rows.append(f"| {lr:g} | {seed} | {signed(score(record) - reference.mean)} | {rates} | {rolled} |")
        if rows:
            lines += [
                f"`{method}`: the rate each epoch used and the epochs it rolled back.",
                "",
                "| η0 | seed | gap | rates | rolled back |",
                "|---|---|---|---|---|",
                *rows,
                "",
            ]
    return lines


def _recorded_section(runs, settings, shown, lrs, seeds) -> list[str]:
    lines = [
        "## Runs recorded",
        "",
        "Per method and setting, runs recorded of the grid's (the suite resumes where it stopped); collapsed: runs "
        f"ending below {100 * COLLAPSE_ACCURACY:.0f} % (non-finite weights count as 0).",
        "",
        "| method | " + " | ".join(settings) + " | collapsed |",
        "|---|" + "---|" * (len(settings) + 1),
    ]
    for method in shown:
        cells, collapsed, total = [], 0, 0
        for setting in settings:
            keys = [(setting, method, lr, seed) for lr in method_lrs(method, lrs, runs, setting) for seed in seeds]
            present = [runs[k] for k in keys if k in runs]
            collapsed += sum(score(r) < 100 * COLLAPSE_ACCURACY for r in present)
            total += len(present)
            cells.append(str(len(present)) if len(present) == len(keys) else f"{len(present)}/{len(keys)}")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {collapsed}/{total} |")
    lines.append("")
    notes = [_constructor_note(runs, m) for m in shown if is_bb(m) and m not in BB_METHODS[1:]]
    notes = [n for n in notes if n]
    if notes:
        lines += ["How BB's runs were built:", "", *[f"- {n}" for n in notes], ""]
    return lines


def _plot(runs, settings, references, shown, lrs, seeds, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    columns = min(4, len(settings))
    rows = -(-len(settings) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 4.2 * rows), squeeze=False, layout="constrained")
    norm = colors.LogNorm(vmin=min(lrs), vmax=max(lrs)) if lrs else None
    colormap = matplotlib.colormaps["viridis"]
    for index, setting in enumerate(settings):
        axis = axes[index // columns][index % columns]
        reference = references[setting]
        axis.set_title(
            f"{setting}{' (holdout)' if SETTINGS[setting].holdout else ''}"
            + (f"\nref {reference.method} @ {lr_label(reference.lr)}: {reference.mean:.1f}" if reference else ""),
            fontsize=8,
        )
        for level, style in ((0.0, "-"), (MEDIAN_GAP, "--"), (WORST_GAP, "--"), (SHORT_GAP, ":")):
            axis.axhline(level, color="gray", linestyle=style, linewidth=0.8)
        for position, method in enumerate(shown):
            if is_bb(method):
                axis.axvspan(position - 0.45, position + 0.45, color="#f3e6c8", zorder=0)
            if reference is None:
                continue
            own = method_lrs(method, lrs, runs, setting)
            for (lr, seed), gap in gaps(runs, setting, method, lrs, seeds, reference.mean).items():
                if gap is None:
                    continue
                offset = (own.index(lr) - (len(own) - 1) / 2) * 0.13 + (seed - 0.5) * 0.05
                color = "black" if isinstance(lr, str) else colormap(norm(lr))
                below = gap < FIGURE_FLOOR
                axis.scatter(
                    position + offset,
                    max(gap, FIGURE_FLOOR),
                    s=14,
                    marker="v" if below else "o",
                    color=color,
                    edgecolors="none",
                    zorder=3,
                )
        axis.set_xticks(range(len(shown)))
        axis.set_xticklabels(shown, rotation=70, fontsize=6.5)
        axis.set_ylim(FIGURE_FLOOR - 0.8, 3.5)
        axis.set_xlim(-0.6, len(shown) - 0.4)
        axis.set_ylabel("gap (points)", fontsize=7)
        axis.tick_params(axis="y", labelsize=7)
        axis.grid(axis="y", alpha=0.25)
    for index in range(len(settings), rows * columns):
        axes[index // columns][index % columns].axis("off")
    if norm is not None:
        mappable = cm.ScalarMappable(norm=norm, cmap=colormap)
        bar = figure.colorbar(mappable, ax=axes, fraction=0.015, pad=0.005)
        bar.set_label("η0 (black: a method's defaults)", fontsize=8)
    figure.suptitle(
        f"Gap to the best tuned reference, every (η0, seed); lines at 0, {MEDIAN_GAP:g}, {WORST_GAP:g}, "
        f"{SHORT_GAP:g}; ▼ below {FIGURE_FLOOR:g}; BB's methods shaded",
        fontsize=9,
    )
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def summarize(
    folder: Path,
    methods: Sequence[str] | None = None,
    lrs: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The report's numbers as plain data (for scripts comparing policies): per setting its group, best tuned
    reference and, per method, every run's gap with the worst / median / short counts; and the checks."""
    runs = load_runs(folder)
    lrs = sorted(lrs if lrs is not None else LRS)
    seeds = sorted(seeds if seeds is not None else SEEDS)
    settings = [s for s in SETTINGS if any(key[0] == s for key in runs)]
    shown = method_order(methods if methods is not None else {key[1] for key in runs})
    result: dict[str, Any] = {"lrs": lrs, "seeds": seeds, "settings": {}, "checks": []}
    for setting in settings:
        reference = best_reference(runs, setting, lrs, seeds)
        entry: dict[str, Any] = {
            "group": "holdout" if SETTINGS[setting].holdout else "dev",
            "reference": None
            if reference is None
            else {"method": reference.method, "lr": reference.lr, "mean": reference.mean, "scores": reference.scores},
            "methods": {},
        }
        for method in shown:
            if reference is None:
                continue
            method_gaps = gaps(runs, setting, method, lrs, seeds, reference.mean)
            stats = gap_stats(method_gaps.values())
            entry["methods"][method] = {
                "gaps": [{"lr": lr, "seed": seed, "gap": gap} for (lr, seed), gap in method_gaps.items()],
                "worst": stats.worst,
                "median": stats.median,
                "short": stats.short,
                "count": stats.count,
                "expected": stats.expected,
            }
        result["settings"][setting] = entry
    for method in (m for m in shown if is_bb(m)):
        for group in ("dev", "holdout"):
            chosen = [s for s in settings if (SETTINGS[s].holdout) == (group == "holdout")]
            if not chosen:
                continue
            c = check(runs, method, group, chosen, REFERENCES, lrs, seeds)
            result["checks"].append(
                {
                    "method": method,
                    "group": group,
                    "worst": c.worst,
                    "worst_holds": c.worst_holds,
                    "medians_short": c.medians_short,
                    "median_holds": c.median_holds,
                    "short": c.short,
                    "count": c.count,
                    "fewest_peer": c.fewest_peer,
                    "short_holds": c.short_holds,
                    "missing": c.missing,
                    "holds": c.holds,
                }
            )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=RUNS, help="folder of run files")
    parser.add_argument("--out", type=Path, default=RESULTS / "robustness.md")
    parser.add_argument(
        "--methods", default=None, help="comma-separated methods to show, e.g. bb,bb[mom],sgdm-cosine (default: all)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers as JSON (see summarize)")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        parser.error(f"no run folder {args.runs}; train the runs first: python benchmarks/robustness/suite.py")
    methods = None
    if args.methods is not None:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        found = {key[1] for key in load_runs(args.runs)}
        unknown = [m for m in methods if m not in found]
        if unknown:
            parser.error(f"no runs of {', '.join(unknown)} in {args.runs}; it has {', '.join(method_order(found))}")
    figure = args.out.with_suffix(".png")
    write_report(args.runs, args.out, figure, methods)
    print(f"wrote {args.out} and {figure}")
    if args.json is not None:
        args.json.write_text(json.dumps(summarize(args.runs, methods), indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
