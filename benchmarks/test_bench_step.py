"""pytest-benchmark cases for the optimizer step and the BB epoch end: the workloads of bench_step.py.

Not collected by the default ``pytest`` run (testpaths = ["tests"]); run them from the repository root::

    python -m pytest benchmarks/test_bench_step.py                        # mlp and resnet18, fp32 and bf16
    BENCH_FULL=1 python -m pytest benchmarks/test_bench_step.py           # + resnet50 (+ the 2^27 tensor on CUDA)
    python -m pytest benchmarks/test_bench_step.py --benchmark-disable    # smoke test: every case runs once

Each round is one call; on CUDA it ends with a synchronize, so a round also pays the host overhead that
bench_step.py's back-to-back samples overlap with device work. Use bench_step.py for the reported numbers
(bandwidth, % of copy, ratios); these cases are for pytest-benchmark's history and comparisons
(``--benchmark-autosave``, ``--benchmark-compare``).

The plain tests at the end check bench_step.py's Adam-scaled rows (``bb-<backend>-adam``, ``adam-fused``) without
timing them: their bytes floors, their names, and a tiny ``--quick`` run that must give them finite ratios.
"""

from __future__ import annotations

import itertools
import math
import os

import bench_step
import pytest
import torch
from bench_step import BB_IMPLS, DTYPES, available_impls, build_workload, bytes_per_element
from shapes import parameter_set

from bbfused.backends import cpp_backend

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FULL = os.environ.get("BENCH_FULL") == "1"
SETS = ["mlp", "resnet18"]
if FULL:
    SETS += ["resnet50", "flat"] if DEVICE.type == "cuda" else ["resnet50"]
ROTATE_BYTES = 512 * 2**20  # as bench_step.py: one cycle over the copies moves more than the caches hold
ROUNDS, WARMUP_ROUNDS = 20, 3

AVAILABLE, NOT_AVAILABLE = available_impls(DEVICE)


def _cases() -> list:
    cases = []
    for set_name, dtype_name, impl in itertools.product(SETS, DTYPES, [*AVAILABLE, *NOT_AVAILABLE]):
        for op in ("step", "epoch_end") if impl in BB_IMPLS else ("step",):
            marks = [pytest.mark.skip(reason=NOT_AVAILABLE[impl])] if impl in NOT_AVAILABLE else []
            cases.append(
                pytest.param(set_name, dtype_name, impl, op, marks=marks, id=f"{set_name}-{dtype_name}-{impl}-{op}")
            )
    return cases


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize(("set_name", "dtype_name", "impl", "op"), _cases())
def test_optimizer(benchmark, set_name: str, dtype_name: str, impl: str, op: str) -> None:
    shapes = parameter_set(set_name)
    dtype = DTYPES[dtype_name]
    # build_workload raises unless one step changes every parameter tensor: a no-op is never timed.
    workload = build_workload(impl, shapes, dtype, DEVICE, ROTATE_BYTES)
    steps = workload.step_calls()
    calls = steps if op == "step" else workload.epoch_end_calls()
    index = itertools.count()
    current = 0

    def setup() -> None:
        # Untimed: the next parameter copy; before an epoch end, a step of the same optimizer (as in training).
        nonlocal current
        current = next(index) % len(calls)
        if op == "epoch_end":
            steps[current]()
        _synchronize()

    def target() -> None:
        calls[current]()
        _synchronize()

    benchmark.group = f"{set_name} {dtype_name} {op}"
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)

    numel = sum(math.prod(shape) for shape in shapes)
    bpe = bytes_per_element(impl, op, dtype)
    benchmark.extra_info.update(bytes_per_element=bpe, numel=numel, copies=len(calls))
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["GB/s"] = bpe * numel / benchmark.stats.stats.median / 1e9


# ----------------------------------------------------------------------------------------------- the Adam-scaled rows
CPU = torch.device("cpu")


@pytest.mark.parametrize("safeguard", [False, True], ids=["paper", "default"])
def test_adam_bytes_floors(safeguard: bool) -> None:
    """BB's Adam-scaled step reads θ, grad, g, m, v and writes θ, g, m, v (3p + 6e); its epoch end is always the
    default control's two passes, whose measuring pass reads v too (4p + 5e, whatever --safeguard says); torch's
    fused Adam moves 7p, its state in the parameter dtype."""
    floors = {
        ("bb-cpp-adam", "step", torch.float32): 36,
        ("bb-cpp-adam", "step", torch.bfloat16): 30,
        ("bb-triton-adam", "step", torch.float32): 36,
        ("bb-cpp-adam", "epoch_end", torch.float32): 36,
        ("bb-cpp-adam", "epoch_end", torch.bfloat16): 28,
        ("adam-fused", "step", torch.float32): 28,
        ("adam-fused", "step", torch.bfloat16): 14,
        ("bb-cpp", "step", torch.float32): 20,
        ("bb-cpp-momentum", "step", torch.float32): 28,
        ("bb-cpp-momentum", "step", torch.bfloat16): 22,
        ("bb-cpp", "epoch_end", torch.float32): 32 if safeguard else 28,
        ("sgd-fused", "step", torch.float32): 20,
        ("sgd-fused", "step", torch.bfloat16): 10,
    }
    for (impl, op, dtype), floor in floors.items():
        assert bytes_per_element(impl, op, dtype, safeguard) == floor, (impl, op, dtype)


