"""GPU check of the Triton backend, for a session with one CUDA GPU (about 3 minutes on an H200).

1. Correctness on the GPU: pytest over ``tests/test_backends.py -k triton``, ``tests/test_triton_backend.py`` and
   ``tests/test_capture.py -k "triton or cuda_graph"`` (kernels compiled, not interpreted; this includes the
   ``torch.cuda.set_sync_debug_mode("error")`` test and a whole training step replayed from a CUDA graph).
2. No host sync at full size: ResNet-50 steps and epoch ends with GradScaler tensors under
   ``set_sync_debug_mode("error")``.
3. int64 offsets at real size: one fp32 buffer of 2**31 + 1000 elements (about 52 GB of GPU memory),
   step and epoch end checked element by element against exact expectations.
4. Step microbenchmark on ResNet-50's parameters (two groups: weights with weight decay, the rest without),
   fp32 and bf16: ``bbfused.BB`` with the triton and eager backends against
   ``torch.optim.SGD(momentum=0.9, fused=True)``; the epoch end; a device-to-device copy as the bandwidth
   ceiling; and the step kernel's block size and warps (the fixed choice in triton_backend.py) swept.

Times are ``triton.testing.do_bench`` medians (L2 flushed between calls) with the 20th-80th percentiles.
Bandwidth = the bytes the operation must move (each input read once, each output written once) / time.

Usage, from the repository root: ``python benchmarks/gpu_check.py [--out PATH]`` (default
benchmarks/results/gpu_check.md; on the device machine ``--out $OUT/gpu_check.md`` brings the table back).
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.testing
from shapes import torchvision_shapes

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bbfused import BB  # noqa: E402
from bbfused.backends import triton_backend as tb  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY, BETA = 0.1, 0.9, 1e-4, 0.01
SWEEP = [(512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 4), (4096, 8)]  # (BLOCK, num_warps)
LARGE_N = 2**31 + 1000  # past int32, with a partial last block
COPY_BYTES = 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEST_TIMEOUT_S = 200


def timed(fn: Callable[[], object]) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of one call, in ms."""
    return tuple(triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8]))


class Report:
    """Markdown sections, printed as they come and written at the end."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.lines.append(line)

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        self.add(*("| " + " | ".join(row) + " |" for row in rows))
        self.add("")


# ----------------------------------------------------------------------------------------------- checks
def run_tests(report: Report) -> None:
    # -k matches module names too: every test of test_triton_backend.py, the other files' triton cases, and the
    # CUDA-graph replay of a whole training step.
    command = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-k", "triton or cuda_graph"]
    command += ["tests/test_backends.py", "tests/test_triton_backend.py", "tests/test_capture.py"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
        output, status = result.stdout + result.stderr, "passed" if result.returncode == 0 else "FAILED"
    except subprocess.TimeoutExpired as error:
        output, status = str(error.stdout or ""), f"TIMED OUT ({TEST_TIMEOUT_S} s)"
    lines = output.strip().splitlines()
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    summary = lines[-1] if lines else "no output"
    elapsed = time.perf_counter() - start
    report.add(
        "## 1. Tests on the GPU", "", f"`{' '.join(command[1:])}`: **{status}** in {elapsed:.0f} s; {summary}", ""
    )
    sync_test = [line for line in lines if "test_no_host_sync_in_step_and_epoch_end" in line]
    report.add(*(f"- {line}" for line in failures + sync_test[:1]), "")
    if status != "passed":
        report.add("```", *lines[-60:], "```", "")


def resnet50_params(dtype: torch.dtype, seed: int) -> tuple[list[dict], list[torch.nn.Parameter]]:
    """ResNet-50's parameter shapes as two groups (timm-style: no weight decay for ndim <= 1), on the GPU."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(shape, generator=generator, device="cuda", dtype=dtype))
        for shape in torchvision_shapes("resnet50")
    ]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return groups, params


def set_gradients(params: list[torch.nn.Parameter], seed: int) -> None:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    for p in params:
        grad = torch.randn(p.shape, generator=generator, device="cuda", dtype=p.dtype)
        if p.grad is None:
            p.grad = grad
        else:
            p.grad.copy_(grad)


