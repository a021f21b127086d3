"""The first version of the dead-unit prototype (../dead_units.py has the one the report judges): here a dead-unit
rollback also replaces the consequences of a period rolled back for another reason (a rise's rollback became a
divergence's, with its cap). A prototype of a dead-unit rule for the default rate control, not in the optimizer: a
period whose last step's gradient has fewer than FRACTION times as many values different from zero as the gradient
at the last good period end (the first step's before any) counts as diverged, as a non-finite gradient average does:
it is rolled back and the rate backs off. A ReLU unit that no input of a batch activates gives its weights exactly
zero gradients; when a rate kills many units at once the share of non-zero values collapses
(2026-12-05_cpu_dead_units.md).

The count is taken on the host at every step (a prototype: the optimizer would take it in its period-end pass).
Each run is saved as the suite saves it, as method ``bb[dead<FRACTION>]`` (BB's default otherwise):

    python benchmarks/results/dead_unit_runs/first_version/dead_units.py 0.5 OUT_DIR SETTINGS 0,1 0.001,0.01,0.1,1,10
"""

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "robustness"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import suite  # noqa: E402
from dead_units import step  # noqa: E402  (the same count; only the decision below differs)

from bbfused import BB  # noqa: E402
from bbfused.control.safeguard import SafeguardControl  # noqa: E402

FRACTION = float(sys.argv[1])
diverged_without_count = SafeguardControl.diverged


def diverged(self: SafeguardControl, sums: torch.Tensor, clock):
    dead = self.live_now < FRACTION * self.live_reference
    if dead:
        sums = sums.clone()
        sums[3] = math.inf  # the divergence a non-finite gradient average is
    decision = diverged_without_count(self, sums, clock)
    if not bool(decision[0]):
        self.live_reference = self.live_now
    return decision


BB.step = step
SafeguardControl.diverged = diverged
out = Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
lrs = [float(x) for x in sys.argv[5].split(",")]
for setting in sys.argv[3].split(","):
    for seed in [int(s) for s in sys.argv[4].split(",")]:
        for lr in lrs:
            run = suite.Run(setting, f"bb[dead{sys.argv[1]}]", lr, seed)
            path = out / f"{run.name}.json"
            if path.exists():
                continue
            record = suite.train(run)
            path.write_text(json.dumps(record))
            print(setting, lr, seed, round(record["score"], 2), record["rolled_back_epochs"], flush=True)
