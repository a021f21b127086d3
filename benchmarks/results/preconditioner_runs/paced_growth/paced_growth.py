"""The paced-growth variant of 2026-12-05_cpu_preconditioner_adam.md: BB(preconditioner="adam") with its next_rate
patched (after the search: no growth when the period's mean loss rose; growth at most by the factor it fell), each run
saved as the suite saves it. Not in the optimizer.

    python benchmarks/results/preconditioner_runs/paced_growth/paced_growth.py holdpace OUT_DIR SETTINGS 0,1
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2].parent / "robustness"))
import suite  # noqa: E402
import torch  # noqa: E402

from bbfused.control import safeguard  # noqa: E402
from bbfused.control.preconditioned import PreconditionedControl  # noqa: E402

VARIANT = sys.argv[1]
orig_div = safeguard.SafeguardControl.diverged
orig_next = safeguard.SafeguardControl.next_rate


def diverged(self, sums, clock, live=None):
    out = orig_div(self, sums, clock, live)
    mean, complete, initial, last, _ = self._epoch_loss(clock.closing_steps)
    self._progress = (mean, self.last_loss.clone(), complete)
    return out


def next_rate(self, sums, diverged, rose, steps, bounds, search_open=True, risen=None):
    new, searching, ceiling = orig_next(self, sums, diverged, rose, steps, bounds, search_open, risen)
    if not isinstance(self, PreconditionedControl):
        return new, searching, ceiling
    mean, previous, complete = self._progress
    r = self.rate
    fell = previous / mean  # > 1 when the loss fell
    ok = complete & torch.isfinite(fell) & ~diverged & ~searching
    if "hold" in VARIANT:  # any rise: no growth
        new = torch.where(ok & (mean > previous), torch.minimum(new, r), new)
    if "pace" in VARIANT:  # growth no faster than the loss falls
        new = torch.where(ok & (new > r), torch.minimum(new, r * torch.clamp(fell, min=1.0)), new)
    return new, searching, ceiling


safeguard.SafeguardControl.diverged = diverged
safeguard.SafeguardControl.next_rate = next_rate
out = Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
settings = sys.argv[3].split(",")
seeds = [int(s) for s in sys.argv[4].split(",")]
for setting in settings:
    for seed in seeds:
        run = suite.Run(setting, f"bb[{VARIANT}]", 0.001, seed)
        path = out / f"{run.name}.json"
        if path.exists():
            continue
        record = suite.train(run, bb_kwargs={"preconditioner": "adam"})
        path.write_text(json.dumps(record))
        print(setting, seed, round(record["score"], 2), flush=True)