def test_adam_implementation_names() -> None:
    for backend in ("eager", "triton", "cpp"):
        impl = f"bb-{backend}-adam"
        assert impl in BB_IMPLS and impl in bench_step.IMPLS
        assert bench_step.backend_of(impl) == backend
        assert bench_step.has_momentum(impl) and bench_step.is_adam(impl)
        assert bench_step.runs_safeguard(impl, False)  # the paper's method refuses a preconditioner
        assert bench_step.eager_twin(impl) == "bb-eager-adam"
    assert "adam-fused" in bench_step.IMPLS and "adam-fused" not in BB_IMPLS
    assert bench_step.is_adam("adam-fused") and bench_step.eager_twin("adam-fused") == "bb-eager-adam"
    for impl in ("bb-cpp", "bb-cpp-momentum", "sgd-fused"):
        assert not bench_step.is_adam(impl) and not bench_step.runs_safeguard(impl, False)
    assert bench_step.backend_of("bb-cpp-momentum") == "cpp" and bench_step.has_momentum("bb-cpp-momentum")
    assert not bench_step.has_momentum("bb-cpp")
    assert bench_step.eager_twin("bb-cpp-momentum") == "bb-eager-momentum"
    assert bench_step.eager_twin("bb-cpp") == bench_step.eager_twin("sgd-fused") == "bb-eager"
    args = bench_step.parse_args(["--device", "cpu", "--impls", "bb-cpp-adam", "adam-fused"])
    assert args.impls == ["bb-cpp-adam", "adam-fused"]


def test_adam_workload_runs_the_preconditioned_step() -> None:
    """The timed optimizer is BB with momentum 0.9 and Adam's scaling under the default control, stepped with a
    loss; torch's reference is its fused Adam."""
    workload = build_workload("bb-cpp-adam", [(33,), (4, 5)], torch.float32, CPU, 0)
    (optimizer,) = workload.optimizers
    assert optimizer._buffers.scaling.name == "adam" and optimizer._buffers.momentum == bench_step.MOMENTUM
    assert workload.loss is not None
    (buffer,) = optimizer._buffers.buffers
    before = buffer.second_moment.clone()  # build_workload took one step already
    assert before.any()
    workload.step_calls()[0]()
    assert not torch.equal(buffer.second_moment, before)
    workload.epoch_end_calls()[0]()
    (reference,) = build_workload("adam-fused", [(33,)], torch.float32, CPU, 0).optimizers
    assert isinstance(reference, torch.optim.Adam) and reference.defaults["fused"]


def test_adam_update_check_on_bf16_still_catches_a_no_op() -> None:
    """In bf16 the first Adam-scaled step can leave the MLP's 10 biases as they were (it moves them 1e-4): the
    workload still builds, on the second moment's change, and a step that writes nothing still raises."""
    workload = build_workload("bb-cpp-adam", parameter_set("mlp"), torch.bfloat16, CPU, 0)
    (optimizer,) = workload.optimizers
    params = workload.params[0]
    written = [optimizer.state[p][bench_step.SECOND_MOMENT_KEY] for p in params]
    with pytest.raises(RuntimeError, match="unchanged"):
        bench_step.check_updates(params, lambda: None, written)


def test_quick_cpu_run_has_the_adam_rows(monkeypatch, capsys) -> None:
    # The C++ kernels' build: keep using the existing one, not a new compile.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(cpp_backend.build_directory().parent))
    impls = ["bb-eager-adam", "bb-cpp-adam", "sgd-fused", "adam-fused"]
    argv = ["--device", "cpu", "--quick", "--sets", "flat", "--flat-log2", "12", "--impls", *impls]
    argv += ["--seconds", "0.05", "--samples", "3", "--copy-log2", "12", "--rotate-mib", "0", "--out", "-"]
    report = bench_step.main(argv)
    failed = {row: why for row, why in report.not_timed.items() if why.startswith("failed")}
    assert not failed, failed
    rows = {(r.dtype, r.impl, r.op): r for r in report.rows}
    for dtype_name, dtype in DTYPES.items():
        for impl in ("bb-eager-adam", "bb-cpp-adam"):
            step, end = rows[dtype_name, impl, "step"], rows[dtype_name, impl, "epoch_end"]
            assert step.bytes_per_element == bytes_per_element(impl, "step", dtype)
            assert end.bytes_per_element == bytes_per_element(impl, "epoch_end", dtype)
            for ratio in (step.time_over_adam_fused, step.time_over_sgd_fused, end.time_over_own_step):
                assert ratio is not None and math.isfinite(ratio) and ratio > 0
            assert end.time_over_adam_fused is None  # a step's ratio
        adam = rows[dtype_name, "adam-fused", "step"]
        assert adam.time_over_adam_fused == 1.0 and math.isfinite(adam.time_over_sgd_fused)
        assert math.isfinite(rows[dtype_name, "bb-cpp-adam", "step"].x_faster_than_eager)
        assert rows[dtype_name, "sgd-fused", "step"].time_over_adam_fused is None  # not an Adam-scaled step
    assert report.targets == []  # the CPU targets are bb-cpp's and bb-cpp-momentum's; the Adam rows add none
    assert "time / Adam fused" in capsys.readouterr().out
