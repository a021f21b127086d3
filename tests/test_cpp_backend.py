"""The cpp backend beyond the shared comparisons of test_backends.py: thread-count independence, the custom-op
registration, input checks, and what happens without a compiler, without ninja, or with a failing build."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from backend_calls import backend_step

from bbfused import BB
from bbfused.backends import BackendUnavailableError, cpp_backend, load_backend
from bbfused.backends.eager import EagerBackend

CPU = torch.device("cpu")
# Several epoch-end chunks (2**15 elements each) plus a ragged tail, and enough work to split over threads.
N = 5 * 2**15 + 37
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def random_buffers(dtypes: list[torch.dtype], n: int = N, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=generator, dtype=torch.float64).to(dtype) for dtype in dtypes]


@pytest.fixture
def num_threads():
    """Sets torch's intra-op thread count for one test and restores it afterwards."""
    original = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(original)


@pytest.fixture
def fresh_load(monkeypatch):
    """A process in which the ops library was never loaded and no prebuilt one exists (restored afterwards)."""
    monkeypatch.setattr(cpp_backend, "_load_outcome", cpp_backend._NOT_TRIED)
    monkeypatch.setattr(cpp_backend, "_prebuilt_library", lambda: None)


def run_step(dtype: torch.dtype, grad_scale: torch.Tensor | None) -> list[torch.Tensor]:
    param, grad, ema = random_buffers([dtype, dtype, state_dtype(dtype)])
    lr = torch.tensor(0.05, dtype=torch.float64)
    backend_step(cpp_backend.CppBackend(), param, grad, ema, lr, 1e-2, 0.1, grad_scale, torch.zeros(()))
    return [param, ema]


