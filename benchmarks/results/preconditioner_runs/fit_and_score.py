"""How far a run fitted its noisy training labels, against its test accuracy, on the label-noise settings of the
suite: every recorded run (references, BB's default, ``bb[adam]`` from the files next to this script; not the
paper's BB), grouped by the last epoch's mean training loss:
``python benchmarks/results/preconditioner_runs/fit_and_score.py``, the tables of 2026-12-05_cpu_noisy_labels_fit.md.

A run that predicts the clean label with the noise's own posterior has a training cross-entropy of
:func:`noise_entropy`; below it a run is fitting the random labels themselves."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "robustness"))

from report import load_runs, score  # noqa: E402
from suite import RUNS, SETTINGS  # noqa: E402

CLASSES = 10  # the noise draws among the ten digits (suite.add_label_noise)
BANDS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.2, 1.5, math.inf)
TRAINED = 50.0  # a run that ended below this test score did not train; it is counted apart
# What a user would run, and BB's two modes; the paper's BB (bb-paper) is neither.
METHODS_LEFT_OUT = ("bb-paper",)


def noise_entropy(noise: float, classes: int) -> float:
    """The cross-entropy of the noisy labels under the best prediction that does not memorise them: the clean class
    with probability 1 - noise + noise / classes, every other class with noise / classes (a uniform draw may give
    the clean class back)."""
    right = 1 - noise + noise / classes
    wrong = noise / classes
    return -(right * math.log(right) + (classes - 1) * wrong * math.log(wrong))


def compared_runs() -> dict:
    """The suite's records but the methods left out, and the ``bb[adam]`` runs next to this script, read once."""
    runs = {key: record for key, record in load_runs(RUNS).items() if key[1] not in METHODS_LEFT_OUT}
    runs.update({key: record for key, record in load_runs(HERE).items() if key[1] == "bb[adam]"})
    return runs


def final_fits(runs: dict, setting: str) -> tuple[list[tuple[float, float, str]], int]:
    """(last epoch's mean training loss, test accuracy, method) of every run of ``setting`` that trained, and the
    count of the rest."""
    fits, failed = [], 0
    for (run_setting, method, _lr, _seed), record in runs.items():
        if run_setting != setting:
            continue
        loss, test = record["train_loss"][-1], score(record)
        if loss is None or not math.isfinite(loss) or test < TRAINED:
            failed += 1
            continue
        fits.append((loss, test, method))
    return fits, failed


def table(runs: dict, setting: str, noise: float, classes: int = CLASSES) -> str:
    fits, failed = final_fits(runs, setting)
    lines = [
        f"**{setting}**: {noise * 100:.0f} % of training labels random; the noise's own cross-entropy "
        f"{noise_entropy(noise, classes):.2f}.",
        f"{len(fits)} runs; {failed} more ended below {TRAINED:.0f} % or not finite.",
        "",
        "| last epoch's training loss | runs | test accuracy: best / median / worst | bb[adam] | BB default |",
        "|---|---|---|---|---|",
    ]
    for low, high in zip(BANDS, BANDS[1:]):
        band = [fit for fit in fits if low <= fit[0] < high]
        if not band:
            continue
        scores = [test for _, test, _ in band]
        adam = sum(method == "bb[adam]" for *_, method in band)
        default = sum(method == "bb" for *_, method in band)
        lines.append(
            f"| [{low:g}, {high:g}) | {len(band)} | {max(scores):.1f} / {statistics.median(scores):.1f} / "
            f"{min(scores):.1f} | {adam} | {default} |"
        )
    return "\n".join(lines)


def main() -> None:
    runs = compared_runs()
    noisy = [(name, setting.label_noise) for name, setting in SETTINGS.items() if setting.label_noise > 0]
    print("\n\n".join(table(runs, name, noise) for name, noise in noisy))


if __name__ == "__main__":
    main()
