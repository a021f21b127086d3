"""benchmarks/bench_step.py's output location and its target verdicts (fast CPU checks, not timings).

A run without ``--out`` must write outside the repository (a clone stays clean); the targets must read as what
they measure, with a plain verdict.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import pytest
import torch

from bbfused.backends import cpp_backend

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_step  # noqa: E402  (beside shapes.py, which it imports by that name)

CPU = torch.device("cpu")


def _is_inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def test_default_prefix_follows_xdg_cache_home(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    prefix = bench_step.default_out_prefix("cpu", quick=True, date=datetime.date(2026, 1, 2))
    assert prefix == tmp_path / "cache" / "bbfused" / "bench" / "2026-01-02_cpu_quick"
    assert bench_step.default_out_prefix("cuda", quick=False).name.endswith("_cuda")


def test_default_prefix_without_xdg_is_in_the_home_cache(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    prefix = bench_step.default_out_prefix("cpu", quick=False)
    assert prefix.parent == tmp_path / ".cache" / "bbfused" / "bench"
    assert not _is_inside(prefix, REPO)


def test_default_prefix_is_never_inside_the_repository(monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(BENCHMARKS / "results"))  # a cache pointed into the clone
    prefix = bench_step.default_out_prefix("cpu", quick=True)
    assert not _is_inside(prefix, REPO)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # ignored, as the XDG specification says
    monkeypatch.setenv("HOME", str(REPO))
    assert not _is_inside(bench_step.default_out_prefix("cpu", quick=True), REPO)


def test_quick_run_writes_outside_the_repository(monkeypatch, tmp_path, capsys) -> None:
    # The C++ kernels' build also lives under XDG_CACHE_HOME: keep using the existing one, not a new compile.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cpp_backend.build_directory().parent))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    results = BENCHMARKS / "results"
    before = set(results.glob("*_quick*"))
    argv = ["--device", "cpu", "--quick", "--sets", "mlp", "--dtypes", "fp32", "--impls", "bb-eager"]
    argv += ["--seconds", "0.05", "--samples", "3", "--copy-log2", "12", "--rotate-mib", "0"]
    bench_step.main(argv)
    written = sorted(p.name for p in (tmp_path / "cache" / "bbfused" / "bench").iterdir())
    today = datetime.date.today().isoformat()
    assert written == [f"{today}_cpu_quick.{suffix}" for suffix in ("csv", "json", "md")]
    assert set(results.glob("*_quick*")) == before
    assert not (tmp_path / "home").exists()
    assert str(tmp_path / "cache" / "bbfused" / "bench") in capsys.readouterr().err  # it says where it wrote


@pytest.mark.parametrize(
    ("target", "verdict", "line"),
    [
        (
            bench_step.Target("Step time against torch's fused SGD", "mlp fp32 step", 1.2, 1.0, False),
            "not met: 20 % over",
            "Step time against torch's fused SGD (mlp fp32 step): 1.2x (target ≤ 1x): not met: 20 % over",
        ),
        (
            bench_step.Target("Step time against torch's fused SGD", "mlp fp32 step", 0.8, 1.0, False),
            "met",
            "Step time against torch's fused SGD (mlp fp32 step): 0.8x (target ≤ 1x): met",
        ),
        (
            bench_step.Target("Step speed-up over the eager backend", "resnet50 fp32 step", 8.0, 10.0, True),
            "not met: 20 % short",
            "Step speed-up over the eager backend (resnet50 fp32 step): 8x (target ≥ 10x): not met: 20 % short",
        ),
        (
            bench_step.Target("Step bandwidth against copy bandwidth", "flat fp32 step", 93.0, 90.0, True, unit="%"),
            "met",
            "Step bandwidth against copy bandwidth (flat fp32 step): 93 % (target ≥ 90 %): met",
        ),
    ],
)
def test_target_verdict_reads_plainly(target, verdict: str, line: str) -> None:
    assert target.verdict() == verdict
    assert target.describe() == line
    assert target.met == (verdict == "met")
    assert "issue" not in line.lower() and "missed" not in line.lower()


def _row(impl: str, op: str, median_s: float) -> bench_step.Row:
    timing = bench_step.Timing([median_s] * 3, 1)
    bpe = bench_step.bytes_per_element(impl, op, torch.float32)
    return bench_step.make_row("mlp", "fp32", impl, op, [(1000,)], bpe, 1, timing)


def test_report_names_targets_by_what_they_measure() -> None:
    rows = [
        _row("bb-eager", "step", 3e-3),
        _row("bb-cpp", "step", 1e-3),  # 3x faster than eager: met; 2x torch's fused SGD time: not met
        _row("sgd-fused", "step", 0.5e-3),
    ]
    bench_step.add_ratios(rows, copy_gb_per_s=10.0)
    targets = bench_step.evaluate_targets(rows, CPU)
    assert [(t.name, t.bound, t.verdict()) for t in targets] == [
        ("Step time against torch's fused SGD", 1.0, "not met: 100 % over"),
        ("Step speed-up over the eager backend", 2.0, "met"),
    ]
    text = bench_step.format_report(bench_step.Report({}, rows, {}, targets), markdown=True)
    assert "- Step time against torch's fused SGD (mlp fp32 step): 2x (target ≤ 1x): not met: 100 % over" in text
    assert "issue" not in text.lower() and "MISSED" not in text


def test_no_issue_references_in_the_script() -> None:
    source = (BENCHMARKS / "bench_step.py").read_text()
    assert "issue" not in source.lower()
    assert "MISSED" not in source


def test_momentum_rows_move_28_bytes_and_are_bounded_by_the_bytes_floor() -> None:
    """BB with momentum reads θ, grad, g, m and writes θ, g, m: 28 B per fp32 element against the fused SGD's 20,
    so its time target against torch's is the bytes floor 1.4x (bf16: 22 B against 10, 2.2x)."""
    assert bench_step.bytes_per_element("bb-cpp-momentum", "step", torch.float32) == 28
    assert bench_step.bytes_per_element("bb-cpp-momentum", "step", torch.bfloat16) == 22
    assert bench_step.bytes_per_element("sgd-fused", "step", torch.float32) == 20
    assert bench_step.backend_of("bb-cpp-momentum") == "cpp" and bench_step.backend_of("bb-eager") == "eager"
    rows = [
        _row("bb-eager-momentum", "step", 3e-3),
        _row("bb-cpp-momentum", "step", 0.75e-3),
        _row("sgd-fused", "step", 0.5e-3),
    ]
    bench_step.add_ratios(rows, copy_gb_per_s=10.0)
    assert rows[1].x_faster_than_eager == 4.0  # against the eager backend with momentum, not without
    targets = bench_step.evaluate_targets(rows, CPU)
    assert [(t.row, t.value, t.bound, t.verdict()) for t in targets] == [
        ("mlp fp32 step", 1.5, 1.4, "not met: 7 % over")
    ]
    assert targets[0].name == "Step time with momentum against torch's fused SGD, bound: the bytes floor"


@pytest.mark.parametrize("safeguard", [False, True], ids=["paper", "default"])
def test_momentum_workload_steps_with_momentum(safeguard: bool) -> None:
    """The timed BB-with-momentum optimizer runs the fused momentum step: its buffers have momentum and a step
    writes them."""
    workload = bench_step.build_workload("bb-cpp-momentum", [(33,), (4, 5)], torch.float32, CPU, 0, safeguard)
    (optimizer,) = workload.optimizers
    (buffer,) = optimizer._buffers.buffers
    assert optimizer._buffers.momentum == bench_step.MOMENTUM and buffer.momentum is not None
    before = buffer.momentum.clone()  # build_workload took one step already
    assert before.any()
    workload.step_calls()[0]()
    assert not torch.equal(buffer.momentum, before)
