"""The Triton backend's own properties: block edges, int64 offsets, no re-specialization, memory traffic,
availability, input checks; and, on a CUDA machine, no host synchronisation.

Its agreement with the eager backend over whole optimizer runs is in test_backends.py. Without CUDA the
kernels run through the Triton interpreter (conftest.py), so sizes stay at a few blocks.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from backend_calls import backend_step
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

import bbfused.backends
from bbfused import BB
from bbfused.backends import BackendUnavailableError, load_backend
from bbfused.backends import triton_backend as tb
from bbfused.buffers import state_dtype

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BLOCK = tb.BLOCK_SIZE
# Element counts around the block edges: full blocks take the unmasked path, a partial last block the masked one.
SIZES = [1, 15, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 3]
TOLERANCE = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-6, atol=1e-7),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
}
REPO_ROOT = Path(__file__).resolve().parent.parent


def randn(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=generator, dtype=torch.float64).to(DEVICE, dtype)


def step_inputs(n: int, dtype: torch.dtype, seed: int = 0, momentum: bool = False) -> list[torch.Tensor]:
    """param, grad, ema and (``momentum``) the momentum buffer: random (the EMA too, so that β·(d − g) is tested with
    g ≠ 0; likewise m)."""
    inputs = [randn(n, dtype, seed), randn(n, dtype, seed + 1), randn(n, state_dtype(dtype), seed + 2)]
    return inputs + [randn(n, state_dtype(dtype), seed + 3)] if momentum else inputs


def epoch_end_inputs(n: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """param, ema, prev_params, prev_ema, all random."""
    return [randn(n, t, seed + i) for i, t in enumerate((dtype, state_dtype(dtype), dtype, state_dtype(dtype)))]


def lr_tensor(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64, device=DEVICE)


def scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=DEVICE)


def run_step(
    backend, inputs, lr=0.05, weight_decay=1e-2, beta=0.4, grad_scale=None, found_inf=None, momentum=0.9, nesterov=False
) -> None:
    """A step over [param, grad, ema] or, with a fourth buffer, [param, grad, ema, momentum_buffer]."""
    param, grad, ema, *momentum_buffer = inputs
    if momentum_buffer:
        backend_step(
            backend, param, grad, ema, lr_tensor(lr), weight_decay, beta, grad_scale, found_inf, None,
            momentum_buffer[0], momentum, nesterov,
        )  # fmt: skip
    else:
        backend_step(backend, param, grad, ema, lr_tensor(lr), weight_decay, beta, grad_scale, found_inf)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return a.dtype == b.dtype and torch.equal(a.view(ints[a.element_size()]), b.view(ints[b.element_size()]))


# ------------------------------------------------------------------------------------------ block edges
@pytest.mark.parametrize("momentum", [None, "heavy_ball", "nesterov"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("amp", ["plain", "scaled"])
@pytest.mark.parametrize("n", SIZES)
def test_step_matches_eager_at_block_edges(n: int, amp: str, dtype: torch.dtype, momentum: str | None) -> None:
    """With momentum, fp32 and fp64 give the eager reference's bits (θ, g and m)."""
    grad_scale, found_inf = (scalar(512.0), scalar(0.0)) if amp == "scaled" else (None, None)
    eager_inputs, triton_inputs, original = (step_inputs(n, dtype, momentum=momentum is not None) for _ in range(3))
    if grad_scale is not None:  # scaled as GradScaler scales (by a power of two: exact in every dtype)
        for inputs in (eager_inputs, triton_inputs, original):
            inputs[1].mul_(grad_scale)
    for backend, inputs in ((load_backend("eager", DEVICE), eager_inputs), (tb.TritonBackend(), triton_inputs)):
        run_step(backend, inputs, grad_scale=grad_scale, found_inf=found_inf, nesterov=momentum == "nesterov")
    exact = momentum is not None and dtype in (torch.float32, torch.float64)
    names = ("param", "grad", "ema", "momentum_buffer")
    for name, got, want, before in zip(names, triton_inputs, eager_inputs, original):
        if exact:
            assert same_bits(got, want), name
        torch.testing.assert_close(got, want, **TOLERANCE[dtype], msg=lambda m, name=name: f"{name}: {m}")
        if name == "grad":
            assert torch.equal(got, before)  # the gradient is read, never written
        else:
            assert not torch.equal(got, before)  # every element moved, the last one of a partial block too
            assert not torch.equal(got[-1:], before[-1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_epoch_end_matches_eager_at_block_edges(n: int, dtype: torch.dtype) -> None:
    eager_inputs, triton_inputs = epoch_end_inputs(n, dtype), epoch_end_inputs(n, dtype)
    eager_sums = load_backend("eager", DEVICE).epoch_end(*eager_inputs)
    triton_sums = tb.TritonBackend().epoch_end(*triton_inputs)
    assert triton_sums.dtype == torch.float64 and triton_sums.shape == (2,) and triton_sums.device == DEVICE
    # Both sum float64 differences in float64; only the order of the additions differs.
    torch.testing.assert_close(triton_sums, eager_sums, rtol=1e-12, atol=1e-12)
    for got, want in zip(triton_inputs, eager_inputs):
        assert torch.equal(got, want)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "flag set"])
