"""A prototype of a dead-unit rule for the default rate control, not in the optimizer: a period whose last step's
gradient has fewer than FRACTION times as many values different from zero as the gradient at the last good period
end (the first step's before any), and that no other test rolls back, counts as diverged, as a non-finite gradient
average does: it is rolled back and the rate backs off. A ReLU unit that no input of a batch activates gives its
weights exactly zero gradients; when a rate kills many units at once the share of non-zero values collapses
(2026-12-05_cpu_dead_units.md).

The count is taken on the host at every step (a prototype: the optimizer takes it in two steps of a period). The
optimizer has the rule since commit 43d0a49 (``bbfused/control/live_gradients.py``; ``adopted.py`` compares the two):
this script patches the decision as it was at 5e45055 and runs there only.
Each run is saved as the suite saves it, as method ``bb[dead<FRACTION>]`` (BB's default otherwise):

    python benchmarks/results/dead_unit_runs/dead_units.py 0.5 OUT_DIR SETTINGS 0,1 0.001,0.01,0.1,1,10 [loss]
"""

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "robustness"))
import suite  # noqa: E402

from bbfused import BB  # noqa: E402
from bbfused.control.safeguard import SafeguardControl  # noqa: E402

# Set by install(): the rule's fraction, and whether only a period whose mean loss did not fall below the best good
# period's counts (a death that cost the loss; many units of a shallow net may stop while it still learns).
FRACTION = 0.5
LOSS_CONDITION = False
step_without_count = BB.step
diverged_without_count = SafeguardControl.diverged


def nonzero_share(optimizer: BB) -> float:
    """The share of the gradients' values that are not exactly zero (1 without a gradient)."""
    with torch.no_grad():
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        total = sum(g.numel() for g in grads)
        return sum(int(torch.count_nonzero(g)) for g in grads) / total if total else 1.0


def step(self: BB, *args, **kwargs):
    control = self._control
    live = nonzero_share(self)
    control.live_now = live
    if not hasattr(control, "live_reference"):
        control.live_reference = live  # the first step's: what a rolled-back epoch 0 returns to
    return step_without_count(self, *args, **kwargs)


def loss_fell(self: SafeguardControl, clock) -> bool:
    """Whether the period's mean loss fell below the best good period's (the first step's before any)."""
    mean, complete, initial, *_ = self._epoch_loss(clock.closing_steps)
    best = initial if math.isnan(float(self.best_loss)) else self.best_loss
    return bool(complete) and float(mean) < float(best)


def diverged(self: SafeguardControl, sums: torch.Tensor, clock):
    if clock.gate is not None:
        raise RuntimeError("the dead-unit prototype decides on the host: run without capturable=True")
    decision = diverged_without_count(self, sums, clock)
    if bool(decision[0]):
        return decision  # rolled back already: its own rule's consequences stand
    if self.live_now < FRACTION * self.live_reference and not (LOSS_CONDITION and loss_fell(self, clock)):
        sums = sums.clone()
        sums[3] = math.inf  # the divergence a non-finite gradient average is (the decision is a pure function)
        return diverged_without_count(self, sums, clock)
    self.live_reference = self.live_now
    return decision


def install(fraction: float, loss_condition: bool = False) -> None:
    """Patch the rule into BB's default control for the rest of the process. The rule lives in the torch decision:
    the Triton decision kernels are turned off, and a device clock (``capturable=True``) is refused."""
    global FRACTION, LOSS_CONDITION
    FRACTION, LOSS_CONDITION = fraction, loss_condition
    BB.step = step
    SafeguardControl.diverged = diverged
    SafeguardControl._decision_kernels = lambda self, buffers: None


def main(argv: list[str]) -> None:
    """FRACTION OUT_DIR SETTINGS SEEDS LRS [loss]: every run saved as the suite saves it, as bb[dead<FRACTION>] (or
    bb[dead<FRACTION>-loss] with the loss condition)."""
    install(float(argv[0]), len(argv) > 5 and argv[5] == "loss")
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    lrs = [float(x) for x in argv[4].split(",")]
    for setting in argv[2].split(","):
        for seed in [int(s) for s in argv[3].split(",")]:
            for lr in lrs:
                run = suite.Run(setting, f"bb[dead{argv[0]}{'-loss' if LOSS_CONDITION else ''}]", lr, seed)
                path = out / f"{run.name}.json"
                if path.exists():
                    continue
                record = suite.train(run)
                path.write_text(json.dumps(record))
                print(setting, lr, seed, round(record["score"], 2), record["rolled_back_epochs"], flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
