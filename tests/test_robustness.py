"""The robustness suite (benchmarks/robustness/) in quick mode: every setting's model trains, the report is
written with its tables and figure, and saved runs are not trained again."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROBUSTNESS = REPO / "benchmarks" / "robustness"
sys.path.insert(0, str(ROBUSTNESS))


import suite  # noqa: E402  (by its own name: the suite's worker processes import it so)

# report.py under a name of its own: the paper scripts' report.py is imported as "report" by other tests.
_spec = importlib.util.spec_from_file_location("robustness_report", ROBUSTNESS / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_quick_suite_trains_every_setting_and_reports(tmp_path) -> None:
    pytest.importorskip("sklearn", reason="the digits setting needs scikit-learn (pip install -e '.[bench]')")
    runs = tmp_path / "runs"
    argv = ["--quick", "--out", str(runs), "--lrs", "0.1,10", "--seeds", "0", "--jobs", "1"]
    suite.main([*argv, "--methods", "bb,sgdm"])
    files = sorted(runs.glob("*.json"))
    assert len(files) == len(suite.SETTINGS) * 2 * 2
    records = report.load_runs(runs)
    for (_setting, method, lr, _seed), record in records.items():
        assert record["quick"] and record["epochs"] == suite.QUICK_EPOCHS
        assert len(record["train_loss"]) == len(record["epoch_seconds"]) == suite.QUICK_EPOCHS
        if method == "bb":
            assert record["bb_lr_history"][0] == lr and len(record["bb_lr_history"]) == suite.QUICK_EPOCHS
            assert isinstance(record["rolled_back_epochs"], list)
    # BB's default ends every quick run with finite weights, even from η0 = 10 (SGD with momentum does not).
    assert all(r["test_accuracy"] is not None for (s, m, lr, seed), r in records.items() if m == "bb")
    mtimes = [f.stat().st_mtime_ns for f in files]
    suite.main([*argv, "--methods", "bb,sgdm"])
    assert [f.stat().st_mtime_ns for f in files] == mtimes

    out = tmp_path / "robustness.md"
    text = report.write_report(runs, out, out.with_suffix(".png"))
    assert "## bn-cnn:" in text and "| bb |" in text and "| sgdm |" in text
    assert "## The promise" in text and "## Collapsed runs per method" in text
    assert out.with_suffix(".png").read_bytes().startswith(PNG_SIGNATURE)


def test_suite_rejects_unknown_names(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        suite.main(["--methods", "bb,sgd-typo", "--quick"])
    assert exit_.value.code == 2 and "unknown method sgd-typo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        suite.main(["--lrs", "0.1,x", "--quick"])
    assert "--lrs takes numbers" in capsys.readouterr().err