def test_epoch_passes_loop_over_blocks_on_a_bounded_grid(monkeypatch: pytest.MonkeyPatch, gated: bool) -> None:
    """With more blocks than EPOCH_PROGRAMS, each program of an epoch-end pass takes every EPOCH_PROGRAMS-th block:
    the grid stays at EPOCH_PROGRAMS, every element is read and written as eager's, the sums agree."""
    monkeypatch.setattr(tb, "EPOCH_PROGRAMS", 3)
    n = 7 * BLOCK + 5  # 8 blocks over 3 programs: 3, 3 and 2 each, the last one partial
    enabled = torch.tensor(True) if gated else None
    eager = load_backend("eager", DEVICE)
    for kind in ("epoch_end", "epoch_measure"):
        eager_inputs, triton_inputs = epoch_end_inputs(n, torch.float32), epoch_end_inputs(n, torch.float32)
        triton_sums = getattr(tb.TritonBackend(), kind)(*triton_inputs, enabled=enabled)
        torch.testing.assert_close(triton_sums, getattr(eager, kind)(*eager_inputs), rtol=1e-12, atol=1e-12)
        for got, want in zip(triton_inputs, eager_inputs):
            assert torch.equal(got, want)
    partials = tb.TritonBackend().epoch_measure_partials([epoch_end_inputs(n, torch.float32)], enabled=enabled)
    assert partials.shape == (4, 3)  # one column a program
    for rolled_back in (False, True):
        param, prev, momentum = randn(n, torch.float32, 1), randn(n, torch.float32, 2), randn(n, torch.float32, 3)
        want_param = prev.clone() if rolled_back else param.clone()
        want_momentum = torch.zeros(n) if rolled_back else momentum.clone()
        tb.TritonBackend().epoch_commit(
            param, prev, torch.tensor(rolled_back), enabled=enabled, momentum_buffer=momentum
        )
        assert torch.equal(param, want_param) and torch.equal(prev, want_param) and torch.equal(momentum, want_momentum)


def test_found_inf_touches_nothing() -> None:
    for grad_scale in (None, scalar(4.0)):
        for momentum in (False, True):
            inputs = step_inputs(2 * BLOCK + 3, torch.float32, momentum=momentum)
            before = [t.clone() for t in inputs]
            run_step(tb.TritonBackend(), inputs, grad_scale=grad_scale, found_inf=scalar(1.0))
            for got, want in zip(inputs, before):
                assert torch.equal(got, want)


def test_empty_buffers() -> None:
    backend = tb.TritonBackend()
    run_step(backend, step_inputs(0, torch.float32))
    run_step(backend, step_inputs(0, torch.float32, momentum=True), nesterov=True)
    sums = backend.epoch_end(*epoch_end_inputs(0, torch.float32))
    assert sums.dtype == torch.float64 and torch.equal(sums, torch.zeros(2, dtype=torch.float64, device=DEVICE))


def test_epoch_end_bits_reproducible() -> None:
    n = 3 * BLOCK + 5  # four partial sums to combine
    results = [tb.TritonBackend().epoch_end(*epoch_end_inputs(n, torch.float32, seed=7)) for _ in range(2)]
    assert torch.equal(results[0], results[1])
    assert results[0][0] > 0  # not two empty sums


