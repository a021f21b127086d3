"""GPU check of bbfused.BB's Triton backend for a short loan of one CUDA GPU, built so that one run cannot be wasted.

Every section runs in its own try/except, under its own time limit, and the report (``--out``) is rewritten after
each one (and marked "running" before it): a crash is recorded with its traceback and the rest still run, and a run
killed half-way still leaves every finished section on disk. Sections (``--sections`` picks some):

- ``launches``: Triton launches (counted by patching Triton's launcher) and, on CUDA, every kernel (profiler) per
  plain step and per epoch-end step: default, paper (``safeguard=False``), capturable, capturable + track_buffers.
- ``no_sync``: ResNet-50's parameters, gradients set before BB is built, GradScaler tensors; the steps of an epoch
  under ``torch.cuda.set_sync_debug_mode("error")`` (step kernels must launch, nothing may sync), then the epoch end
  under it too, recording honestly whether it synchronises (the host-counted epoch end reads the rate once).
- ``rounding``: fp16 and bf16, lr=1, weight_decay=0, momentum=0, safeguard=False: one Triton step must equal
  ``(θ − grad).to(dtype)`` bit for bit on a GPU (the interpreter truncates: recorded, not failed, on the CPU).
- ``step_bench``: ResNet-50's parameters, fp32 and bf16: BB default and paper (triton), BB default (eager), BB with
  Adam's scaling (``preconditioner="adam"``, triton), torch's fused SGD (momentum 0.9) and fused Adam, a device
  copy; in fp32 also the momentum step's kernel in each gradient-average mode and an ImageNet epoch's mean; wall
  time (do_bench, L2 flushed), host time per call (no sync), device time per call (profiler kernel totals) and
  kernels per call; the whole epoch end (``end_epoch()``) timed likewise.
- ``block_sweep``: the step kernel over (BLOCK, num_warps), and the 16-bit step's two layouts, through the backend's
  own launch (no argument list here).
- ``end_to_end``: training images/s of a small ResNet (ResNet-18, 112 px) with BB default and paper against
  ``torch.optim.SGD(momentum=0.9, fused=True)``.
- ``int64``: one fp32 buffer of 2**31 + 1000 elements, step and epoch end checked element by element.
- ``capture``: a ResNet-50 training step with ``capturable=True`` captured in a CUDA graph and replayed (default and
  paper), against the same step run eagerly; the optimizer step alone captured and replayed.
- ``tests``: pytest over the Triton and CUDA-graph tests, compiled (not interpreted), in the time left.

``--dry-run`` runs every section at toy sizes on the CPU, Triton through its interpreter (CI runs it:
tests/test_gpu_check.py); timings there only exercise the code. ``--fail-section NAME`` makes a section raise (to
test the recording). Sized for about 7 minutes on an H200 (``--budget-s``: a section that would not fit is skipped
and recorded as such). The figures the GPU run fills: benchmarks/results/gpu_check_template.md.

Usage, from the repository root::

    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.md     # CPU, under a minute
    python benchmarks/gpu_check.py --out $OUT/gpu_check.md               # the GPU (default out:
                                                                         # benchmarks/results/<date>_<gpu>.md)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import functools
import gc
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

DRY_RUN = "--dry-run" in sys.argv[1:]
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported: the kernels run on CPU tensors
else:
    os.environ.pop("TRITON_INTERPRET", None)  # on the GPU the kernels must be compiled

import torch  # noqa: E402
import triton  # noqa: E402
import triton.testing  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_count import LaunchCounter  # noqa: E402

from bbfused import BB  # noqa: E402
from bbfused.backends import triton_backend as tb  # noqa: E402

SECTIONS = (
    "launches",
    "no_sync",
    "rounding",
    "step_bench",
    "block_sweep",
    "end_to_end",
    "int64",
    "capture",  # late: a failed capture can leave the CUDA context unusable (the tests run in their own process)
    "tests",
)
# Rough GPU seconds per section (compilation included): a section is skipped when it would pass --budget-s.
ESTIMATE_S = {
    "launches": 20,
    "no_sync": 20,
    "rounding": 10,
    "step_bench": 80,
    "block_sweep": 40,
    "capture": 60,
    "end_to_end": 40,
    "int64": 40,
    "tests": 60,
}
LR, MOMENTUM, WEIGHT_DECAY, BETA = 0.1, 0.9, 1e-4, 0.01
# The targets, set beside the measured figures (reported, never failed on).
TARGET_CAPTURABLE_STEP_KERNELS, TARGET_EPOCH_END_KERNELS = 8, 12
GPU_ONLY_NOTE = """\
## What only a GPU can confirm

- That the compiled kernels (not the interpreter) give these results: the dry run interprets them with NumPy.
- Rounding: the interpreter truncates fp32 → fp16/bf16 stores, a GPU rounds to nearest; only `rounding` on a GPU
  shows the bit-exact `(θ − grad).to(dtype)`.
- Host synchronisation: `torch.cuda.set_sync_debug_mode` exists only on CUDA; the CPU run counts reads of tensor
  values instead (a proxy that also counts reads of host tensors, which never sync).
- Every timing: wall, host and device time, bandwidth, the epoch end's cost in steps, images/s; kernel counts per
  step as the profiler sees them (torch's own small kernels included).
- CUDA-graph capture and replay of a training step with `capturable=True` (graphs need CUDA).
- int64 offsets past 2**31 elements (the dry run forces the int64 kernel on a toy buffer).
- The block size and warps of the step kernel (the sweep).
- The single-program kernels (the default control's decision, the device clock's loss and period end) on the
  device: tests compile them for sm_90 (no FMA, IEEE float64 division) and compare them with the torch ops through
  the interpreter; a GPU run is the first to execute their PTX.
- The epoch-end passes' bounded grid (1024 programs looping over blocks): its bandwidth against one block a program,
  and the cost of a captured step whose gated passes are off.
- The tracked model buffers' int64 group (BatchNorm's num_batches_tracked) through the Triton commit kernel.
- The 16-bit step's layout (the sweep): rows of 4 elements, as chosen, give every access one layout and no shared
  memory, with 64-bit 16-bit accesses; a flat block gives them 128 bits but converts the EMA's layout through shared
  memory with barriers. Only a GPU's timing shows which is faster.