def bb_optimizer(backend: str, dtype: torch.dtype, steps_per_epoch: int) -> BB:
    groups, params = resnet50_params(dtype, seed=0)
    # Paper-exact (safeguard=False): the kernels alone; the safeguard's epoch-end check is timed by bench_step.py.
    opt = BB(groups, lr=LR, steps_per_epoch=steps_per_epoch, beta=BETA, backend=backend, safeguard=False)
    set_gradients(params, seed=1)  # in-place writes: every parameter has a gradient, one launch per buffer
    return opt


def check_no_sync(report: Report) -> None:
    opt = bb_optimizer("triton", torch.float32, steps_per_epoch=3)
    opt.grad_scale = torch.tensor(1.0, device="cuda")
    opt.found_inf = torch.tensor(0.0, device="cuda")
    for _ in range(6):  # compile, and pass the first BB-rule epoch end
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(9):
            opt.step()
        outcome = "no synchronising call in 9 steps and 3 epoch ends"
    except RuntimeError as error:
        outcome = f"**FAILED**: {error}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report.add("## 2. Host sync at full size (ResNet-50, fp32, GradScaler tensors)", "", outcome, "")


def check_int64(report: Report) -> None:
    """Step and epoch end over LARGE_N elements; every element compared with what it must be."""
    title = f"## 3. int64 offsets: one fp32 buffer of 2**31 + {LARGE_N - 2**31} elements"
    free, _ = torch.cuda.mem_get_info()
    needed = 6 * 4 * LARGE_N + 2**30
    if free < needed:
        report.add(title, "", f"not run: {needed / 2**30:.0f} GiB needed, {free / 2**30:.0f} GiB free", "")
        return
    period = 4093  # a prime: the pattern is not aligned with blocks or 2**31
    pattern = torch.arange(period, device="cuda", dtype=torch.float32)
    grad = pattern.repeat(triton.cdiv(LARGE_N, period))[:LARGE_N]  # grad[i] = i mod period
    param, ema = torch.zeros_like(grad), torch.zeros_like(grad)
    lr = torch.tensor(0.5, dtype=torch.float64, device="cuda")
    backend = tb.TritonBackend()
    results = {}
    start = time.perf_counter()
    backend.step(param, grad, ema, lr=lr, weight_decay=0.0, beta=1.0)  # θ = -grad/2, g = grad: exact in fp32
    results["θ after step"] = torch.equal(param, grad * -0.5)
    results["g after step"] = torch.equal(ema, grad)
    prev_params, prev_ema = torch.zeros_like(grad), torch.zeros_like(grad)
    sums = backend.epoch_end(param, ema, prev_params, prev_ema).tolist()
    full, rest = divmod(LARGE_N, period)
    sum_sq = full * sum(i * i for i in range(period)) + sum(i * i for i in range(rest))  # Σ grad², exact
    results["‖Δθ‖² = Σgrad²/4"] = abs(sums[0] - sum_sq / 4) <= 1e-12 * sum_sq
    results["Δθᵀy = -Σgrad²/2"] = abs(sums[1] + sum_sq / 2) <= 1e-12 * sum_sq
    results["θprev = θ"] = torch.equal(prev_params, param)
    results["gprev = g"] = torch.equal(prev_ema, grad)
    results["g = 0"] = int(torch.count_nonzero(ema)) == 0
    results["last element"] = param[-1].item() == -0.5 * ((LARGE_N - 1) % period)
    elapsed = time.perf_counter() - start
    report.add(title, "", f"USE_INT64 chosen: {tb._needs_int64(LARGE_N)}; checks took {elapsed:.1f} s", "")
    report.table(["check", "result"], [[name, "ok" if ok else "**FAILED**"] for name, ok in results.items()])
    del grad, pattern, param, ema, prev_params, prev_ema
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- speed
def bench_steps(report: Report) -> None:
    copy_src = torch.empty(COPY_BYTES // 4, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    copy_ms = timed(functools.partial(copy_dst.copy_, copy_src))
    copy_gbs = 2 * COPY_BYTES / copy_ms[0] / 1e6
    del copy_src, copy_dst
    rows = [["D2D copy (1 GiB fp32, read + write)", "fp32", *fmt(copy_ms), "8", f"{copy_gbs:.0f}", "100%", ""]]
    n_total = n_tensors = 0
    for dtype_name, dtype in DTYPES.items():
        p, e = dtype.itemsize, 4  # bytes of a parameter and of an EMA element
        impls: dict[str, tuple[Callable[[], object], int]] = {}
        for backend in ("triton", "eager"):
            opt = bb_optimizer(backend, dtype, steps_per_epoch=10**9)
            impls[f"BB step ({backend})"] = (opt.step, 3 * p + 2 * e)
        groups, params = resnet50_params(dtype, seed=0)
        set_gradients(params, seed=1)
        sgd = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, fused=True)
        impls["SGD momentum fused"] = (sgd.step, 5 * p)
        n_total, n_tensors = sum(param.numel() for param in params), len(params)
        epoch_inputs = [torch.randn(n_total, device="cuda").to(t) for t in (dtype, torch.float32, dtype, torch.float32)]
        epoch_end = functools.partial(tb.TritonBackend().epoch_end, *epoch_inputs)
        impls["BB epoch end (triton, one buffer)"] = (epoch_end, 3 * p + 4 * e)
        reference = None
        for name, (fn, bytes_per_element) in impls.items():
            ms = timed(fn)
            reference = reference or ms[0]
            gbs = bytes_per_element * n_total / ms[0] / 1e6
            share, ratio = f"{gbs / copy_gbs:.0%}", f"{ms[0] / reference:.2f}"
            rows.append([name, dtype_name, *fmt(ms), str(bytes_per_element), f"{gbs:.0f}", share, ratio])
        del impls, sgd, params, groups, epoch_inputs
        torch.cuda.empty_cache()
    report.add(f"## 4. ResNet-50 parameters ({n_total:,} values, {n_tensors} tensors in 2 groups)", "")
    header = ["operation", "dtype", "median ms", "p20-p80 ms", "B/elem", "GB/s", "of copy", "× BB triton step"]
    report.table(header, rows)


