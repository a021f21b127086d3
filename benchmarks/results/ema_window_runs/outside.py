"""BB's windowed gradient average (the default since 7ff0f42) against the average over every step it replaced, on four
settings outside the robustness suite, designed after the window was adopted and never tuned on: suite models on new
batch sizes, lengths and label noise. Only the two BB forms run (no references), so the comparison is paired: the
same setting, η0 and seed.

    python benchmarks/results/ema_window_runs/outside.py METHOD OUT_DIR SEEDS [SETTINGS]  # bb or bb[full-average]
    python benchmarks/results/ema_window_runs/outside.py table                  # the two side by side
"""

import collections
import functools
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prototypes import LRS, SETTINGS, load_runs, score, train_runs  # noqa: E402
from suite import Setting  # noqa: E402

from bbfused import optimizer  # noqa: E402
from bbfused.average_window import NO_WINDOW  # noqa: E402

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
FULL = "bb[full-average]"


def install_full_average() -> None:
    """BB's default with its gradient average updated at every step, as before the window."""
    init_as_shipped = optimizer.BB.__init__

    @functools.wraps(init_as_shipped)
    def init(self, *args, **kwargs):
        init_as_shipped(self, *args, **kwargs)
        self._clock.window = NO_WINDOW

    optimizer.BB.__init__ = init


def table(folder: Path) -> None:
    runs = load_runs(folder)
    print("| setting | steps / epoch | method | worst | median | best |")
    print("|---|---|---|---|---|---|")
    moves = collections.defaultdict(list)
    for setting in OUTSIDE:
        for name in ("bb", FULL):
            scores = [score(r) for (s, m, _, _), r in runs.items() if s == setting.name and m == name]
            print(
                f"| {setting.name} | {setting.steps_per_epoch()} | `{name}` ({len(scores)} runs) | {min(scores):.2f} "
                f"| {statistics.median(scores):.2f} | {max(scores):.2f} |"
            )
        for (s, m, lr, seed), record in runs.items():
            if s == setting.name and m == "bb" and (s, FULL, lr, seed) in runs:
                moves[s].append(score(record) - score(runs[(s, FULL, lr, seed)]))
    print()
    every = [move for setting_moves in moves.values() for move in setting_moves]
    for name, setting_moves in [*moves.items(), ("all", every)]:
        up, down = sum(m >= 1 for m in setting_moves), sum(m <= -1 for m in setting_moves)
        tail = sum(math.comb(up + down, k) for k in range(min(up, down) + 1)) / 2 ** (up + down)
        print(
            f"- {name}: `bb` against `{FULL}` over {len(setting_moves)} paired runs: {up} up and {down} down by a "
            f"point or more (sign test p = {min(1.0, 2 * tail):.2f}), mean {statistics.mean(setting_moves):+.2f}, "
            f"median {statistics.median(setting_moves):+.2f}"
        )


if __name__ == "__main__":
    SETTINGS.update({setting.name: setting for setting in OUTSIDE})
    here = Path(__file__).resolve().parent
    if sys.argv[1:2] == ["table"]:
        table(here / "outside")
    else:
        method, out, seeds = sys.argv[1:4]
        settings = sys.argv[4] if len(sys.argv) > 4 else ",".join(s.name for s in OUTSIDE)
        if method == FULL:
            install_full_average()
        train_runs(out, settings, seeds, ",".join(str(lr) for lr in LRS), method)