- A run of several parameter groups' buffers in one step launch, reading each block's weight decay from a table
  (bbfused/buffer_runs.py).
- The Adam-scaled step's correctly rounded square root and division (`sqrt.rn`, `div.rn`) against torch's on CUDA,
  bit for bit in fp32 and fp64 (`tests` runs tests/test_preconditioned_backends.py compiled), and its cost against
  torch's fused Adam (`step_bench`).
"""


class Config:
    """Sizes for the GPU run, or toy sizes for --dry-run (CPU, interpreter)."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.int64_n = 3 * 4093 + 517 if dry else 2**31 + 1000
        self.sweep = [(512, 4), (1024, 4)] if dry else [(512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8),
                                                        (4096, 4), (4096, 8)]  # fmt: skip
        self.sweep_n = 5000 if dry else None  # None: ResNet-50's size
        self.rounding_n = 4096 + 17 if dry else 2**20 + 17
        self.copy_bytes = 2**16 if dry else 2**30
        self.epoch_ends = 2 if dry else 10
        self.profile_calls = 2 if dry else 20
        self.host_calls = 3 if dry else 50
        self.e2e = (8, 16, 2, 3) if dry else (256, 112, 10, 40)  # batch, pixels, warm-up steps, timed steps
        self.capture = (4, 32, 3) if dry else (32, 224, 20)  # batch, pixels, replays
        self.budget_s = 300.0 if dry else 480.0

    def shapes(self) -> list[tuple[int, ...]]:
        """ResNet-50's parameter shapes, or a toy set with the same kinds (4-D, 2-D, 1-D) on the dry run."""
        if self.dry:
            return [(8, 3, 3, 3), (8,), (8,), (16, 8, 3, 3), (16,), (16,), (10, 16), (10,), (1500,)]
        from shapes import torchvision_shapes

        return torchvision_shapes("resnet50")


# ----------------------------------------------------------------------------------------------- the report
class SectionTimeout(Exception):
    pass