def bench_block_sweep(report: Report, n: int) -> None:
    """The step kernel alone on one fp32 buffer of ResNet-50's size, per (BLOCK, num_warps)."""
    param, grad, ema = (torch.randn(n, device="cuda") for _ in range(3))
    lr = torch.tensor(LR, dtype=torch.float64, device="cuda")
    rows = []
    for block, warps in SWEEP:

        def launch(block=block, warps=warps):
            flags = dict(HAS_SCALE=False, HAS_FOUND_INF=False, USE_INT64=False, BLOCK=block, num_warps=warps)
            tb._step_kernel[(triton.cdiv(n, block),)](param, grad, ema, lr, None, None, n, WEIGHT_DECAY, BETA, **flags)

        ms = timed(launch)
        chosen = " (chosen)" if (block, warps) == (tb.BLOCK_SIZE, tb.NUM_WARPS) else ""
        rows.append([f"{block}{chosen}", str(warps), *fmt(ms), f"{20 * n / ms[0] / 1e6:.0f}"])
    report.add(f"## 5. Step kernel block size and warps ({n:,} fp32 elements, 20 B each)", "")
    report.table(["BLOCK", "warps", "median ms", "p20-p80 ms", "GB/s"], rows)
    compiled = len(tb._step_kernel.device_caches[torch.cuda.current_device()][0])
    report.add(f"Compiled variants of the step kernel in this process (the sweep's included): {compiled}", "")


def fmt(ms: tuple[float, float, float]) -> list[str]:
    return [f"{ms[0]:.4f}", f"{ms[1]:.4f}-{ms[2]:.4f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "gpu_check.md")
    parser.add_argument("--skip-tests", action="store_true", help="only the in-process checks and benchmarks")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    start = time.perf_counter()
    report = Report()
    report.add(
        "# Triton backend GPU check",
        "",
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"CUDA {torch.version.cuda}; BLOCK_SIZE={tb.BLOCK_SIZE}, NUM_WARPS={tb.NUM_WARPS}",
        "",
    )
    if not args.skip_tests:
        run_tests(report)
    check_no_sync(report)
    check_int64(report)
    bench_steps(report)
    bench_block_sweep(report, n=sum(torch.Size(s).numel() for s in torchvision_shapes("resnet50")))
    report.add(f"Total time: {time.perf_counter() - start:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report.lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