# ------------------------------------------------------------------------------------------ int64 offsets
class LaunchRecorder:
    """Records the arguments of every launch of a kernel (as Triton's pre-run hooks receive them)."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args, **kwargs) -> None:
        self.calls.append((args, kwargs))

    def __enter__(self) -> LaunchRecorder:
        self.kernel.add_pre_run_hook(self)
        return self

    def __exit__(self, *exc) -> None:
        self.kernel.pre_run_hooks.remove(self)


def test_forced_int64_offsets_give_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The USE_INT64 code path, forced on a small buffer, computes exactly what the int32 path does."""
    n = 2 * BLOCK + 3
    int32_step, int32_epoch = step_inputs(n, torch.bfloat16), epoch_end_inputs(n, torch.bfloat16)
    run_step(tb.TritonBackend(), int32_step, grad_scale=scalar(8.0))
    int32_sums = tb.TritonBackend().epoch_end(*int32_epoch)

    monkeypatch.setattr(tb, "INT32_INDEX_LIMIT", 0)  # every buffer counts as too long for int32
    int64_step, int64_epoch = step_inputs(n, torch.bfloat16), epoch_end_inputs(n, torch.bfloat16)
    with LaunchRecorder(tb._step_kernel) as steps, LaunchRecorder(tb._epoch_end_kernel) as epoch_ends:
        run_step(tb.TritonBackend(), int64_step, grad_scale=scalar(8.0))
        int64_sums = tb.TritonBackend().epoch_end(*int64_epoch)
    assert [kwargs["USE_INT64"] for _, kwargs in steps.calls + epoch_ends.calls] == [True, True]
    assert torch.equal(int64_sums, int32_sums)
    for got, want in zip(int64_step + int64_epoch, int32_step + int32_epoch):
        assert torch.equal(got, want)


def test_int64_offsets_chosen_exactly_when_needed() -> None:
    """int32 while every offset of every block is below 2**31 (up to 2**31 elements); int64 from one more."""
    assert not tb._needs_int64(2**31)
    assert tb._needs_int64(2**31 + 1) and tb._needs_int64(2**40)
    with LaunchRecorder(tb._step_kernel) as steps:
        run_step(tb.TritonBackend(), step_inputs(BLOCK + 1, torch.float32))
    assert steps.calls[0][1]["USE_INT64"] is False


# ------------------------------------------------------------------------------------------ specialization
CONSTEXPRS = {
    "EMA_WINDOW",
    "HAS_SCALE",
    "HAS_WEIGHT_DECAY_TABLE",
    "ROW",
    "HAS_FOUND_INF",
    "SKIP_NONFINITE",
    "HAS_MOMENTUM",
    "NESTEROV",
    "HAS_ENABLED",
    "USE_INT64",
    "BLOCK",
}


def specialization_binder(kernel, specialize_n: bool = False):
    """The function Triton turns launch arguments with into the kernel's compilation-cache key.

    On a GPU the kernel's own; under the interpreter, the one triton.jit would have built for the same
    function and options (for an sm_90 target). ``specialize_n``: as if n_elements were not exempted.
    """
    if isinstance(kernel, JITFunction) and not specialize_n:
        return kernel.device_caches[torch.cuda.current_device()][-1]
    jit_options = dict(kernel.kwargs) if hasattr(kernel, "kwargs") else {"do_not_specialize": kernel.do_not_specialize}
    if specialize_n:
        jit_options["do_not_specialize"] = []
    jit = JITFunction(kernel.fn, **jit_options)
    return create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))


def varied_launches(backend: tb.TritonBackend) -> None:
    """Steps and epoch ends with every length, learning rate, weight decay and beta different."""
    for i, n in enumerate([1, 2, 15, 16, 17, 100, BLOCK, BLOCK + 1, 2 * BLOCK + 48]):
        run_step(backend, step_inputs(n, torch.float32), lr=0.1 / (i + 1), weight_decay=1e-4 * i, beta=1 / (i + 2))
        backend.epoch_end(*epoch_end_inputs(n, torch.float32))