class Report:
    """The markdown report, rewritten whole after every change of a section's status."""

    def __init__(self, path: Path, header: list[str], mirror: Path | None) -> None:
        self.path, self.header, self.mirror = path, header, mirror
        self.status: dict[str, tuple[str, float, str]] = {}  # name -> (status, seconds, note)
        self.bodies: dict[str, list[str]] = {}
        self.current: str | None = None

    def add(self, *lines: str) -> None:
        for line in lines:
            print(line, flush=True)
            self.bodies.setdefault(self.current, []).append(line)

    def table(self, header: list[str], rows: list[list[object]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        self.add(*("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows))
        self.add("")

    def set(self, name: str, status: str, seconds: float = 0.0, note: str = "") -> None:
        self.status[name] = (status, seconds, note)
        self.write()

    def write(self) -> None:
        lines = [*self.header, "## Sections", "", "| section | status | s | note |", "|---|---|---|---|"]
        for name, (status, seconds, note) in self.status.items():
            lines.append(f"| {name} | {status} | {seconds:.1f} | {note} |")
        lines.append("")
        for name in self.status:
            if self.bodies.get(name):
                lines += [f"## {name}", "", *self.bodies[name], ""]
        lines.append(GPU_ONLY_NOTE)
        text = "\n".join(lines) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(text)
        partial.replace(self.path)
        if self.mirror is not None:
            with contextlib.suppress(OSError):
                shutil.copyfile(self.path, self.mirror / self.path.name)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise SectionTimeout in the main thread after ``seconds`` (a section that hangs in Python must not take the
    run with it); a no-op where SIGALRM does not exist."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise SectionTimeout(f"section time limit of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----------------------------------------------------------------------------------------------- measuring
class HostReads:
    """Counts reads of tensor values on the host (item, float, int, bool, tolist): the CPU's stand-in for syncs."""

    NAMES = ("item", "__float__", "__int__", "__bool__", "tolist")

    def __init__(self) -> None:
        self.reads: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def active(self) -> Iterator[HostReads]:
        saved = {name: torch.Tensor.__dict__.get(name) for name in self.NAMES}
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def wrapper(tensor, *args, _original=original, _name=name, **kwargs):
                self.reads[_name] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        try:
            yield self
        finally:
            for name, original in saved.items():
                if original is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, original)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable[[], object], cfg: Config) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile of one call in ms: do_bench (L2 flushed) on the GPU, a few timed calls on
    the dry run (only the code path is exercised there)."""
    if cfg.dry:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        return times[1], times[0], times[2]
    return tuple(triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8]))


def host_ms(fn: Callable[[], object], cfg: Config) -> float:
    """Median time of the Python call itself, back to back without a sync (the device runs behind)."""
    synchronize(cfg.device)
    times = []
    for _ in range(cfg.host_calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    synchronize(cfg.device)
    return sorted(times)[len(times) // 2]


def device_profile(fn: Callable[[], object], cfg: Config, calls: int | None = None) -> tuple[float, float, list[str]]:
    """(device kernel ms per call, kernels per call, the most frequent kernel names) from torch.profiler's CUDA
    timeline; on the CPU the profiler runs (the code path) and the figures are NaN."""
    calls = calls or cfg.profile_calls
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cfg.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(cfg.device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        synchronize(cfg.device)
    if cfg.device.type != "cuda":
        return math.nan, math.nan, []
    kernels = [event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(event.time_range.elapsed_us() for event in kernels)
    names = collections.Counter(event.name for event in kernels)
    top = [f"{count / calls:g}× {name[:60]}" for name, count in names.most_common(4)]
    return total_us / 1e3 / calls, len(kernels) / calls, top


def fmt(value: float, digits: int = 4) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------------------------- building
def make_params(cfg: Config, dtype: torch.dtype, seed: int) -> tuple[list[dict], list[torch.nn.Parameter]]:
    """The shapes as two groups (weights with weight decay, the rest without), gradients set (random, nonzero)."""
    generator = torch.Generator(device=cfg.device).manual_seed(seed)
    params = []
    for shape in cfg.shapes():
        p = torch.nn.Parameter(torch.randn(shape, generator=generator, device=cfg.device, dtype=dtype))
        p.grad = torch.randn(shape, generator=generator, device=cfg.device, dtype=dtype)
        params.append(p)
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return groups, params


CONFIGS = {"default": {}, "paper": {"safeguard": False}}


def make_bb(cfg: Config, dtype: torch.dtype, mode: str, backend: str = "triton", **kwargs) -> BB:
    """BB over ResNet-50's parameters (toy on the dry run), gradients set before construction (so the flat
    gradient buffers hold them and every step launches)."""
    groups, _ = make_params(cfg, dtype, seed=0)
    options = dict(lr=LR, beta=BETA, backend=backend, **CONFIGS[mode])
    options.update(kwargs)
    return BB(groups, **options)


class TinyResNet(torch.nn.Module):
    """A small ResNet-ish network for the dry run: a stem, one residual block, pooling, a classifier."""

    def __init__(self, classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width), torch.nn.ReLU()
        )
        self.block = torch.nn.Sequential(
            torch.nn.Conv2d(width, width, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(width),
            torch.nn.ReLU(),
            torch.nn.Conv2d(width, width, 3, padding=1, bias=False),
            torch.nn.BatchNorm2d(width),
        )
        self.head = torch.nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean(dim=(2, 3)))


def make_model(cfg: Config, name: str, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if cfg.dry:
        model = TinyResNet(classes)
    else:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None, num_classes=classes)
    return model.to(cfg.device)


def model_groups(model: torch.nn.Module) -> list[dict]:
    return [
        {"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 5e-5},
        {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
    ]


def batch(cfg: Config, size: int, pixels: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device=cfg.device).manual_seed(seed)
    x = torch.randn(size, 3, pixels, pixels, generator=generator, device=cfg.device)
    return x, torch.randint(0, classes, (size,), generator=generator, device=cfg.device)


def train_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, autocast: bool = False
) -> None:
    """zero_grad, forward (bf16 autocast if asked, CUDA only), backward, step (BB gets the loss)."""
    opt.zero_grad(set_to_none=False)
    context = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    if isinstance(opt, BB):
        opt.step(loss=loss.detach())
    else:
        opt.step()


# ----------------------------------------------------------------------------------------------- sections
def section_launches(report: Report, cfg: Config) -> None:
    """Kernels per plain step and per epoch-end step (the second epoch: the first one's periods are special)."""
    T = 4
    setups = [
        ("default", {}, False),
        ("paper (safeguard=False)", {"safeguard": False}, False),
        ("capturable default", {"capturable": True}, False),
        ("capturable default + track_buffers", {"capturable": True}, True),
        ("capturable paper", {"capturable": True, "safeguard": False}, False),
    ]
    rows, missing = [], []
    x, y = batch(cfg, 4, 16, 10, seed=0)
    for name, options, track in setups:
        model = TinyResNet().to(cfg.device)
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, y)  # gradients before construction
        opt = BB(model_groups(model), lr=LR, steps_per_epoch=T, backend="triton", **options)
        if track:
            opt.track_buffers(model)
        loss = torch.zeros((), device=cfg.device)
        for _ in range(T):  # the first epoch
            opt.step(loss=loss)
        figures = []
        for step_in_epoch in range(1, T + 1):
            if step_in_epoch not in (1, T):
                opt.step(loss=loss)
                continue
            counter = LaunchCounter(count_ops=cfg.device.type == "cpu")  # torch ops that run a kernel
            with counter.active():
                _, kernels, _ = device_profile(functools.partial(opt.step, loss=loss), cfg, calls=1)
            launches = sum(counter.launches.values())
            if launches == 0:
                missing.append(f"{name}, step {step_in_epoch}")
            ops = sum(counter.ops.values()) if counter.count_ops else math.nan
            names = ", ".join(f"{k} {v}" for k, v in sorted(counter.launches.items()))
            figures.append((launches, kernels, ops, names))
        (plain, plain_kernels, plain_ops, plain_names), (end, end_kernels, end_ops, end_names) = figures
        rows.append([name, plain, fmt(plain_kernels, 0), fmt(plain_ops, 0), end, fmt(end_kernels, 0), fmt(end_ops, 0),
                     f"{plain_names}; end: {end_names}"])  # fmt: skip
    report.add(
        f"Tiny ResNet ({sum(p.numel() for p in TinyResNet().parameters()):,} values, 2 groups), T={T}, the second "
        "epoch: its first step (plain) and its last (epoch end). Triton launches are counted through a patched "
        "launcher; CUDA kernels (every kernel, torch's included) by the profiler; torch ops that would run a kernel "
        "(CPU only) by a dispatch mode (kernel_count.py). Targets: a capturable step ≤ "
        f"{TARGET_CAPTURABLE_STEP_KERNELS} kernels, the "
        f"default epoch end ≤ {TARGET_EPOCH_END_KERNELS}.",
        "",
    )
    header = ["configuration", "step: triton launches", "step: CUDA kernels", "step: torch ops (CPU)",
              "epoch end: triton launches", "epoch end: CUDA kernels", "epoch end: torch ops (CPU)",
              "triton kernels"]  # fmt: skip
    report.table(header, rows)
    if missing:
        raise AssertionError(f"no Triton kernel launched in: {'; '.join(missing)}")


def section_no_sync(report: Report, cfg: Config) -> None:
    """The steps must not synchronise; the epoch end's sync (or its absence) is recorded."""
    T = 3
    rows, failures = [], []
    for mode, capturable in (("default", False), ("paper", False), ("default", True), ("paper", True)):
        name = f"{mode}{', capturable' if capturable else ''}"
        opt = make_bb(cfg, torch.float32, mode, steps_per_epoch=T, capturable=capturable)
        opt.grad_scale = torch.tensor(1.0, device=cfg.device)  # as torch.amp.GradScaler sets them
        opt.found_inf = torch.tensor(0.0, device=cfg.device)
        loss = torch.ones((), device=cfg.device)
        for _ in range(2 * T):  # compile, and pass the first BB-rule epoch end
            opt.step(loss=loss)
        synchronize(cfg.device)
        steps = check_sync(cfg, functools.partial(repeat, T - 1, functools.partial(opt.step, loss=loss)))
        epoch_end = check_sync(cfg, functools.partial(opt.step, loss=loss))
        synchronize(cfg.device)
        opt.step(loss=loss)  # finishes an epoch end a sync error interrupted
        on_cuda = cfg.device.type == "cuda"  # on the CPU host reads are recorded, never failed (a proxy)
        steps_sync_free = not (on_cuda and steps[1])
        # The host-counted epoch end may read the rate (recorded); a capturable one must not sync.
        epoch_sync_free = not (on_cuda and capturable and epoch_end[1])
        if not (steps[0] and epoch_end[0] and steps_sync_free and epoch_sync_free):
            failures.append(name)
        rows.append([name, steps[2], epoch_end[2]])
    kind = "torch.cuda.set_sync_debug_mode('error')" if cfg.device.type == "cuda" else "host reads counted (CPU)"
    report.add(
        f"ResNet-50 parameters (toy on the dry run), fp32, GradScaler tensors, T={T}, after 2 epochs; {kind}. "
        "Steps: the T-1 steps before the epoch end (step kernels must launch; no sync allowed). Epoch end: the "
        "epoch's last step (a sync is a failure only with capturable=True).",
        "",
    )
    report.table(["configuration", f"{T - 1} steps", "epoch-end step"], rows)
    if failures:
        raise AssertionError(f"host sync or no launch in: {', '.join(failures)}")


def repeat(times: int, fn: Callable[[], object]) -> None:
    for _ in range(times):
        fn()


def check_sync(cfg: Config, fn: Callable[[], object]) -> tuple[bool, str | None, str]:
    """(whether Triton kernels launched, the sync seen or None, what happened) for fn run under the sync check:
    set_sync_debug_mode("error") on CUDA, host reads of tensor values counted on the CPU."""
    counter = LaunchCounter()
    with counter.active():
        if cfg.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
                synced = None
            except RuntimeError as error:
                synced = str(error).strip().splitlines()[0][:160]
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            with HostReads().active() as reads:
                fn()
            total = sum(reads.reads.values())
            synced = f"{total} ({', '.join(f'{k} {v}' for k, v in reads.reads.items())})" if total else None
    launches = sum(counter.launches.values())
    seen = ("**syncs**: " if cfg.device.type == "cuda" else "host reads (CPU proxy): ") + str(synced)
    text = f"{seen if synced else 'no sync'}; {launches} triton launches"
    if launches == 0:
        text = f"**FAILED: no kernel launched**; {text}"
    return launches > 0, synced, text


def section_rounding(report: Report, cfg: Config) -> None:
    """One step with lr=1, weight decay 0, momentum 0 (paper mode) must store (θ − grad).to(dtype) exactly."""
    n = cfg.rounding_n
    rows, failures = [], []
    for dtype in (torch.float16, torch.bfloat16):
        generator = torch.Generator(device=cfg.device).manual_seed(3)
        theta = (torch.rand(n, generator=generator, device=cfg.device) + 0.5).to(dtype)
        # Gradients about 2**-6 of θ: θ − grad is exact in fp32 and mostly between two dtype values.
        grad = ((torch.rand(n, generator=generator, device=cfg.device) + 0.5) / 61.0).to(dtype)
        exact = theta.float() - grad.float()
        nearest = exact.to(dtype)
        toward_zero = torch.where(
            nearest.float().abs() > exact.abs(), torch.nextafter(nearest, torch.zeros_like(nearest)), nearest
        )
        between = int((nearest.float() != exact).sum())
        for backend in ("triton", "eager"):
            p = torch.nn.Parameter(theta.clone())
            p.grad = grad.clone()
            opt = BB([p], lr=1.0, steps_per_epoch=None, beta=BETA, weight_decay=0.0, momentum=0.0, safeguard=False,
                     backend=backend)  # fmt: skip
            opt.step()
            got = p.detach()
            off_nearest = int((got.view(torch.int16) != nearest.view(torch.int16)).sum())
            off_truncated = int((got.view(torch.int16) != toward_zero.view(torch.int16)).sum())
            interpreted = backend == "triton" and cfg.device.type == "cpu"
            if off_nearest and not interpreted:
                failures.append(f"{backend} {dtype}")
            verdict = (
                "ok" if not off_nearest else ("interpreter truncation (recorded)" if interpreted else "**FAILED**")
            )
            rows.append([str(dtype).removeprefix("torch."), backend, n, between, off_nearest, off_truncated, verdict])
    report.add(
        "BB(lr=1, weight_decay=0, momentum=0, safeguard=False), one step; reference (θ − grad) in fp32, rounded to "
        "nearest (.to(dtype)). 'inexact' counts the elements whose exact difference lies between two dtype values.",
        "",
    )
    header = ["dtype", "backend", "elements", "inexact", "≠ round-to-nearest", "≠ truncation", "verdict"]
    report.table(header, rows)
    if failures:
        raise AssertionError(f"not bit-exact: {', '.join(failures)}")


def section_step_bench(report: Report, cfg: Config) -> None:
    shapes = cfg.shapes()
    n_total = sum(math.prod(s) for s in shapes)
    copy_src = torch.empty(cfg.copy_bytes // 4, device=cfg.device)
    copy_dst = torch.empty_like(copy_src)
    copy_ms = wall_ms(functools.partial(copy_dst.copy_, copy_src), cfg)
    copy_gbs = 2 * cfg.copy_bytes / copy_ms[0] / 1e6
    del copy_src, copy_dst
    rows = [["device copy (read + write)", "fp32", *fmt3(copy_ms), "", "", "", "8", f"{copy_gbs:.0f}", "", "100%", ""]]
    end_rows = []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        p, e = dtype.itemsize, 4
        impls: dict[str, tuple[Callable[[], object], int]] = {}
        optimizers = {
            "BB default (triton)": make_bb(cfg, dtype, "default", steps_per_epoch=None),
            "BB paper (triton)": make_bb(cfg, dtype, "paper", steps_per_epoch=None),
            "BB default (eager)": make_bb(cfg, dtype, "default", backend="eager", steps_per_epoch=None),
            "BB adam (triton)": make_bb(cfg, dtype, "default", steps_per_epoch=None, preconditioner="adam"),
        }
        for name, opt in optimizers.items():
            # θ, grad, ema; the momentum buffer (not in the paper's mode) and the second moment (adam): 2e each.
            state_bytes = 2 * e * (("paper" not in name) + ("adam" in name))
            impls[name] = (opt.step, 3 * p + 2 * e + state_bytes)
        groups, _ = make_params(cfg, dtype, seed=0)
        sgd = torch.optim.SGD(groups, lr=LR, momentum=MOMENTUM, fused=True)
        impls["SGD momentum fused"] = (sgd.step, 5 * p)
        adam_groups, _ = make_params(cfg, dtype, seed=0)
        adam = torch.optim.Adam(adam_groups, lr=1e-3, fused=True)
        impls["Adam fused"] = (adam.step, 7 * p)  # its moments in the parameter dtype
        sgd_ms = None
        for name, (fn, bytes_per_element) in impls.items():
            fn()  # first call: compilation, momentum buffers
            ms = wall_ms(fn, cfg)
            host = host_ms(fn, cfg)
            device, kernels, _ = device_profile(fn, cfg)
            gbs = bytes_per_element * n_total / ms[0] / 1e6
            device_gbs = bytes_per_element * n_total / device / 1e6
            rows.append([name, dtype_name, *fmt3(ms), fmt(host), fmt(device), fmt(kernels, 1), bytes_per_element,
                         f"{gbs:.0f}", fmt(device_gbs, 0), f"{gbs / copy_gbs:.0%}", ""])  # fmt: skip
            if name == "SGD momentum fused":
                sgd_ms = ms[0]
        for row in rows[-len(impls) :]:
            row[-1] = f"{float(row[2]) / sgd_ms:.2f}"
        if dtype is torch.float32:
            rows += window_rows(cfg, n_total, sgd_ms, copy_gbs)
        for name in ("BB default (triton)", "BB paper (triton)"):
            end_rows.append([name, dtype_name, *time_epoch_end(optimizers[name], cfg)])
        del impls, optimizers, sgd, groups, adam, adam_groups
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    report.add(f"{n_total:,} values, {len(shapes)} tensors in 2 groups; steps_per_epoch=None (no epoch end).", "")
    header = ["operation", "dtype", "wall median ms", "p20-p80 ms", "host ms/call", "device ms/call", "kernels/call",
              "B/elem", "GB/s (wall)", "GB/s (device)", "wall GB/s of copy", "× SGD fused"]  # fmt: skip
    report.table(header, rows)
    report.add(
        "The whole epoch end: `end_epoch()` after an untimed step, synchronised before and after (wall), its host "
        "time (the call's own duration, its sync included), and the profiler's kernels.",
        "",
    )
    header = ["optimizer", "dtype", "wall median ms", "host ms", "device ms", "kernels", "wall / step wall"]
    report.table(header, end_rows)


def window_rows(cfg: Config, n_total: int, sgd_ms: float, copy_gbs: float) -> list[list[object]]:
    """BB's momentum step in each of its gradient-average modes (``bbfused.average_window``): the Triton kernel over
    one flat fp32 buffer of the parameters' size, and the mean over an ImageNet epoch of 5,005 steps, as
    ``bench_window_step.py`` times them on the CPU."""
    from bench_window_step import BYTES, MODES, epoch_shares, mode_step, step_buffers

    backend = tb.TritonBackend()
    buffers = step_buffers(n_total, cfg.device)
    lr = torch.tensor(LR, dtype=torch.float64, device=cfg.device)
    rows, medians = [], {}
    for name, mode in MODES.items():
        step = mode_step(backend, buffers, lr, mode, 5005, WEIGHT_DECAY)
        step()  # compilation
        ms = wall_ms(step, cfg)
        medians[name] = ms[0]
        gbs = BYTES[name] * n_total / ms[0] / 1e6
        rows.append([f"BB momentum step kernel, g: {name}", "fp32", *fmt3(ms), "", "", "", BYTES[name], f"{gbs:.0f}",
                     "", f"{gbs / copy_gbs:.0%}", f"{ms[0] / sgd_ms:.2f}"])  # fmt: skip
    shares = epoch_shares(5005)
    mean = sum(shares[name] * medians[name] for name in MODES)
    mean_bytes = sum(shares[name] * BYTES[name] for name in MODES)
    rows.append(["BB momentum step kernel, an epoch of 5,005 steps", "fp32", f"{mean:.4f}", "", "", "", "",
                 f"{mean_bytes:.1f}", "", "", "", f"{mean / sgd_ms:.2f}"])  # fmt: skip
    return rows


def fmt3(ms: tuple[float, float, float]) -> list[str]:
    return [f"{ms[0]:.4f}", f"{ms[1]:.4f}-{ms[2]:.4f}"]


def time_epoch_end(opt: BB, cfg: Config) -> list[str]:
    walls, hosts = [], []
    for _ in range(cfg.epoch_ends):
        opt.step()
        synchronize(cfg.device)
        start = time.perf_counter()
        opt.end_epoch()
        hosts.append(time.perf_counter() - start)
        synchronize(cfg.device)
        walls.append(time.perf_counter() - start)
    step_ms = wall_ms(opt.step, cfg)[0]

    def one() -> None:
        opt.end_epoch()
        opt.step()  # the next end_epoch() needs a step; subtracted below

    device, kernels, _ = device_profile(one, cfg, calls=max(2, cfg.epoch_ends // 2))
    step_device, step_kernels, _ = device_profile(opt.step, cfg, calls=max(2, cfg.epoch_ends // 2))
    wall = sorted(walls)[len(walls) // 2] * 1e3
    host = sorted(hosts)[len(hosts) // 2] * 1e3
    return [f"{wall:.4f}", f"{host:.4f}", fmt(device - step_device), fmt(kernels - step_kernels, 1),
            f"{wall / step_ms:.1f}"]  # fmt: skip


def section_block_sweep(report: Report, cfg: Config) -> None:
    """The step kernel alone per (BLOCK, num_warps), launched by the backend itself with patched module constants."""
    n = cfg.sweep_n or sum(math.prod(s) for s in cfg.shapes())
    param, grad, ema, buf = (torch.randn(n, device=cfg.device) for _ in range(4))
    lr = torch.tensor(LR, dtype=torch.float64, device=cfg.device)
    backend = tb.TritonBackend()
    with_momentum = {"momentum_buffer": buf, "momentum": MOMENTUM}

    def timed_step(theta: torch.Tensor, gradient: torch.Tensor, extra: dict) -> list[float]:
        """The wall times of one step, checked to be one launch."""

        def launch():
            backend.step(theta, gradient, ema, lr=lr, weight_decay=WEIGHT_DECAY, beta=BETA, **extra)

        counter = LaunchCounter()
        with counter.active():
            launch()
        if sum(counter.launches.values()) != 1:
            raise AssertionError(f"expected one launch, got {dict(counter.launches)}")
        return wall_ms(launch, cfg)

    saved = (tb.BLOCK_SIZE, tb.NUM_WARPS, dict(tb.STEP_OPTIONS))
    rows = []
    try:
        for block, warps in cfg.sweep:
            tb.BLOCK_SIZE, tb.NUM_WARPS = block, warps
            tb.STEP_OPTIONS["num_warps"] = warps
            chosen = " (chosen)" if (block, warps) == saved[:2] else ""
            for label, extra, bytes_per_element in (("paper", {}, 20), ("momentum", with_momentum, 28)):
                ms = timed_step(param, grad, extra)
                rows.append([f"{block}{chosen}", warps, label, *fmt3(ms), f"{bytes_per_element * n / ms[0] / 1e6:.0f}"])
    finally:
        tb.BLOCK_SIZE, tb.NUM_WARPS = saved[:2]
        tb.STEP_OPTIONS.clear()
        tb.STEP_OPTIONS.update(saved[2])
    # The 16-bit step's layout: rows of tb.STEP_ROW (no shared memory, 64-bit 16-bit accesses) against a flat block
    # (128-bit accesses, a shared-memory conversion with barriers), at the chosen block and warps.
    half_param, half_grad = param.to(torch.bfloat16), grad.to(torch.bfloat16)
    saved_rows = dict(tb.STEP_ROW)
    try:
        for row in (saved_rows[torch.bfloat16], 1):
            tb.STEP_ROW[torch.bfloat16] = row
            layout = f"rows of {row}" if row > 1 else "flat"
            chosen = " (chosen)" if row == saved_rows[torch.bfloat16] else ""
            for label, extra, bytes_per_element in (("bf16", {}, 14), ("bf16 momentum", with_momentum, 22)):
                ms = timed_step(half_param, half_grad, extra)
                rows.append([saved[0], saved[1], f"{label}, {layout}{chosen}", *fmt3(ms),
                             f"{bytes_per_element * n / ms[0] / 1e6:.0f}"])  # fmt: skip
    finally:
        tb.STEP_ROW.clear()
        tb.STEP_ROW.update(saved_rows)
    report.add(
        f"{n:,} elements; fp32 paper step 20 B/element, with momentum 28; bf16 parameters (fp32 EMA) 14 and 22.", ""
    )
    report.table(["BLOCK", "warps", "step", "median ms", "p20-p80 ms", "GB/s"], rows)


def section_capture(report: Report, cfg: Config) -> None:
    """A whole training step (forward, backward, BB.step with its epoch end) captured once and replayed."""
    size, pixels, replays = cfg.capture
    T, classes = 5, 1000 if not cfg.dry else 10
    x, y = batch(cfg, size, pixels, classes, seed=1)
    rows, mismatches = [], []
    for mode in ("default", "paper"):
        model = make_model(cfg, "resnet50", classes)
        opt = BB(model_groups(model), lr=LR, steps_per_epoch=T, backend="triton", capturable=True, **CONFIGS[mode])
        opt.track_buffers(model)
        if cfg.device.type != "cuda":
            for _ in range(T + 1):  # the capturable step eagerly: what the capture would record
                train_step(model, opt, x, y)
            rows.append([mode, "skipped: CUDA graphs need CUDA", "", "", "", "", f"{opt.epoch}, {opt.step_in_epoch}",
                         ""])  # fmt: skip
            continue
        eager_model = make_model(cfg, "resnet50", classes)
        eager = BB(model_groups(eager_model), lr=LR, steps_per_epoch=T, backend="triton", **CONFIGS[mode])
        eager_ms = events_ms(functools.partial(train_step, eager_model, eager, x, y), replays, warmup=3)
        static_x, static_y = x.clone(), y.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up: cuDNN, the first step eagerly
                train_step(model, opt, static_x, static_y)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            train_step(model, opt, static_x, static_y)
        replay_ms = events_ms(graph.replay, replays, warmup=0)
        epoch, step = opt.epoch, opt.step_in_epoch
        expected = divmod(3 + replays, T)  # the warm-up steps and the replays (capturing runs nothing)
        lr = opt.lr
        if not math.isfinite(lr):
            raise AssertionError(f"{mode}: the rate after the replays is {lr}")
        # Optimizer alone: its captured step (epoch end gated in), replayed.
        opt_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(opt_graph):
            opt.step()
        opt_ms = events_ms(opt_graph.replay, replays, warmup=2)
        opt_device, opt_kernels, _ = device_profile(opt_graph.replay, cfg, calls=5)
        counts = f"{epoch}, {step}" if (epoch, step) == expected else f"**{epoch}, {step}** (mismatch)"
        if (epoch, step) != expected:
            mismatches.append(mode)
        rows.append([mode, f"{replay_ms:.3f}", f"{eager_ms:.3f}", f"{opt_ms:.3f}", fmt(opt_device), fmt(opt_kernels, 1),
                     counts, f"{expected[0]}, {expected[1]}"])  # fmt: skip
    report.add(
        f"{'ResNet-50' if not cfg.dry else 'tiny ResNet'}, batch {size}, {pixels} px, fp32, T={T}, capturable=True "
        f"with track_buffers; {replays} replays timed with CUDA events (ms per step). Eager: the same training step "
        "with capturable=False, not captured. Optimizer step: BB.step alone captured (its gated epoch end included); "
        "its device ms and kernels per replay from the profiler (0 kernels: the profiler did not trace graph nodes).",
        "",
    )
    header = ["configuration", "replayed training step ms", "eager training step ms", "replayed optimizer step ms",
              "its device ms", "its kernels", "epoch, step after", "expected"]  # fmt: skip
    report.table(header, rows)
    if mismatches:
        raise AssertionError(f"the replayed steps were not all counted: {', '.join(mismatches)}")


def events_ms(fn: Callable[[], object], calls: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def section_end_to_end(report: Report, cfg: Config) -> None:
    size, pixels, warmup, timed = cfg.e2e
    classes, T = 100, 20
    rows = []
    x, y = batch(cfg, size, pixels, classes, seed=2)
    autocast = cfg.device.type == "cuda"
    baseline = None
    for name in ("SGD momentum fused", "BB default (triton)", "BB paper (triton)"):
        model = make_model(cfg, "resnet18", classes)
        if name.startswith("SGD"):
            opt = torch.optim.SGD(model_groups(model), lr=LR, momentum=MOMENTUM, fused=True)
        else:
            mode = "default" if "default" in name else "paper"
            opt = BB(model_groups(model), lr=LR, steps_per_epoch=T, backend="triton", **CONFIGS[mode])
        for _ in range(warmup):
            train_step(model, opt, x, y, autocast)
        synchronize(cfg.device)
        start = time.perf_counter()
        for _ in range(timed):
            train_step(model, opt, x, y, autocast)
        synchronize(cfg.device)
        images_per_s = size * timed / (time.perf_counter() - start)
        baseline = baseline or images_per_s
        rows.append([name, f"{images_per_s:.0f}", f"{images_per_s / baseline:.3f}"])
    model_name = "tiny ResNet, fp32" if cfg.dry else "ResNet-18 (torchvision), bf16 autocast"
    report.add(
        f"{model_name}, batch {size}, {pixels} px, {classes} classes, synthetic data; {warmup} warm-up steps, "
        f"{timed} timed; BB with T={T} (epoch ends included).",
        "",
    )
    report.table(["optimizer", "images/s", "× SGD fused"], rows)


def section_int64(report: Report, cfg: Config) -> None:
    """Step and epoch end over one buffer of int64_n elements; every element compared with what it must be."""
    n = cfg.int64_n
    if cfg.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        needed = 7 * 4 * n + 2**30
        if free < needed:
            report.add(f"not run: {needed / 2**30:.0f} GiB needed, {free / 2**30:.0f} GiB free", "")
            return
    saved_limit = tb.INT32_INDEX_LIMIT
    if cfg.dry:
        tb.INT32_INDEX_LIMIT = 0  # the int64 kernel on a toy buffer
    try:
        period = 4093  # a prime: the pattern is not aligned with blocks or 2**31
        pattern = torch.arange(period, device=cfg.device, dtype=torch.float32)
        grad = pattern.repeat(triton.cdiv(n, period))[:n]  # grad[i] = i mod period
        del pattern
        param, ema = torch.zeros_like(grad), torch.zeros_like(grad)
        lr = torch.tensor(0.5, dtype=torch.float64, device=cfg.device)
        backend = tb.TritonBackend()
        counter = LaunchCounter()
        results = {}
        start = time.perf_counter()
        with counter.active():
            backend.step(param, grad, ema, lr=lr, weight_decay=0.0, beta=1.0)  # θ = -grad/2, g = grad: exact
        results["θ after step"] = torch.equal(param, grad * -0.5)
        results["g after step"] = torch.equal(ema, grad)
        prev_params, prev_ema = torch.zeros_like(grad), torch.zeros_like(grad)
        with counter.active():
            sums = backend.epoch_end(param, ema, prev_params, prev_ema).tolist()
        full, rest = divmod(n, period)
        sum_sq = full * sum(i * i for i in range(period)) + sum(i * i for i in range(rest))  # Σ grad², exact
        results["‖Δθ‖² = Σgrad²/4"] = abs(sums[0] - sum_sq / 4) <= 1e-12 * sum_sq
        results["Δθᵀy = -Σgrad²/2"] = abs(sums[1] + sum_sq / 2) <= 1e-12 * sum_sq
        results["θprev = θ"] = torch.equal(prev_params, param)
        results["gprev = g"] = torch.equal(prev_ema, grad)
        results["g = 0"] = int(torch.count_nonzero(ema)) == 0
        results["last element"] = param[-1].item() == -0.5 * ((n - 1) % period)
        results["kernels launched"] = sum(counter.launches.values()) >= 2
        use_int64 = tb._needs_int64(n)
        elapsed = time.perf_counter() - start
        del grad, param, ema, prev_params, prev_ema
    finally:
        tb.INT32_INDEX_LIMIT = saved_limit
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
    forced = " (forced on the dry run)" if cfg.dry else ""
    report.add(f"One fp32 buffer of {n:,} elements; USE_INT64: {use_int64}{forced}; checks took {elapsed:.1f} s", "")
    report.table(["check", "result"], [[name, "ok" if ok else "**FAILED**"] for name, ok in results.items()])
    failed = [name for name, ok in results.items() if not ok]
    if failed:
        raise AssertionError(f"int64 checks failed: {', '.join(failed)}")


def section_tests(report: Report, cfg: Config, seconds_left: float) -> None:
    """pytest over the Triton and CUDA-graph tests, compiled; the dry run only collects them."""
    command = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-k", "triton or cuda_graph"]
    command += ["tests/test_backends.py", "tests/test_triton_backend.py", "tests/test_capture.py"]
    command += ["tests/test_preconditioned_backends.py", "tests/test_average_window.py"]
    if cfg.dry:
        command.append("--collect-only")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    if not cfg.dry:
        env.pop("TRITON_INTERPRET", None)
    timeout = max(30.0, min(200.0, seconds_left))
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, passed = result.stdout + result.stderr, result.returncode == 0
        status = "passed" if passed else f"FAILED (exit {result.returncode})"
    except subprocess.TimeoutExpired as error:
        output = error.stdout.decode() if isinstance(error.stdout, bytes) else str(error.stdout or "")
        passed, status = False, f"TIMED OUT ({timeout:.0f} s)"
    lines = output.strip().splitlines()
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    summary = lines[-1] if lines else "no output"
    what = "collected (dry run: not run)" if cfg.dry else "run"
    report.add(f"`{' '.join(command[1:])}` {what}: **{status}** in {time.perf_counter() - start:.0f} s; {summary}", "")
    report.add(*(f"- {line}" for line in failures[:40]), "")
    if not passed:
        report.add("```", *lines[-60:], "```", "")
        raise AssertionError(f"pytest {status}")


SECTION_FUNCTIONS: dict[str, Callable[..., None]] = {
    "launches": section_launches,
    "no_sync": section_no_sync,
    "rounding": section_rounding,
    "step_bench": section_step_bench,
    "block_sweep": section_block_sweep,
    "capture": section_capture,
    "end_to_end": section_end_to_end,
    "int64": section_int64,
    "tests": section_tests,
}


# ----------------------------------------------------------------------------------------------- main
def header_lines(cfg: Config, argv: list[str]) -> list[str]:
    if cfg.device.type == "cuda":
        device = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    else:
        device = "CPU dry run: toy sizes, Triton interpreter; timings only exercise the code"
    commit = "unknown"
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"  # fmt: skip
    return [
        "# bbfused GPU check" + (" (dry run)" if cfg.dry else ""),
        "",
        f"- device: {device}",
        f"- torch {torch.__version__}, triton {triton.__version__}, interpreted kernels: "
        f"{getattr(tb, '_INTERPRETED', 'unknown')}",
        f"- BLOCK_SIZE={getattr(tb, 'BLOCK_SIZE', '?')}, NUM_WARPS={getattr(tb, 'NUM_WARPS', '?')}; git {commit}",
        f"- started {datetime.datetime.now().isoformat(timespec='seconds')}; command: "
        f"`python benchmarks/gpu_check.py {' '.join(argv)}`",
        "",
    ]


def default_out(cfg: Config) -> Path:
    date = datetime.date.today().isoformat()
    if cfg.dry:
        return Path(os.environ.get("TMPDIR", "/tmp")) / f"{date}_gpu_check_dry_run.md"
    gpu = re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name()).strip("_").lower()
    return REPO_ROOT / "benchmarks" / "results" / f"{date}_{gpu}.md"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU, Triton through its interpreter")
    parser.add_argument("--out", type=Path, help="the report (default: benchmarks/results/<date>_<gpu>.md)")
    parser.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--fail-section", action="append", default=[], help="make this section raise (testing)")
    parser.add_argument("--budget-s", type=float, help="skip sections that would end past this many seconds")
    args = parser.parse_args(argv)
    if args.dry_run != DRY_RUN:
        raise SystemExit("--dry-run must be given on the command line (TRITON_INTERPRET is set before import)")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False); try --dry-run")
    cfg = Config(args.dry_run)
    budget = args.budget_s or cfg.budget_s
    chosen = SECTIONS if not args.sections else tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = [s for s in (*chosen, *args.fail_section) if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    out = args.out or default_out(cfg)
    mirror = Path(os.environ["OUT"]) if os.environ.get("OUT") and Path(os.environ["OUT"]).is_dir() else None
    mirror = None if mirror is not None and out.resolve().parent == mirror.resolve() else mirror
    report = Report(out, header_lines(cfg, argv), mirror)
    for name in chosen:
        report.status[name] = ("pending", 0.0, "")
    start = time.perf_counter()
    failed = []
    for name in chosen:
        elapsed = time.perf_counter() - start
        estimate = ESTIMATE_S[name] if not cfg.dry else 5
        if elapsed + estimate > budget:
            report.set(
                name, "skipped", 0.0, f"budget: {elapsed:.0f} s spent of {budget:.0f}, about {estimate} s needed"
            )
            continue
        report.current = name
        report.set(name, "running", 0.0, "(a report left here was killed in this section)")
        section_start = time.perf_counter()
        limit = max(60.0, budget - elapsed) if name == "tests" else max(60.0, 4 * estimate)
        try:
            with time_limit(limit):
                if name in args.fail_section:
                    raise RuntimeError(f"--fail-section {name}: failing on purpose")
                if name == "tests":
                    section_tests(report, cfg, budget - elapsed)
                else:
                    SECTION_FUNCTIONS[name](report, cfg)
            status, note = "ok", ""
        except BaseException as error:  # noqa: BLE001 - every failure is recorded, the run goes on
            if isinstance(error, KeyboardInterrupt):
                report.set(name, "FAILED", time.perf_counter() - section_start, "interrupted")
                raise
            report.add("**FAILED**:", "", "```", traceback.format_exc().rstrip(), "```", "")
            status, note = "FAILED", f"{type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"
            failed.append(name)
            with contextlib.suppress(Exception):
                torch.cuda.set_sync_debug_mode("default") if cfg.device.type == "cuda" else None
        finally:
            report.current = None
            gc.collect()
            if cfg.device.type == "cuda":
                with contextlib.suppress(Exception):
                    torch.cuda.empty_cache()
        report.set(name, status, time.perf_counter() - section_start, note.replace("|", "/"))
    report.header.append(f"- total {time.perf_counter() - start:.1f} s; failed sections: {', '.join(failed) or 'none'}")
    report.header.append("")
    report.write()
    print(f"wrote {out}; failed sections: {', '.join(failed) or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
