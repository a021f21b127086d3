"""BB's default on epochs as long as ImageNet's, where gradient noise no longer pushes its estimate up.

On the suite's short epochs the window's mean lets noise push the estimate above the rate that ran the epoch
(1.1-10x on pure noise, ``window_prior_runs/noise_push.py``), and BB's default relies on it: an estimate corrected to
a push of 1 left 128 of 380 runs short against 79 (``push_neutral_runs/``). ImageNet's 5,005 steps an epoch give a
push of 1.01. These settings, each designed before any of its runs and never tuned on, have 1,024 to 5,000 steps an
epoch on two cores: does the default reach the tuned references there, and does the push-neutral estimate
(``bb[push-neutral]``, which should change little at a push near 1) end where it does?

    python benchmarks/results/long_epoch_runs/long_epochs.py train METHOD SEEDS [SETTINGS]  # METHOD: see below
    python benchmarks/results/long_epoch_runs/long_epochs.py table
    python benchmarks/results/long_epoch_runs/long_epochs.py report  # report.md and report.png, as the suite's

METHOD: ``bb``, ``bb[adam]`` (``BB(preconditioner="adam")``), ``bb[push-neutral]``, ``bb[anneal-MODE]``
(``end_phase_runs/end_phase.py``'s MODE: ``midpoint``, the default's end phase, or ``0.5``, each end-phase epoch at
the cosine's value at its end), or any reference of the robustness suite (``sgdm``, ``sgdm-cosine``, ``prodigy``,
..., over η0 ∈ {1e-3 … 10}; ``prodigy-default``, ``dadapt-sgd-default``, ``schedulefree-sgd-default`` at their
defaults). Runs are saved as the suite saves them, into ``long_epoch_runs/runs/``.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from prototypes import LRS, SETTINGS, load_runs, print_moves, score, side_by_side, train_runs  # noqa: E402
from report import write_report  # noqa: E402
from suite import DEFAULT_LR, DEFAULT_REFERENCES, Setting  # noqa: E402

LONG = (
    Setting("long-mlp-b8", "small_mlp", "mnist", 8, 3, 0.0, 40_000,
            "MLP 784-512-10, batches of 8: 5,000 steps an epoch", holdout=True),
    Setting("long-deep-relu-b16", "deep_relu_mnist", "mnist", 16, 3, 0.0, 32_768,
            "MLP 784-(128 ReLU)x8-10, batches of 16: 2,048 steps an epoch", holdout=True),
    Setting("long-cnn-b16", "gap_cnn", "mnist", 16, 3, 5e-4, 16_384,
            "the small-long CNN (BatchNorm) with batches of 16: 1,024 steps an epoch", holdout=True),
    Setting("long-noisy-cnn-b16", "gap_cnn", "mnist", 16, 3, 5e-4, 16_384,
            "long-cnn-b16 with 30 % of the training labels replaced by random classes", label_noise=0.3,
            holdout=True),
    Setting("long-vit-b16", "tiny_vit", "mnist", 16, 3, 5e-4, 16_384,
            "the tiny ViT (LayerNorm, no BatchNorm) with batches of 16: 1,024 steps an epoch", holdout=True),
    Setting("long-gru-b16", "gru_rows", "mnist", 16, 3, 0.0, 16_384,
            "the GRU reading image rows, gradients clipped to norm 1, batches of 16: 1,024 steps an epoch",
            clip_grad_norm=1.0, holdout=True),
)  # fmt: skip
ADAM_MODE = "bb[adam]"
PUSH_NEUTRAL = "bb[push-neutral]"
ANNEAL = "bb[anneal-"
MIDPOINT = f"{ANNEAL}midpoint]"
# The end phase the midpoint one is measured against (end_phase.py's mode 0.5), run on the same CPU.
END_OF_EPOCH = f"{ANNEAL}0.5]"
RUNS = HERE / "runs"


def train_method(method: str, seeds: str, settings: str | None) -> None:
    if method == PUSH_NEUTRAL:
        sys.path.insert(0, str(HERE.parent / "push_neutral_runs"))
        from push_neutral import install

        install()
    elif method.startswith(ANNEAL):
        sys.path.insert(0, str(HERE.parent / "end_phase_runs"))
        from end_phase import install

        install(method.removeprefix(ANNEAL).removesuffix("]"))
    lrs = DEFAULT_LR if method in DEFAULT_REFERENCES else ",".join(str(lr) for lr in LRS)
    bb_kwargs = {"preconditioner": "adam"} if method == ADAM_MODE else None
    train_runs(RUNS, settings or ",".join(s.name for s in LONG), seeds, lrs, method, bb_kwargs)


def scores(runs: dict) -> None:
    """Every run's score (%): per setting and method, seed 0 / seed 1 at each η0 (or at the defaults)."""
    methods = sorted({m for (_, m, _, _) in runs})
    print("| setting | method | " + " | ".join(f"η0 = {lr:g}" for lr in LRS) + " | defaults |")
    print("|---|---|" + "---|" * (len(LRS) + 1))
    for setting in LONG:
        for method in methods:
            cells = []
            for lr in (*LRS, DEFAULT_LR):
                pair = [runs.get((setting.name, method, lr, seed)) for seed in (0, 1)]
                cells.append(" / ".join(f"{score(r):.2f}" for r in pair) if all(pair) else "")
            print(f"| {setting.name} | `{method}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    SETTINGS.update({setting.name: setting for setting in LONG})
    if sys.argv[1] == "report":
        write_report(
            RUNS,
            HERE / "report.md",
            HERE / "report.png",
            title="BB's default on long epochs (1,024 to 5,000 steps): how far it ends from what the user would "
            "otherwise have run",
            generator="python benchmarks/results/long_epoch_runs/long_epochs.py report",
            trainer="python benchmarks/results/long_epoch_runs/long_epochs.py train",
        )
    elif sys.argv[1] == "table":
        runs = load_runs(RUNS)
        side_by_side(runs, runs, ["bb", ADAM_MODE, PUSH_NEUTRAL, MIDPOINT])
        print()
        print_moves(runs, [PUSH_NEUTRAL, MIDPOINT], baseline="bb")
        print_moves(runs, [MIDPOINT], baseline=END_OF_EPOCH)
        print()
        scores(runs)
    else:
        train_method(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
