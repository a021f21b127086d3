"""The suite's runs of BB's default that changed with the closing loss (2026-12-06_cpu_closing_loss.md): every
``bb`` run file of ``robustness_runs/`` against its version at a commit before the change, both trained on the same
CPU. ``python benchmarks/results/closing_loss_runs/compare.py 394dba7``"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(RESULTS.parent / "robustness"))

from report import best_reference, load_runs  # noqa: E402
from suite import LRS, RUNS, SEEDS  # noqa: E402


def at_commit(commit: str, path: Path) -> dict:
    relative = path.relative_to(RESULTS.parents[1]).as_posix()
    shown = subprocess.run(["git", "show", f"{commit}:{relative}"], capture_output=True, text=True, check=True)
    return json.loads(shown.stdout)


def main(commit: str) -> None:
    references = load_runs(RUNS)
    rows, runs, cpus = [], 0, set()
    for path in sorted(RUNS.glob("*_bb_lr*_seed*.json")):
        new, old = json.loads(path.read_text()), at_commit(commit, path)
        runs += 1
        cpus.update({new.get("cpu"), old.get("cpu")})
        if new["bb_lr_history"] == old["bb_lr_history"] and new["score"] == old["score"]:
            continue
        best = best_reference(references, new["run"]["setting"], LRS, SEEDS)
        rows.append((path.stem, old, new, best.mean))
    print(f"{len(rows)} of {runs} runs changed (trained on: {', '.join(sorted(c for c in cpus if c))}).")
    print()
    print("| run | gap before | gap after | rolled-back epochs before | after |")
    print("|---|---|---|---|---|")
    for name, old, new, best in rows:
        print(
            f"| {name} | {old['score'] - best:+.2f} | {new['score'] - best:+.2f} "
            f"| {old['rolled_back_epochs']} | {new['rolled_back_epochs']} |"
        )
    up = sum(new["score"] > old["score"] for _, old, new, _ in rows)
    down = sum(new["score"] < old["score"] for _, old, new, _ in rows)
    crossed = sum((old["score"] - best < -3) != (new["score"] - best < -3) for _, old, new, best in rows)
    rolled = [(len(old["rolled_back_epochs"]), len(new["rolled_back_epochs"])) for _, old, new, _ in rows]
    print()
    print(
        f"Up {up}, down {down}, level {len(rows) - up - down}; runs crossing the 3-point line: {crossed}; "
        f"rolled-back epochs in the changed runs: {sum(o for o, _ in rolled)} before, "
        f"{sum(n for _, n in rolled)} after."
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "394dba7")