@pytest.mark.parametrize("kernel_name", ["_step_kernel", "_epoch_end_kernel"])
def test_no_respecialization_for_new_values(kernel_name: str) -> None:
    kernel = getattr(tb, kernel_name)
    parameters = inspect.signature(kernel.fn).parameters
    # Only the launch's shape is constexpr: no length, learning rate, weight decay or beta.
    assert {name for name, p in parameters.items() if "constexpr" in str(p.annotation)} == CONSTEXPRS & set(parameters)
    backend = tb.TritonBackend()
    varied_launches(backend)  # on a GPU: compile the variants these launches need, before counting
    binders = {"as built": specialization_binder(kernel), "n specialized": specialization_binder(kernel, True)}

    def compiled() -> int | None:
        """On a GPU: how many variants of the kernel are compiled."""
        return len(kernel.device_caches[torch.cuda.current_device()][0]) if isinstance(kernel, JITFunction) else None

    compiled_before = compiled()
    with LaunchRecorder(kernel) as launches:
        varied_launches(backend)
    assert len(launches.calls) == 9
    keys = {
        name: {str(binder(*args, **kwargs)[1]) for args, kwargs in launches.calls} for name, binder in binders.items()
    }
    assert len(keys["as built"]) == 1, keys["as built"]
    # The same check catches specialization: with Triton's default integer specialization these launches
    # give 3 keys (n == 1, n % 16 == 0, other), 5 for the epoch-end kernel, whose partials' row stride (one
    # per block of n) is an unspecialized integer too.
    assert len(keys["n specialized"]) == (3 if kernel_name == "_step_kernel" else 5)
    assert compiled() == compiled_before  # on a GPU: the compilation cache itself did not grow


def test_no_respecialization_for_new_momentum_values() -> None:
    """μ is a float64 argument like β: steps with other momenta and lengths share one compiled kernel per choice
    of heavy ball or Nesterov (those two are constexprs: they choose the kernel's code)."""
    backend = tb.TritonBackend()
    with LaunchRecorder(tb._step_kernel) as launches:
        for nesterov in (False, True):
            for i, n in enumerate([1, 17, BLOCK, 2 * BLOCK + 48]):
                inputs = step_inputs(n, torch.float32, momentum=True)
                run_step(backend, inputs, lr=0.1 / (i + 1), momentum=0.5 + 0.1 * i, nesterov=nesterov)
    binder = specialization_binder(tb._step_kernel)
    keys = [str(binder(*args, **kwargs)[1]) for args, kwargs in launches.calls]
    assert len(keys) == 8
    assert len(set(keys[:4])) == 1 and len(set(keys[4:])) == 1 and keys[0] != keys[4]


# ------------------------------------------------------------------------------------------ memory traffic
# Run in a fresh interpreter without TRITON_INTERPRET: compiling needs real JIT functions. Compiles for
# sm_90 (no GPU needed) and reports, per kernel, the element types of the block loads and stores in the
# Triton IR, and the bytes moved by 128-bit vector accesses in the PTX.
COMPILE_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from bbfused.backends import triton_backend as tb

param, ema = sys.argv[1], sys.argv[2]
target = GPUTarget("cuda", 90, 32)
aligned = make_backend(target).parse_attr("D")
step_scalars = {"n_elements": "i32", "weight_decay": "fp64", "beta": "fp64", "momentum": "fp64", "ema_mode_ptr": "*i32",
                "point_coefficient": "fp64", "window_steps": "i32"}
step_pointers = [param, param, ema, "fp64", "fp32", "fp32", "i64", ema, "fp64"]
row = int(sys.argv[3])
step_flags = {"HAS_SCALE": True, "HAS_WEIGHT_DECAY_TABLE": False, "HAS_FOUND_INF": True, "SKIP_NONFINITE": False,
              "HAS_MOMENTUM": False, "NESTEROV": False, "EMA_WINDOW": False, "ROW": row}
