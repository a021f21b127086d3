"""BB's windowed gradient average (the default since 7ff0f42) against the average over every step it replaced, on four
settings outside the robustness suite, designed after the window was adopted and never tuned on: suite models on new
batch sizes, lengths and label noise. Only the two BB forms run (no references), so the comparison is paired: the
same setting, η0 and seed. METHOD: ``bb`` (the default: the last quarter of each epoch), ``bb[full-average]`` (every
step) or ``bb[window0.5]`` (the last half).

    python benchmarks/results/ema_window_runs/outside.py METHOD OUT_DIR SEEDS [SETTINGS]  # METHOD: see below
    python benchmarks/results/ema_window_runs/outside.py table                  # the two side by side
"""

import functools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prototypes import LRS, SETTINGS, load_runs, print_setting_moves, score, train_runs  # noqa: E402
from suite import Setting  # noqa: E402

from bbfused import optimizer  # noqa: E402
from bbfused.average_window import NO_WINDOW, AverageWindow  # noqa: E402

OUTSIDE = (
    Setting("ln-mlp-digits-noisy", "ln_mlp", "digits", 64, 20, 0.0, None,
            "MLP 64-128-128-10 with LayerNorm and GELU, batches of 64, 15 % noisy labels", label_noise=0.15),
    Setting("lstm-digits-b8", "lstm_rows", "digits", 8, 6, 0.0, None,
            "LSTM (hidden 32) on the digits' rows, batches of 8"),
    Setting("digits-cnn-noisy", "digits_cnn", "digits", 32, 15, 5e-4, None,
            "conv16-ReLU, conv32-ReLU-pool, fc10, batches of 32, 20 % noisy labels", label_noise=0.2),
    Setting("deep-relu-digits-b64", "deep_relu_digits", "digits", 64, 20, 0.0, None,
            "MLP 64-(128 ReLU)x6-10, batches of 64, no normalisation"),
)  # fmt: skip
FULL, HALF = "bb[full-average]", "bb[window0.5]"


def install_window(window: AverageWindow) -> None:
    """BB's default with another gradient-average window: NO_WINDOW (every step, as before the window) or a half."""
    init_as_shipped = optimizer.BB.__init__

    @functools.wraps(init_as_shipped)
    def init(self, *args, **kwargs):
        init_as_shipped(self, *args, **kwargs)
        self._clock.window = window

    optimizer.BB.__init__ = init


def table(folder: Path) -> None:
    runs = load_runs(folder)
    print("| setting | steps / epoch | method | worst | median | best |")
    print("|---|---|---|---|---|---|")
    for setting in OUTSIDE:
        for name in ("bb", HALF, FULL):
            scores = [score(r) for (s, m, _, _), r in runs.items() if s == setting.name and m == name]
            if scores:
                print(
                    f"| {setting.name} | {setting.steps_per_epoch()} | `{name}` ({len(scores)} runs) | "
                    f"{min(scores):.2f} | {statistics.median(scores):.2f} | {max(scores):.2f} |"
                )
    for name in ("bb", HALF):
        print()
        print_setting_moves(runs, name, runs, FULL)


if __name__ == "__main__":
    SETTINGS.update({setting.name: setting for setting in OUTSIDE})
    here = Path(__file__).resolve().parent
    if sys.argv[1:2] == ["table"]:
        table(here / "outside")
    else:
        method, out, seeds = sys.argv[1:4]
        settings = sys.argv[4] if len(sys.argv) > 4 else ",".join(s.name for s in OUTSIDE)
        if method in (FULL, HALF):
            install_window(NO_WINDOW if method == FULL else AverageWindow(0.5))
        train_runs(out, settings, seeds, ",".join(str(lr) for lr in LRS), method)
