"""The no-growth variant of 2026-12-05_cpu_preconditioner_adam.md: BB(preconditioner="adam") with the control's growth
limit after the search (PreconditionedControl.RATE_GROWTH_LIMIT, 1.25) set to LIMIT, each run saved as the suite saves
it. Not in the optimizer.

    python benchmarks/results/preconditioner_runs/no_growth/no_growth.py 1.0 OUT_DIR SETTINGS 0,1
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2].parent / "robustness"))
import suite  # noqa: E402

from bbfused.control.preconditioned import PreconditionedControl  # noqa: E402

LIMIT = sys.argv[1]
PreconditionedControl.RATE_GROWTH_LIMIT = float(LIMIT)
out = Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
for setting in sys.argv[3].split(","):
    for seed in [int(s) for s in sys.argv[4].split(",")]:
        run = suite.Run(setting, f"bb[growth{LIMIT}]", 0.001, seed)
        path = out / f"{run.name}.json"
        if path.exists():
            continue
        record = suite.train(run, bb_kwargs={"preconditioner": "adam"})
        path.write_text(json.dumps(record))
        print(setting, seed, round(record["score"], 2), flush=True)
