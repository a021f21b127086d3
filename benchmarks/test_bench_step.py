"""pytest-benchmark cases for the optimizer step and the BB epoch end: the workloads of bench_step.py.

Not collected by the default ``pytest`` run (testpaths = ["tests"]); run them from the repository root::

    python -m pytest benchmarks/test_bench_step.py                        # mlp and resnet18, fp32 and bf16
    BENCH_FULL=1 python -m pytest benchmarks/test_bench_step.py           # + resnet50 (+ the 2^27 tensor on CUDA)
    python -m pytest benchmarks/test_bench_step.py --benchmark-disable    # smoke test: every case runs once

Each round is one call; on CUDA it ends with a synchronize, so a round also pays the host overhead that
bench_step.py's back-to-back samples overlap with device work. Use bench_step.py for the reported numbers
(bandwidth, % of copy, ratios); these cases are for pytest-benchmark's history and comparisons
(``--benchmark-autosave``, ``--benchmark-compare``).
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch
from bench_step import BB_IMPLS, DTYPES, available_impls, build_workload, bytes_per_element
from shapes import parameter_set

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
