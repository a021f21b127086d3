"""Tables and figures of ``benchmarks/results/paper_mnist.md`` from the run files the experiment scripts saved.

    python benchmarks/paper/report.py            # rewrite the generated blocks of paper_mnist.md and the PNGs
    python benchmarks/paper/report.py --print    # print the tables instead
    python benchmarks/paper/report.py --quick    # from the --quick runs, into a scratch folder (smoke test)

A generated block of the markdown file sits between ``<!-- BEGIN name -->`` and ``<!-- END name -->``; the text
around the blocks is left alone, so the prose and the numbers live in one file and only the numbers are rewritten.
Seeds are averaged; a run whose training loss became NaN or inf counts as diverged (its last test accuracy is
kept, its loss is reported as "div").
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from runs import RESULTS, RUNS  # noqa: E402

from bbfused.control.paper import PaperControl  # noqa: E402

REPORT = RESULTS / "paper_mnist.md"
MODELS = {"mlp": "MLP", "lenet": "LeNet-5", "resnet18": "ResNet-18"}
LABELS = {
    "bb": "BB",
    "bb-safe": "BB + safeguard",
    "sgd": "SGD (momentum 0.9)",
    "sgd-cosine": "SGD (momentum 0.9) + cosine",
    "sgd-step": "SGD (momentum 0.9) + step",
    "nag": "NAG",
    "adam": "Adam",
    "amsgrad": "AMSGrad",
    "adagrad": "AdaGrad",
    "rmsprop": "RMSProp",
}


def load(folder: Path) -> list[dict]:
    """Every run file in ``folder`` (none if it does not exist)."""
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def by_method_lr(records: list[dict]) -> dict[str, dict[float, list[dict]]]:
    """{method: {η0: [one record per seed]}}, methods in LABELS order and η0 ascending."""
    table: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        table[record["run"]["method"]][record["run"]["lr"]].append(record)
    order = [m for m in LABELS if m in table]
    return {m: dict(sorted(table[m].items())) for m in order}


def final(record: dict, key: str) -> float:
    return record["history"][-1][key]


def _range(values: list[float]) -> float:
    return max(values) - min(values)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def diverged(records: list[dict]) -> bool:
    return any(record["diverged_after_epoch"] is not None for record in records)


def _loss_text(records: list[dict]) -> str:
    if diverged(records):
        epochs = sorted({r["diverged_after_epoch"] for r in records if r["diverged_after_epoch"] is not None})
        return f"div (ep {','.join(map(str, epochs))})"
    return f"{mean([final(r, 'train_loss') for r in records]):.4f}"


def _epoch_rates(record: dict) -> str:
    """The learning rate a run used in each epoch."""
    return " ".join(f"{e['lr']:.3g}" for e in record["history"])


def _rolled_back_text(record: dict) -> str:
    """The epochs (1-based) the default control rolled back: "none", or "–" where nothing can roll back (the
    paper's BB, the baselines)."""
    rolled = [str(e["epoch"]) for e in record["history"] if e.get("rolled_back")]
    return ", ".join(rolled) if rolled else ("none" if record["run"]["method"] == "bb-safe" else "–")


def sensitivity_tables(records: list[dict]) -> dict[str, str]:
    """The markdown blocks of an experiment-1 sweep: final loss and accuracy per method and η0, the spread of
    the final test accuracy across η0 per method, and BB's learning rate per epoch."""
    table = by_method_lr(records)
    if not table:
        return {"results": "(no runs yet)", "spread": "(no runs yet)", "bb_lrs": "(no runs yet)"}
    lrs = sorted({lr for per_lr in table.values() for lr in per_lr})
    seeds = sorted({r["run"]["seed"] for r in records})
    epochs = max(r["run"]["epochs"] for r in records)
    head = "| method | " + " | ".join(f"η0 = {lr:g}" for lr in lrs) + " |\n|---|" + "---|" * len(lrs) + "\n"
    rows = []
    for method, per_lr in table.items():
        cells = []
        for lr in lrs:
            runs = per_lr.get(lr, [])
            if not runs:
                cells.append("–")
                continue
            accs = [final(r, "test_acc1") for r in runs]
            partial = f" ({len(runs)} seed{'s' * (len(runs) > 1)})" if len(runs) < len(seeds) else ""
            cells.append(f"{_loss_text(runs)} / {mean(accs):.2f}{partial}")
        rows.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    results = (
        f"Final train loss / test accuracy (%) after {epochs} epochs, mean of seeds {', '.join(map(str, seeds))} "
        f"(div (ep N): the training loss became NaN in epoch N and the run stopped).\n\n" + head + "\n".join(rows)
    )

    spread_rows = []
    for method, per_lr in table.items():
        accs = {lr: mean([final(r, "test_acc1") for r in runs]) for lr, runs in per_lr.items()}
        per_seed = [accs[lr] for lr in accs]
        best_lr = max(accs, key=accs.get)
        worst_lr = min(accs, key=accs.get)
        finite = [accs[lr] for lr, runs in per_lr.items() if not diverged(runs)]
        finite_spread = f"{max(finite) - min(finite):.2f}" if finite else "–"
        small = [acc for lr, acc in accs.items() if lr <= 0.1]
        small_spread = f"{_range(small):.2f}" if small else "–"
        seed_ranges = [_range([final(r, "test_acc1") for r in runs]) for runs in per_lr.values() if len(runs) > 1]
        seed_noise = f"{mean(seed_ranges):.2f}" if seed_ranges else "–"
        spread_rows.append(
            f"| {LABELS[method]} | {max(per_seed) - min(per_seed):.2f} | {finite_spread} | {small_spread} | "
            f"{accs[best_lr]:.2f} (η0 {best_lr:g}) | {accs[worst_lr]:.2f} (η0 {worst_lr:g}) | "
            f"{sum(diverged(runs) for runs in per_lr.values())} of {len(per_lr)} | {seed_noise} |"
        )
    spread = (
        "Spread of the final test accuracy across η0 (max − min of the seed means, percentage points); the "
        "second column leaves out the η0 whose loss became NaN, the third η0 = 1. Seed noise: the mean over η0 "
        "of the range of the final test accuracy across seeds, for scale.\n\n"
        "| method | spread | spread without diverged | spread over η0 ≤ 0.1 | best | worst | η0 diverged "
        "| seed noise |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(spread_rows)
    )

    lr_rows = []
    for method in ("bb", "bb-safe"):
        for lr, runs in table.get(method, {}).items():
            for r in sorted(runs, key=lambda r: r["run"]["seed"]):
                rates, rolled_text = _epoch_rates(r), _rolled_back_text(r)
                losses = " ".join(f"{e['train_loss']:.3g}" for e in r["history"])
                fallbacks = f"{fallback_epochs(r)} of {max(0, len(r['history']) - 2)}" if method == "bb" else "–"
                lr_rows.append(
                    f"| {LABELS[method]} | {lr:g} | {r['run']['seed']} | {rates} | {fallbacks} | {rolled_text} | "
                    f"{losses} | {final(r, 'test_acc1'):.2f} |"
                )
    bb_lrs = (
        "The learning rate BB used in each epoch, how many of the rule's rates were its fallback τ0/(k+2) (the BB "
        "ratio fell outside [τ_min, τ_max]/(k+2)), the epochs the safeguard rolled back (1-based, as the positions "
        "in the lists), the mean training loss of each epoch and the final test accuracy.\n\n"
        "| method | η0 | seed | learning rate per epoch | fallbacks | rolled back | train loss per epoch | test % |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(lr_rows)
        if lr_rows
        else "(no BB runs)"
    )
    tables = {"results": results, "spread": spread, "bb_lrs": bb_lrs, "recipe": recipe_gap_table(records)}
    return {**tables, "growth": growth_table(records), "loss": loss_table(records)}


# What a user tunes instead of BB: SGD with momentum 0.9 and cosine annealing, or the step schedule.
RECIPES = ("sgd-cosine", "sgd-step")


def recipe_gap_table(records: list[dict], method: str = "bb-safe") -> str:
    """Each run of ``method`` against the tuned recipe: the recipe method and η0 of the grid with the best mean final
    test accuracy over their seeds, of the RECIPES that ran. The gap in points, per run, and how many runs are within
    1, 2 and 3 points."""
    table = by_method_lr(records)
    recipes = [name for name in RECIPES if name in table]
    if not recipes or method not in table:
        return f"(no runs of {' or '.join(RECIPES)} and {method} yet)"
    means = {
        (name, lr): mean([final(r, "test_acc1") for r in runs]) for name in recipes for lr, runs in table[name].items()
    }
    best = max(means, key=lambda key: means[key] if math.isfinite(means[key]) else -math.inf)
    seeds = sorted(r["run"]["seed"] for r in table[best[0]][best[1]])
    counts = {key: len(table[key[0]][key[1]]) for key in means}
    uneven = len(set(counts.values())) > 1  # then each η0's mean says over how many seeds it is
    grids = []
    for name in recipes:
        keys = [key for key in means if key[0] == name]
        grid = " / ".join(
            f"{means[key]:.2f}" + (f" ({counts[key]} seed{'s' * (counts[key] > 1)})" if uneven else "") for key in keys
        )
        grids.append(f"{LABELS[name]} over η0 = {' / '.join(f'{key[1]:g}' for key in keys)}: {grid} %")
    rows, gaps = [], []
    for lr, runs in table[method].items():
        for r in sorted(runs, key=lambda r: r["run"]["seed"]):
            accuracy = final(r, "test_acc1")
            gaps.append(accuracy - means[best])
            rows.append(f"| {lr:g} | {r['run']['seed']} | {accuracy:.2f} | {gaps[-1]:+.2f} |")
    within = ", ".join(f"{sum(g >= -limit for g in gaps)} within {limit}" for limit in (1, 2, 3))
    return (
        f"The tuned recipe, {LABELS[best[0]]}: {means[best]:.2f} % at η0 = {best[1]:g} (mean of seed"
        f"{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}; the best of {'; '.join(grids)}). Each run of "
        f"{LABELS[method]} against it, in points (negative: below it). Of {len(gaps)} runs: {within} points of "
        f"it; median gap {statistics.median(gaps):+.2f}, worst {min(gaps):+.2f}.\n\n"
        "| η0 | seed | final test % | gap to the tuned recipe |\n|---|---|---|---|\n" + "\n".join(rows)
    )


TITLE_BAND_INCHES = 0.2  # the figure title's band above the panels
DEAD_ACCURACY = 15.0  # % test accuracy at or below which a 10-class network predicts (about) one class


def _fold(growth: float) -> str:
    if math.isnan(growth):
        return "NaN"
    return f"{growth:.2f}" if growth < 100 else f"{growth:.3g}"


def growth_table(records: list[dict]) -> str:
    """How much ‖θ‖² grew in each epoch of BB's runs (paper-exact and safeguarded, from the recorded ‖θ‖²), split
    into the epochs after which the network was above chance and those that brought it to chance (test accuracy
    DEAD_ACCURACY or below, or NaN weights) from above. What BB's safeguard threshold has to separate."""
    kept: list[tuple[float, str]] = []
    killed: list[tuple[float, str]] = []
    for r in records:
        if r["run"]["method"] not in ("bb", "bb-safe") or "param_sq_norms" not in r:
            continue
        norms, was_alive = r["param_sq_norms"], True  # the initial network counts as above chance
        for e, epoch in enumerate(r["history"]):
            alive = epoch["test_acc1"] > DEAD_ACCURACY and math.isfinite(epoch["train_loss"])
            # A rolled-back epoch's growth was not recorded; at chance before and after: nothing to learn from.
            if not epoch.get("rolled_back") and (alive or was_alive):
                where = f"{r['run']['method']} η0={r['run']['lr']:g} seed {r['run']['seed']} epoch {e + 1}"
                (kept if alive else killed).append((norms[e + 1] / norms[e], where))
            was_alive = alive
    if not kept and not killed:
        return "(no BB runs with ‖θ‖² recorded)"
    largest = max(kept) if kept else (math.nan, "–")
    killing = ", ".join(f"{_fold(g)} ({where})" for g, where in sorted(killed, key=lambda k: (math.isnan(k[0]), k[0])))
    return (
        "‖θ‖² at an epoch's end over ‖θ‖² at its start, in BB's runs (paper-exact and safeguarded; a rolled-back "
        f"epoch's growth is not recorded). At chance: test accuracy {DEAD_ACCURACY:g} % or below, or NaN weights."
        "\n\n| epochs | how many | ‖θ‖² growth |\n|---|---|---|\n"
        f"| the network was above chance after it | {len(kept)} | at most {_fold(largest[0])} ({largest[1]}) |\n"
        f"| it brought the network to chance from above | {len(killed)} | {killing or '–'} |"
    )


def loss_table(records: list[dict], threshold: float = 2.5, largest: int = 3) -> str:
    """An epoch's mean training loss over the epoch before's in the paper-exact BB runs (what BB's loss check
    compares with ``threshold``), from epoch 2 on, counted by range; the epochs above 1 are named with their test
    accuracy before and after (the ``largest`` ones up to the threshold, all above it)."""
    below, middle, above = "at most 1", f"1 to {threshold:g}", f"above {threshold:g}"
    ranges: dict[str, list[tuple[float, str]]] = {below: [], middle: [], above: []}
    for r in records:
        if r["run"]["method"] != "bb":
            continue
        history = r["history"]
        for e in range(1, len(history)):
            ratio = history[e]["train_loss"] / history[e - 1]["train_loss"]
            if math.isnan(ratio):
                continue
            where = (
                f"{_fold(ratio)} (η0={r['run']['lr']:g} seed {r['run']['seed']} epoch {e + 1}: test "
                f"{history[e - 1]['test_acc1']:.1f} → {history[e]['test_acc1']:.1f} %)"
            )
            ranges[below if ratio <= 1 else middle if ratio <= threshold else above].append((ratio, where))
    if not any(ranges.values()):
        return "(no paper-exact BB runs)"
    rows = []
    for name, items in ranges.items():
        items.sort(reverse=True)
        named = {below: [], middle: items[:largest], above: items}[name]
        rows.append(f"| {name} | {len(items)} | {', '.join(where for _, where in named) or '–'} |")
    return (
        "An epoch's mean training loss over the epoch before's, in the paper-exact BB runs from epoch 2 on (BB's "
        f"loss check rolls an epoch back above {threshold:g}, comparing with the last epoch not rolled back).\n\n"
        "| loss ratio | epochs | largest (test accuracy before → after) |\n|---|---|---|\n" + "\n".join(rows)
    )


def fallback_epochs(record: dict) -> int:
    """How many epochs of a paper-exact run ran at the rule's fallback: epoch e >= 2 (0-based) used τ0/(e+1), set
    after epoch k = e-1 (τ0: the paper mode's default; these runs do not set it; the default control has none)."""
    tau0 = PaperControl.DEFAULT_TAUS[0]
    return sum(
        math.isclose(epoch["lr"], tau0 / (e + 1), rel_tol=1e-9) for e, epoch in enumerate(record["history"]) if e >= 2
    )


def _curve(records: list[dict], key: str) -> list[float]:
    """The seed mean of ``key`` per epoch, as long as the shortest run (a diverged run stops early)."""
    length = min(len(r["history"]) for r in records)
    return [mean([r["history"][i][key] for r in records]) for i in range(length)]


def _titled_layout(figure: plt.Figure, title: str) -> None:
    """The figure's title above its panels: tight_layout alone ignores the figure's title, which then overlaps the top
    row's panel titles, so the panels are packed below a band left for it."""
    figure.suptitle(title)
    figure.tight_layout(rect=(0, 0, 1, 1 - TITLE_BAND_INCHES / figure.get_figheight()))


def sensitivity_figure(records: list[dict], path: Path, title: str, per_row: int = 4) -> None:
    """One panel pair per method (training loss, log scale, above test accuracy), ``per_row`` methods a row,
    one curve per η0 (the mean of the seeds)."""
    table = by_method_lr(records)
    rows = math.ceil(len(table) / per_row)
    columns = min(per_row, len(table))
    figure, axes = plt.subplots(2 * rows, columns, figsize=(3.3 * columns, 5.6 * rows), squeeze=False)
    colors = plt.get_cmap("viridis")
    all_lrs = sorted({lr for per_lr in table.values() for lr in per_lr})
    top = 3.0
    for index, (method, per_lr) in enumerate(table.items()):
        loss_axes, acc_axes = (
            axes[2 * (index // per_row), index % per_row],
            axes[2 * (index // per_row) + 1, index % per_row],
        )
        for lr, runs in per_lr.items():
            color = colors(all_lrs.index(lr) / max(1, len(all_lrs) - 1))
            loss = [v if math.isfinite(v) else math.nan for v in _curve(runs, "train_loss")]
            acc = _curve(runs, "test_acc1")
            label = f"η0={lr:g}"
            if diverged(runs):
                label += " (NaN)"
            elif any(math.isnan(v) for v in loss):
                label += " (rolled back)"
            if acc[-1] < 90:
                label += f" ends {acc[-1]:.0f} %"
            epochs = range(1, len(loss) + 1)
            loss_axes.plot(epochs, loss, marker="o", markersize=3, color=color, label=label)
            acc_axes.plot(epochs, acc, marker="o", markersize=3, color=color)
            top = max(top, max((v for v in loss if not math.isnan(v)), default=0.0))
        loss_axes.set_title(LABELS[method])
        loss_axes.set_yscale("log")
        loss_axes.legend(fontsize=7)
        acc_axes.set_ylim(90, 100)
        acc_axes.set_xlabel("epoch")
        if index % per_row == 0:
            loss_axes.set_ylabel("training loss")
            acc_axes.set_ylabel("test accuracy % (90-100 shown)")
        for ax in (loss_axes, acc_axes):
            ax.grid(alpha=0.3)
    for index in range(len(table)):  # one loss scale for every panel, up to the largest finite loss (at most 1e6)
        axes[2 * (index // per_row), index % per_row].set_ylim(5e-3, min(1e6, 10 ** math.ceil(math.log10(top))))
    for index in range(len(table), rows * columns):
        axes[2 * (index // per_row), index % per_row].axis("off")
        axes[2 * (index // per_row) + 1, index % per_row].axis("off")
    _titled_layout(figure, title)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def comparison_table(records: list[dict], tuning: list[dict]) -> str:
    """Experiment 2's table: each method's η0, its tuning score, and its loss and accuracy per epoch."""
    if not records:
        return "(no runs yet)"
    rows = []
    best_tuning = {}
    for r in tuning:
        method, score = r["run"]["method"], final(r, "test_acc1")
        if method not in best_tuning or score > best_tuning[method]:
            best_tuning[method] = score
    for method, per_lr in by_method_lr(records).items():
        for lr, runs in per_lr.items():
            loss = " ".join(f"{v:.3g}" for v in _curve(runs, "train_loss"))
            acc = " ".join(f"{v:.2f}" for v in _curve(runs, "test_acc1"))
            tuned = f"{best_tuning[method]:.2f}" if method in best_tuning else "not tuned"
            rows.append(f"| {LABELS[method]} | {lr:g} | {tuned} | {loss} | {acc} |")
    return (
        "| method | η0 | tuning score (test %) | train loss per epoch | test accuracy % per epoch |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows)
    )


def tuning_table(tuning: list[dict]) -> str:
    """Experiment 2's tuning grid: the tuning score of every method and η0."""
    if not tuning:
        return "(no tuning runs yet)"
    table = by_method_lr(tuning)
    lrs = sorted({lr for per_lr in table.values() for lr in per_lr})
    head = "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |\n|---|" + "---|" * len(lrs) + "\n"
    rows = []
    for method, per_lr in table.items():
        cells = []
        for lr in lrs:
            runs = per_lr.get(lr)
            cells.append("–" if not runs else ("div" if diverged(runs) else f"{final(runs[0], 'test_acc1'):.1f}"))
        rows.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows)


def comparison_figure(records: list[dict], path: Path, title: str) -> None:
    """Training loss (log) and test accuracy per epoch, one curve per method (the paper's Figure 3)."""
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, per_lr in by_method_lr(records).items():
        for lr, runs in per_lr.items():
            label = f"{LABELS[method]} (η0={lr:g})"
            style = dict(marker="o", markersize=3, linewidth=2.2 if method.startswith("bb") else 1.2)
            loss = _curve(runs, "train_loss")
            loss_axes.plot(range(1, len(loss) + 1), loss, label=label, **style)
            acc = _curve(runs, "test_acc1")
            acc_axes.plot(range(1, len(acc) + 1), acc, label=label, **style)
    loss_axes.set_yscale("log")
    loss_axes.set_ylabel("training loss")
    acc_axes.set_ylabel("test accuracy %")
    for axes in (loss_axes, acc_axes):
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
    acc_axes.legend(fontsize=7)
    _titled_layout(figure, title)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def runs_table(records: list[dict]) -> str:
    """One row per run: its rate and test accuracy per epoch, the final one in bold, and the epochs rolled back
    (1-based): the runs of a folder kept out of the sweeps' tables (``resnet18_all_images``)."""
    if not records:
        return "(no runs yet)"
    rows = []
    for method, per_lr in by_method_lr(records).items():
        for lr, runs in per_lr.items():
            for r in sorted(runs, key=lambda r: r["run"]["seed"]):
                constant = method not in ("bb", "bb-safe") and all(e["lr"] == lr for e in r["history"])
                rates = f"{lr:g} (constant)" if constant else _epoch_rates(r)
                rolled_text = _rolled_back_text(r)
                accs = [f"{e['test_acc1']:.2f}" for e in r["history"]] or ["–"]
                accs[-1] = f"**{accs[-1]}**"
                seed = r["run"]["seed"]
                rows.append(f"| {LABELS[method]} | {lr:g} | {seed} | {rates} | {rolled_text} | {' '.join(accs)} |")
    return (
        "| method | η0 | seed | learning rate per epoch | rolled back | test accuracy % per epoch |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows)
    )


def times_table(folders: dict[str, list[dict]]) -> str:
    """Per experiment folder: the runs, the epochs trained and the summed run time (runs went 2 at once)."""
    rows = []
    for name, records in folders.items():
        if records:
            epochs = sum(len(r["history"]) for r in records)
            seconds = sum(r["wall_s"] for r in records)
            rows.append(f"| {name} | {len(records)} | {epochs} | {seconds / 60:.1f} | {seconds / epochs:.1f} |")
    return (
        "| run folder | runs | epochs trained | run time, summed (min) | s per epoch (incl. evaluation) |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows)
    )


def data_name(records: list[dict]) -> str:
    """The training data of ``records``: MNIST unless their command lines name a ``--data`` folder."""
    argv = records[0]["argv"]
    return Path(argv[argv.index("--data") + 1]).name if "--data" in argv else "MNIST"


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    """``text`` with the content between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` replaced."""
    for name, content in blocks.items():
        pattern = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n).*?(<!-- END {re.escape(name)} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{REPORT} has no block {name!r}; add <!-- BEGIN {name} --> ... <!-- END {name} -->")
        text = pattern.sub(lambda match, content=content: match.group(1) + content + "\n" + match.group(2), text)
    return text


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the tables, write no file")
    parser.add_argument("--quick", action="store_true", help="report the --quick runs into --figures (smoke test)")
    parser.add_argument("--figures", type=Path, default=RESULTS, help="folder of the PNGs (default: %(default)s)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="folder of the run folders (default: %(default)s)")
    args = parser.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    blocks: dict[str, str] = {}
    figures = []
    folders = {name: load(args.runs / f"{name}{suffix}") for name in ("sensitivity", "tuning", "comparison")}
    found = {r["run"]["model"] for name in ("sensitivity", "comparison") for r in folders[name]}
    for model in [*MODELS, *sorted(found - MODELS.keys())]:
        label = MODELS.get(model, model)
        records = [r for r in folders["sensitivity"] if r["run"]["model"] == model]
        if records:
            for name, content in sensitivity_tables(records).items():
                blocks[f"sensitivity_{model}_{name}"] = content
            path = args.figures / f"paper_sensitivity_{model}.png"
            if not args.print:
                title = f"{label} on {data_name(records)}: sensitivity to the initial learning rate"
                sensitivity_figure(records, path, title)
                figures.append(path)
        comparison = [r for r in folders["comparison"] if r["run"]["model"] == model]
        tuning = [r for r in folders["tuning"] if r["run"]["model"] == model]
        if comparison or tuning:
            blocks[f"comparison_{model}_tuning"] = tuning_table(tuning)
            blocks[f"comparison_{model}"] = comparison_table(comparison, tuning)
        if comparison:
            path = args.figures / f"paper_comparison_{model}.png"
            if not args.print:
                comparison_figure(comparison, path, f"{label} on {data_name(comparison)}: each method at its tuned η0")
                figures.append(path)
    blocks["times"] = times_table(folders)
    all_images = load(args.runs / "resnet18_all_images")
    if all_images and not args.quick:
        blocks["resnet18_all_images"] = runs_table(all_images)
        blocks["resnet18_all_images_recipe"] = recipe_gap_table(all_images)
    if args.print or args.quick:
        for name, content in blocks.items():
            print(f"## {name}\n\n{content}\n")
    else:
        REPORT.write_text(replace_blocks(REPORT.read_text(), blocks))
    print("figures:", ", ".join(str(path) for path in figures))
    return blocks


if __name__ == "__main__":
    main()