kernels = {
    "step": (tb._step_kernel, step_pointers, step_scalars, step_flags),
    "step_skipping_nonfinite": (tb._step_kernel, step_pointers, step_scalars, step_flags | {"SKIP_NONFINITE": True}),
    "step_momentum": (tb._step_kernel, step_pointers, step_scalars, step_flags | {"HAS_MOMENTUM": True}),
    "step_nesterov_skipping_nonfinite": (tb._step_kernel, step_pointers, step_scalars,
             step_flags | {"HAS_MOMENTUM": True, "NESTEROV": True, "SKIP_NONFINITE": True}),
    "step_momentum_windowed": (tb._step_kernel, step_pointers, step_scalars,
             step_flags | {"HAS_MOMENTUM": True, "SKIP_NONFINITE": True, "EMA_WINDOW": True}),
}
# Each epoch-end kernel plain, and flagged as a captured step launches it (the flag is one scalar load).
for flagged in (False, True):
    suffix = "_flagged" if flagged else ""
    kernels |= {
        "epoch_end" + suffix: (tb._epoch_end_kernel, [param, ema, param, ema, "fp64", "i1"],
                               {"n_elements": "i32", "row_stride": "i32"}, {"HAS_ENABLED": flagged}),
        "epoch_measure" + suffix: (tb._epoch_measure_kernel, [param, ema, param, ema, "fp64", "i1"],
                                   {"n_elements": "i32", "row_stride": "i32"}, {"HAS_ENABLED": flagged}),
        "epoch_commit" + suffix: (tb._epoch_commit_kernel, [param, param, "i1", "i1", ema],
                                  {"n_elements": "i32"}, {"HAS_ENABLED": flagged, "HAS_MOMENTUM": False}),
    }
