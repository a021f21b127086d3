"""``benchmarks/gpu_check.py --dry-run``: every section of the GPU check at toy sizes on the CPU (Triton through its
interpreter), so that the one run a lent GPU gets is not wasted on a crash; and a failing section is recorded while
the others still run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ["launches", "no_sync", "rounding", "step_bench", "block_sweep", "capture", "end_to_end", "int64", "tests"]


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict[str, str], str]:
    out = tmp_path / "gpu_check.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OUT", None)  # the script mirrors its report into $OUT when that is a folder
    command = [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *args]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    report = out.read_text()
    statuses = dict(re.findall(r"^\| (\w+) \| (\w+) \| [\d.]+ \|", report, flags=re.MULTILINE))
    return result, statuses, report


def test_dry_run_runs_every_section(tmp_path: Path) -> None:
    result, statuses, report = _run(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert {name: statuses.get(name) for name in SECTIONS} == {name: "ok" for name in SECTIONS}, report
    for name in SECTIONS:
        assert f"## {name}\n" in report
    assert "## What only a GPU can confirm" in report
    assert "**FAILED**" not in report


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path: Path) -> None:
    result, statuses, report = _run(tmp_path, "--sections", "launches,rounding,int64", "--fail-section", "rounding")
    assert result.returncode != 0
    assert statuses == {"launches": "ok", "rounding": "FAILED", "int64": "ok"}, report
    assert "Traceback" in report and "--fail-section rounding" in report