@pytest.mark.parametrize("scale", [None, 8.0], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_same_bits_on_one_and_two_threads(dtype: torch.dtype, scale: float | None, num_threads) -> None:
    grad_scale = None if scale is None else torch.tensor(scale)
    results = []
    for threads in (1, 2):
        num_threads(threads)
        results.append(run_step(dtype, grad_scale))
    for one, two in zip(*results):
        assert torch.equal(one, two)
    # And the values are the reference's.
    param, grad, ema = random_buffers([dtype, dtype, state_dtype(dtype)])
    lr = torch.tensor(0.05, dtype=torch.float64)
    backend_step(EagerBackend(), param, grad, ema, lr, 1e-2, 0.1, grad_scale, torch.zeros(()))
    tolerance = {} if dtype in (torch.float32, torch.float64) else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(results[0][0], param, **tolerance)
    torch.testing.assert_close(results[0][1], ema, **tolerance)
    assert not torch.equal(param, random_buffers([dtype])[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_epoch_end_same_bits_on_one_and_two_threads(dtype: torch.dtype, num_threads) -> None:
    dtypes = [dtype, state_dtype(dtype), dtype, state_dtype(dtype)]
    results = []
    for threads in (1, 2):
        num_threads(threads)
        buffers = random_buffers(dtypes)
        results.append((cpp_backend.CppBackend().epoch_end(*buffers), buffers))
    (sums_one, buffers_one), (sums_two, buffers_two) = results
    assert torch.equal(sums_one, sums_two)
    for one, two in zip(buffers_one, buffers_two):
        assert torch.equal(one, two)
    eager_sums = EagerBackend().epoch_end(*random_buffers(dtypes))
    torch.testing.assert_close(sums_one, eager_sums, rtol=1e-10, atol=0)
    param, ema, prev_params, prev_ema = buffers_one
    original = random_buffers(dtypes)
    assert torch.equal(prev_params, original[0]) and torch.equal(prev_ema, original[1])
    assert torch.count_nonzero(ema) == 0


def test_ops_registered_with_mutation_schemas() -> None:
    assert load_backend("cpp", CPU).name == "cpp"
    written = {
        torch.ops.bbfused.cpp_step.default: {"param", "ema", "nonfinite", "momentum_buffer"},
        torch.ops.bbfused.cpp_epoch_end.default: {"ema", "prev_params", "prev_ema"},
        torch.ops.bbfused.cpp_epoch_measure.default: {"ema", "prev_ema"},
        torch.ops.bbfused.cpp_epoch_commit.default: {"param", "prev_params"},
    }
    for op, expected in written.items():
        mutated = {a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert mutated == expected
    assert [str(r.type) for r in torch.ops.bbfused.cpp_epoch_end.default._schema.returns] == ["Tensor"]


def test_opcheck_schema_fake_tensor_and_autograd_registration() -> None:
    load_backend("cpp", CPU)
    param, grad, ema, prev_params, prev_ema = random_buffers([torch.float32] * 5, n=100)
    lr = torch.tensor(0.1, dtype=torch.float64)
    step_args = (param, grad, ema, lr, 0.01, 0.1, torch.tensor(4.0), torch.tensor(0.0), None)
    counted = (param, grad, ema, lr, 0.01, 0.1, None, None, torch.zeros((), dtype=torch.int64))
    momentum_buffer = random_buffers([torch.float32], n=100, seed=1)[0]
    heavy_ball = (*step_args, momentum_buffer, 0.9, False)
    nesterov = (*counted, momentum_buffer, 0.9, True)
    for op, args in (
        (torch.ops.bbfused.cpp_step.default, step_args),
        (torch.ops.bbfused.cpp_step.default, counted),
        (torch.ops.bbfused.cpp_step.default, heavy_ball),
        (torch.ops.bbfused.cpp_step.default, nesterov),
        (torch.ops.bbfused.cpp_epoch_end.default, (param, ema, prev_params, prev_ema)),
        (torch.ops.bbfused.cpp_epoch_measure.default, (param, ema, prev_params, prev_ema)),
        (torch.ops.bbfused.cpp_epoch_commit.default, (param, prev_params, torch.tensor(True))),
    ):
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, results


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy_ball", "nesterov"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_momentum_step_same_bits_on_one_and_two_threads(dtype: torch.dtype, nesterov: bool, num_threads) -> None:
    """With momentum and the non-finite skip: the same bits on 1 and 2 threads, and the eager reference's (every
    dtype: the 16-bit stores round as torch's conversions do)."""
    dtypes = [dtype, dtype, state_dtype(dtype), state_dtype(dtype)]
    lr = torch.tensor(0.05, dtype=torch.float64)

    def run(backend) -> list[torch.Tensor]:
        param, grad, ema, momentum_buffer = random_buffers(dtypes)
        grad[[5, N // 2, N - 1]] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
        count = torch.zeros((), dtype=torch.int64)
        for _ in range(2):
            backend_step(backend, param, grad, ema, lr, 1e-2, 0.1, None, None, count, momentum_buffer, 0.9, nesterov)
        return [param, ema, momentum_buffer, count]

    results = []
    for threads in (1, 2):
        num_threads(threads)
        results.append(run(cpp_backend.CppBackend()))
    reference = run(EagerBackend())
    for one, two, want in zip(*results, reference):
        assert torch.equal(one, two) and torch.equal(one, want)
    assert int(reference[-1]) == 6
    assert not torch.equal(results[0][2], random_buffers(dtypes)[3])


def test_torch_compile_traces_the_ops() -> None:
    backend = load_backend("cpp", CPU)

    def step_and_epoch_end(param, grad, ema, lr, prev_params, prev_ema):
        backend_step(backend, param, grad, ema, lr, 0.01, 0.1)
        return backend.epoch_end(param, ema, prev_params, prev_ema)

    compiled = torch.compile(step_and_epoch_end, backend="aot_eager", fullgraph=True)
    lr = torch.tensor(0.1, dtype=torch.float64)
    expected_buffers = random_buffers([torch.float32] * 5, n=100)
    compiled_buffers = random_buffers([torch.float32] * 5, n=100)
    expected = step_and_epoch_end(*expected_buffers[:3], lr, *expected_buffers[3:])
    got = compiled(*compiled_buffers[:3], lr, *compiled_buffers[3:])
    assert torch.equal(got, expected)
    for a, b in zip(compiled_buffers, expected_buffers):
        assert torch.equal(a, b)


def test_torch_compile_traces_the_momentum_step() -> None:
    backend = load_backend("cpp", CPU)

    def momentum_step(param, grad, ema, momentum_buffer, lr):
        backend_step(backend, param, grad, ema, lr, 0.01, 0.1, None, None, None, momentum_buffer, 0.9, True)
        return param * 2

    compiled = torch.compile(momentum_step, backend="aot_eager", fullgraph=True)
    lr = torch.tensor(0.1, dtype=torch.float64)
    expected_buffers = random_buffers([torch.float32] * 4, n=100)
    compiled_buffers = random_buffers([torch.float32] * 4, n=100)
    expected = momentum_step(*expected_buffers, lr)
    got = compiled(*compiled_buffers, lr)
    assert torch.equal(got, expected)
    for a, b in zip(compiled_buffers, expected_buffers):
        assert torch.equal(a, b)
    assert not torch.equal(compiled_buffers[3], random_buffers([torch.float32] * 4, n=100)[3])  # m was written


@pytest.mark.parametrize(
    "case, message",
    [
        ("ema_dtype", "ema must be Float"),
        ("grad_numel", "grad has 99 elements"),
        ("strided", "1-D contiguous"),
        ("lr_dtype", "lr must be a one-element Double"),
        ("momentum_dtype", "momentum_buffer must be Float \\(the EMA's dtype\\)"),
        ("momentum_numel", "momentum_buffer has 99 elements"),
        ("momentum_without_buffer", "needs a momentum_buffer"),
        ("negative_point_coefficient", "needs the window's point_coefficient c >= 0"),
        ("nan_point_coefficient", "needs the window's point_coefficient c >= 0"),
    ],
)
def test_bad_step_input_raises_before_writing(case: str, message: str) -> None:
    load_backend("cpp", CPU)
    param, grad, ema, momentum_buffer = random_buffers([torch.float32] * 4, n=100)
    lr = torch.tensor(0.1, dtype=torch.float64)
    momentum_args = ()
    if case == "ema_dtype":
        ema = ema.double()
    elif case == "grad_numel":
        grad = grad[:99]
    elif case == "strided":
        param = torch.randn(200)[::2]
    elif case == "lr_dtype":
        lr = lr.float()
    elif case == "momentum_dtype":
        momentum_args = (momentum_buffer.double(), 0.9, False)
    elif case == "momentum_numel":
        momentum_args = (momentum_buffer[:99], 0.9, False)
    elif case == "momentum_without_buffer":
        momentum_args = (None, 0.9, False)
    elif case.endswith("point_coefficient"):  # a window's opening step (ema_mode 2) with a bad c
        momentum_args = (momentum_buffer, 0.9, False, 2, 0, -9.0 if case.startswith("negative") else math.nan)
    before = param.clone(), ema.clone(), momentum_buffer.clone()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.bbfused.cpp_step(param, grad, ema, lr, 0.0, 0.1, None, None, None, *momentum_args)
    assert torch.equal(param, before[0]) and torch.equal(ema, before[1]) and torch.equal(momentum_buffer, before[2])


def test_explicit_cpp_without_compiler_says_what_is_missing(fresh_load, monkeypatch) -> None:
    monkeypatch.setenv("CXX", "bbfused-test-no-such-compiler")
    with pytest.raises(BackendUnavailableError, match="no C\\+\\+ compiler: 'bbfused-test-no-such-compiler'"):
        BB([torch.nn.Parameter(torch.zeros(3))], steps_per_epoch=2, backend="cpp")
    with pytest.warns(RuntimeWarning, match="cpp backend is unavailable.*no C\\+\\+ compiler"):
        opt = BB([torch.nn.Parameter(torch.zeros(3))], steps_per_epoch=2, backend="auto")
    assert opt._buffers.backends[CPU].name == "eager"


def test_explicit_cpp_without_ninja_says_what_is_missing(fresh_load, monkeypatch) -> None:
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(BackendUnavailableError, match="ninja is not installed.*pip install ninja"):
        load_backend("cpp", CPU)


def test_build_failure_reason_carries_the_compiler_message(fresh_load, monkeypatch, tmp_path) -> None:
    broken = tmp_path / "bb_ops.cpp"
    broken.write_text("#error bbfused-test-broken-source\n")
    monkeypatch.setattr(cpp_backend, "source_path", lambda: broken)
    monkeypatch.setattr(cpp_backend, "build_directory", lambda: tmp_path / "build")
    reason = cpp_backend.unavailable_reason(CPU)
    assert reason is not None and "compiling csrc/bb_ops.cpp" in reason
    assert "bbfused-test-broken-source" in reason


def test_other_devices_are_refused() -> None:
    reason = cpp_backend.unavailable_reason(torch.device("meta"))
    assert reason is not None and "CPU tensors only" in reason


def test_library_loads_once_per_process(fresh_load, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(cpp_backend, "_load_ops", lambda: calls.append(1))
    threads = [threading.Thread(target=cpp_backend.unavailable_reason, args=(CPU,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cpp_backend.unavailable_reason(CPU) is None
    assert len(calls) == 1


BASELINE_SCRIPT = """
import sys, torch
from bbfused.backends import load_backend
backend = load_backend("cpp", torch.device("cpu"))
inputs = torch.load(sys.argv[1])
names = ("lr", "weight_decay", "beta", "grad_scale", "found_inf", "nonfinite")
names += ("momentum_buffer", "momentum", "nesterov")
for case in inputs:
    backend.step(*case["args"][:3], **dict(zip(names, case["args"][3:])))
torch.save([[case["args"][i] for i in OUTPUTS] for case in inputs], sys.argv[2])
"""
OUTPUTS = (0, 2, 8, 9)  # θ, the EMA, the skipped count, the momentum buffer (None without momentum)


def _step_cases() -> list[dict]:
    generator = torch.Generator().manual_seed(11)
    cases = []
    for dtype in DTYPES:
        for scale in (None, torch.tensor(4.0)):
            for momentum in (None, "heavy_ball", "nesterov"):
                param, grad = (torch.randn(N, generator=generator).to(dtype) for _ in range(2))
                grad[[3, 1000, N - 1]] = torch.tensor([float("nan"), float("inf"), -float("inf")]).to(dtype)
                ema, buffer = (torch.randn(N, generator=generator, dtype=state_dtype(dtype)) for _ in range(2))
                lr = torch.tensor(0.05, dtype=torch.float64)
                count = torch.zeros((), dtype=torch.int64)
                momentum_args = [None, 0.0, False] if momentum is None else [buffer, 0.9, momentum == "nesterov"]
                cases.append({"args": [param, grad, ema, lr, 1e-2, 0.25, scale, None, count, *momentum_args]})
    return cases


def test_baseline_and_avx2_step_loops_give_the_same_bits(tmp_path) -> None:
    """The step loop is compiled twice on x86-64 (the baseline ISA and an AVX2 clone chosen at run time); both,
    run on the same inputs (non-finite gradients, a GradScaler scale, heavy-ball and Nesterov momentum included),
    give the eager reference's bits. The baseline runs in a subprocess with BBFUSED_CPU_BASELINE=1."""
    cases = _step_cases()
    torch.save(cases, tmp_path / "in.pt")
    env = dict(os.environ, BBFUSED_CPU_BASELINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
    script = BASELINE_SCRIPT.replace("OUTPUTS", repr(OUTPUTS))
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        env=env,
        check=True,
        timeout=300,
    )
    baseline = torch.load(tmp_path / "out.pt")
    fused, eager = load_backend("cpp", CPU), EagerBackend()
    for case, from_baseline in zip(cases, baseline):
        here = [a.clone() if isinstance(a, torch.Tensor) else a for a in case["args"]]
        reference = [a.clone() if isinstance(a, torch.Tensor) else a for a in case["args"]]
        backend_step(fused, *here)
        backend_step(eager, *reference)
        for index, from_baseline_loop in zip(OUTPUTS, from_baseline):
            if here[index] is None:  # no momentum buffer
                assert reference[index] is None and from_baseline_loop is None
                continue
            assert torch.equal(here[index], reference[index]) and torch.equal(here[index], from_baseline_loop)
        assert int(here[8]) == 3
        if here[9] is not None:
            assert not torch.equal(here[9], case["args"][9])  # the momentum buffer was written