report = {}
for name, (kernel, pointers, scalars, flags) in kernels.items():
    names = kernel.arg_names
    signature = {n: "*" + t for n, t in zip(names, pointers)} | scalars
    constexprs = flags | {"USE_INT64": False, "BLOCK": tb.BLOCK_SIZE}
    signature |= {n: "constexpr" for n in constexprs}
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs={(i,): aligned for i in range(len(pointers))})
    options = tb.STEP_OPTIONS if kernel is tb._step_kernel else {"num_warps": tb.NUM_WARPS}
    asm = triton.compile(source, target=target, options=options).asm
    shape = "%d" % tb.BLOCK_SIZE if flags.get("ROW", 1) == 1 else "%dx%d" % (tb.BLOCK_SIZE // row, row)
    block = r"tensor<%sx!tt\.ptr<(\w+)>>" % shape
    report[name] = {
        "loads": re.findall(r"tt\.load .*: " + block, asm["ttir"]),
        "stores": re.findall(r"tt\.store .*: " + block, asm["ttir"]),
        "vector_load_bytes": 16 * len(re.findall(r"ld\.global[\w.:]*?\.(?:v4\.b32|v2\.b64)\b", asm["ptx"])),
        "vector_store_bytes": 16 * len(re.findall(r"st\.global[\w.:]*?\.(?:v4\.b32|v2\.b64)\b", asm["ptx"])),
        "half_vector_load_bytes": 8 * len(re.findall(r"ld\.global[\w.:]*?\.v2\.b32\b", asm["ptx"])),
        "half_vector_store_bytes": 8 * len(re.findall(r"st\.global[\w.:]*?\.v2\.b32\b", asm["ptx"])),
        "shared_stores": len(re.findall(r"\bst\.shared", asm["ptx"])),
        "fused_multiply_adds": len(re.findall(r"\bfma\.", asm["ptx"])),
    }
print(json.dumps(report))
"""
IR_TYPES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
SIGNATURE_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.mark.parametrize("dtype", list(IR_TYPES), ids=str)
def test_each_element_read_and_written_once(dtype: torch.dtype) -> None:
    """Step: read θ, grad, g and write θ, g (also when skipping non-finite values: the count is per block);
    epoch end: read θ, g, θprev, gprev and write θprev, gprev, g; the default's epoch end: read θ, g, θprev,
    gprev and write gprev, g, then one copy (θ → θprev, or back: both branches are in the code). The flagged
    epoch-end kernels a captured step launches compile to the same accesses behind one scalar flag load.

    Checked on the compiled kernels (sm_90): in the Triton IR, each of the two paths (full block, partial
    block) has exactly these block accesses; in the PTX, the full-block path moves exactly these bytes per
    element (20 for the fp32 step, 28 with momentum), all in 128-bit accesses; with g's window the same accesses,
    masked by the step's mode. The step kernels have no fused
    multiply-add (tb.STEP_OPTIONS): each product is rounded before it is added, as in the eager reference.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    ema = state_dtype(dtype)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            COMPILE_SCRIPT,
            SIGNATURE_TYPES[dtype],
            SIGNATURE_TYPES[ema],
            str(tb.STEP_ROW.get(dtype, 1)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    p, e = IR_TYPES[dtype], IR_TYPES[ema]
    expected = {
        "step": {"loads": [p, p, e], "stores": [p, e]},
        "step_skipping_nonfinite": {"loads": [p, p, e], "stores": [p, e]},
        "step_momentum": {"loads": [p, p, e, e], "stores": [p, e, e]},
        "step_nesterov_skipping_nonfinite": {"loads": [p, p, e, e], "stores": [p, e, e]},
        "epoch_end": {"loads": [p, e, p, e], "stores": [p, e, e]},
        "epoch_measure": {"loads": [p, e, p, e], "stores": [e, e]},
        "epoch_commit": {"loads": [p, p], "stores": [p, p]},
    }
    expected |= {f"{name}_flagged": accesses for name, accesses in expected.items() if name.startswith("epoch")}
    threads = tb.NUM_WARPS * 32
    size = {p: dtype.itemsize, e: ema.itemsize}
    for kernel, accesses in expected.items():
        for kind, types in accesses.items():
            assert report[kernel][kind] == types + types, (kernel, kind)  # full-block path, then partial
            # The commit's two branches copy opposite ways; the PTX selects the pointers: one load, one store.
            moved = types[:1] if kernel.startswith("epoch_commit") else types
            per_element = sum(size[t] for t in moved)
            accessed = report[kernel][f"vector_{kind[:-1]}_bytes"] + report[kernel][f"half_vector_{kind[:-1]}_bytes"]
            assert accessed * threads / tb.BLOCK_SIZE == per_element, (kernel, kind)
    assert dtype != torch.float32 or sum(size[t] for t in expected["step"]["loads"] + expected["step"]["stores"]) == 20
    momentum_accesses = expected["step_momentum"]["loads"] + expected["step_momentum"]["stores"]
    assert dtype != torch.float32 or sum(size[t] for t in momentum_accesses) == 28
    # The windowed step (g's mode read at a pointer, bbfused.average_window) has the momentum step's block accesses,
    # masked by the mode, still 128-bit: a step that leaves g alone skips its 8 bytes. GradScaler's skip adds the
    # window's point from θ and m (and g, where the window closes) into g, for the steps that open or close it: its
    # loads and store come first.
    windowed, momentum_step = report["step_momentum_windowed"], expected["step_momentum"]
    assert (
        windowed["loads"] == [p, e, e] + momentum_step["loads"] * 2
        and windowed["stores"] == [e] + momentum_step["stores"] * 2
    )
    for key in ("vector_load_bytes", "vector_store_bytes", "half_vector_load_bytes", "half_vector_store_bytes"):
        assert windowed[key] == report["step_momentum"][key], key
    assert all(report[kernel]["fused_multiply_adds"] == 0 for kernel in report if kernel.startswith("step"))
    # No step passes values through shared memory (only the count of skipped values is a block reduction): 16-bit
    # parameters are read and written 64 bits at a time (rows of tb.STEP_ROW), every other access 128 bits.
    assert report["step"]["shared_stores"] == report["step_momentum"]["shared_stores"] == 0
    sixteen_bit = 2 * dtype.itemsize if dtype.itemsize == 2 else 0  # θ and the gradient
    assert report["step"]["half_vector_load_bytes"] * threads / tb.BLOCK_SIZE == sixteen_bit


# ------------------------------------------------------------------------------------------ availability
def test_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tb, "_INTERPRETED", False)
    reason = tb.unavailable_reason(torch.device("cpu"))
    assert reason is not None and "TRITON_INTERPRET" in reason and "backend='cpp'" in reason
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        load_backend("triton", torch.device("cpu"))
    params = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(BackendUnavailableError, match="backend='triton' cannot run on cpu"):
        BB(params, lr=0.1, steps_per_epoch=2, backend="triton")
    monkeypatch.setattr(tb, "_INTERPRETED", True)
    assert tb.unavailable_reason(torch.device("cpu")) is None


def test_other_devices_unavailable() -> None:
    reason = tb.unavailable_reason(torch.device("meta"))
    assert reason is not None and "meta" in reason and "CUDA" in reason


def test_missing_triton_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails
    monkeypatch.delitem(sys.modules, tb.__name__)
    reason = bbfused.backends.unavailable_reason("triton", DEVICE)
    assert reason is not None and "pip install triton" in reason


# ------------------------------------------------------------------------------------------ input checks
def test_bad_inputs_raise_before_writing() -> None:
    backend = tb.TritonBackend()
    param, grad, ema = step_inputs(40, torch.float32)
    before = [t.clone() for t in (param, grad, ema)]
    momentum_buffer = randn(40, torch.float32, 9)
    before.append(momentum_buffer.clone())
    bad_calls = {
        "momentum_dtype": lambda: run_step(backend, [param, grad, ema, momentum_buffer.double()]),
        "momentum_length": lambda: run_step(backend, [param, grad, ema, momentum_buffer[:39]]),
        "momentum_without_buffer": lambda: backend_step(
            backend, param, grad, ema, lr_tensor(0.1), 0.0, 0.5, None, None, None, None, 0.9
        ),
        "length": lambda: run_step(backend, [param, grad[:39], ema]),
        "dtype": lambda: run_step(backend, [param, grad, ema.double()]),
        "contiguous": lambda: run_step(backend, [param[::2], grad[::2], ema[::2]]),
        "lr": lambda: backend_step(backend, param, grad, ema, lr_tensor(0.1).expand(2), 0.0, 0.5),
        "epoch_end": lambda: backend.epoch_end(param, ema, grad, ema.half()),
    }
    messages = {
        "momentum_dtype": "momentum_buffer has dtype torch.float64",
        "momentum_length": "momentum_buffer must be a 1-D contiguous tensor of 40 elements",
        "momentum_without_buffer": "needs a momentum_buffer",
        "length": "40 elements",
        "dtype": "dtype torch.float64",
        "contiguous": "contiguous",
        "lr": "one-element",
        "epoch_end": "prev_ema has dtype",
    }
    for name, call in bad_calls.items():
        with pytest.raises(ValueError, match=messages[name]):
            call()
    for got, want in zip((param, grad, ema, momentum_buffer), before):
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------ CUDA only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronisation exists only with CUDA")
def test_no_host_sync_in_step_and_epoch_end() -> None:
    """Training with GradScaler through several epoch ends: a synchronising CUDA call in a step that does not close
    the epoch raises."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1)).cuda()
    opt = BB(model.parameters(), lr=0.05, steps_per_epoch=3, weight_decay=1e-4, backend="triton")
    scaler = torch.amp.GradScaler("cuda")
    data = torch.randn(16, 32, device="cuda")

    def train_step() -> None:
        opt.zero_grad()
        scaler.scale(model(data).square().mean()).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(6):  # warm-up: compilation, allocator, the first BB-rule epoch end
        train_step()
    epoch_before = opt.epoch
    backend = tb.TritonBackend()
    # Tensors made beforehand: copying from the host synchronises.
    step_args = [*step_inputs(BLOCK + 5, torch.bfloat16), opt.lr_tensor, 1e-3, 0.5, scalar(4.0), scalar(0.0)]
    epoch_end_args = epoch_end_inputs(BLOCK + 5, torch.bfloat16)
    try:
        for _ in range(9):
            # A step that closes the epoch reads the new rate once, for param_groups' "lr" (a float); no other.
            closes = opt.step_in_epoch + 1 == opt.steps_per_epoch
            torch.cuda.set_sync_debug_mode("default" if closes else "error")
            train_step()
        torch.cuda.set_sync_debug_mode("error")
        backend_step(backend, *step_args)
        backend.epoch_end(*epoch_end_args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert isinstance(opt.param_groups[0]["lr"], float) and opt.param_groups[0]["lr"] == opt.lr
    assert opt.epoch == epoch_before + 3
    assert all(map(math.isfinite, opt.lr_history))
