"""A prototype for the default rate control, not in the optimizer: the rate follows GAIN times BB's estimate instead of
the estimate itself (the search's objection too: it ends where GAIN times the estimate falls below the rate). On the
suite's SGD-type settings where the default ends short of tuned SGD momentum + cosine (res-cnn, the GroupNorm CNNs,
the LSTM) the rate it follows sits a few times under the effective rate of the tuned recipe. Runs are saved as the
suite saves them, as method ``bb[gainG]``:

    python benchmarks/results/estimate_gain_runs/estimate_gain.py GAIN OUT_DIR SETTINGS SEEDS LRS
    python benchmarks/results/estimate_gain_runs/estimate_gain.py table GAIN [GAIN ...]  # beside the default

The decision runs as torch ops (the Triton decision kernel is turned off).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prototypes import load, side_by_side, train_runs  # noqa: E402

from bbfused.control import safeguard  # noqa: E402

bb_ratio_as_shipped = safeguard.bb_ratio


def install(gain: float) -> None:
    """Patch the gain into BB's default control's estimate."""
    safeguard.bb_ratio = lambda sums, steps: gain * bb_ratio_as_shipped(sums, steps)
    safeguard.SafeguardControl._decision_kernels = lambda self, buffers: None


def method(gain: str) -> str:
    return f"bb[gain{gain}]"


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    if sys.argv[1:2] == ["table"]:
        gains = sys.argv[2:]
        side_by_side(*load([here / f"gain{g}" for g in gains]), ["bb", *(method(g) for g in gains)])
    else:
        gain = sys.argv[1]
        install(float(gain))
        train_runs(*sys.argv[2:6], method(gain))
