"""Time one optimizer step, and the BB epoch end, against torch.optim.SGD, torch.optim.Adam and the device's copy
bandwidth.

For every parameter set (model shapes) and dtype, each implementation is built over its own copies of the
parameters, with random gradients set once (never zeros; backward and zero_grad are not timed):

* ``bb-<backend>``: ``bbfused.BB`` with each available backend (eager, triton, cpp), step and epoch end;
* ``bb-<backend>-momentum``: the same with heavy-ball momentum 0.9 fused into the step;
* ``bb-<backend>-adam``: momentum 0.9 and ``preconditioner="adam"`` (the step divides d by √v̂ + ε, v the second
  moment, before the momentum). It always runs BB's default rate control, whatever ``--safeguard`` says: the
  paper's method is SGD and refuses a preconditioner;
* ``sgd-forloop``, ``sgd-foreach``, ``sgd-fused``: ``torch.optim.SGD(momentum=0.9, weight_decay)``;
* ``adam-fused``: ``torch.optim.Adam(weight_decay, fused=True)``, the reference of the Adam-scaled step.

Bytes moved per element (each input read once, each output written once; p = parameter dtype size,
e = EMA size, 4 for fp32 and bf16 parameters):

* BB step: read θ, grad, ema; write θ, ema = 3p + 2e  (fp32: 20 B, bf16: 14 B)
* BB step with momentum: read θ, grad, ema, m; write θ, ema, m = 3p + 4e  (fp32: 28 B, bf16: 22 B; the momentum
  buffer has the EMA's dtype)
* BB step with momentum and Adam's scaling: read θ, grad, ema, m, v; write θ, ema, m, v = 3p + 6e  (fp32: 36 B,
  bf16: 30 B; v has the EMA's dtype)
* BB epoch end: read θ, θprev, g, gprev; write θprev, gprev, g = 3p + 4e  (fp32: 28 B, bf16: 22 B)
  BB is timed paper-exact (``safeguard=False``): the kernels alone. ``--safeguard`` times BB's default, whose
  epoch end is two passes (bbfused.control): one measuring (read θ, θprev, g, gprev: ‖Δθ‖², Δθᵀy, ‖θ‖², ‖g‖²;
  write gprev, g), then one committing (read θ; write θprev) or rolling back: + p (fp32: 32 B), and whose
  steps get a loss (``step(loss=...)``, summed on the device for the loss check), as in training
* BB epoch end with Adam's scaling (always the two passes above): the measuring pass takes ‖Δθ‖² in the step's
  metric, Σ Δθ²·(√v̂ + ε), so it reads v too (BufferSet.measure hands each buffer's second moment to
  epoch_measure): read θ, θprev, g, gprev, v; write gprev, g; then the commit's copy, read θ, write θprev
  = 4p + 5e  (fp32: 36 B, bf16: 28 B). Its steps get a loss, as with ``--safeguard``
* SGD with momentum: read θ, grad, buf; write θ, buf = 5p (the buffer has the parameter dtype; fp32: 20 B)
* torch's Adam: read θ, grad, exp_avg, exp_avg_sq; write θ, exp_avg, exp_avg_sq = 7p (its state has the parameter
  dtype; fp32: 28 B, bf16: 14 B)
* copy (the ceiling): read + write = 2 × 4 B of a large fp32 ``copy_``; ``add_`` (in place): 3 × 4 B

Timing: warm-up (compilation, momentum-buffer creation) first; then samples of several back-to-back calls
between CUDA events (GPU) or ``perf_counter`` (CPU), cycling over enough parameter copies that one cycle
moves more bytes than the caches hold; the median over samples is reported with min and max. The epoch end
is timed call by call, each right after an untimed step of the same optimizer, as in training.

``--end-to-end`` also runs the training command (``python -m bbfused.train --data synthetic``) with BB and with
torch's SGD and reports images/s. Run ``python benchmarks/bench_step.py --help``; benchmarks/README.md says how
to read the output.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import gc
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from unittest import mock

import torch
from shapes import PARAMETER_SETS, Shapes, parameter_set

REPO_ROOT = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("bbfused") is None and (REPO_ROOT / "bbfused").is_dir():
    sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing: use the checkout's package
try:
    import bbfused
    import bbfused.optimizer
    from bbfused.backends import BACKEND_NAMES, unavailable_reason
    from bbfused.buffer_set import BufferSet
    from bbfused.buffers import state_dtype
    from bbfused.checkpoint import SECOND_MOMENT_KEY
except ImportError as error:
    raise SystemExit(f"cannot import bbfused ({error}): install the package (pip install -e .)") from error

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SGD_FORMS = {  # implementation name -> torch.optim.SGD keyword arguments choosing the form
    "sgd-forloop": {"foreach": False},
    "sgd-foreach": {"foreach": True},
    "sgd-fused": {"fused": True},
}
MOMENTUM_SUFFIX = "-momentum"  # bb-<backend>-momentum: BB with momentum fused into the step
ADAM_SUFFIX = "-adam"  # bb-<backend>-adam: BB with momentum and preconditioner="adam"
_BB_PLAIN = tuple(f"bb-{name}" for name in BACKEND_NAMES if name != "auto")
BB_IMPLS = (*_BB_PLAIN, *(impl + MOMENTUM_SUFFIX for impl in _BB_PLAIN), *(impl + ADAM_SUFFIX for impl in _BB_PLAIN))
ADAM_BASELINE = "adam-fused"  # torch.optim.Adam(fused=True): what BB's Adam-scaled step is set against
IMPLS = (*BB_IMPLS, *SGD_FORMS, ADAM_BASELINE)
FUSED_IMPL = {"cuda": "bb-triton", "cpu": "bb-cpp"}  # the fused backend each device type's targets are about
EAGER_BASELINE = "bb-eager"
SGD_BASELINE = "sgd-fused"
# Hyper-parameters of every optimizer: lr and weight decay non-zero so no term is skipped.
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-5
BETA = 0.01  # BB's EMA factor, 4/T for T = 400 steps per epoch
RESULTS_DIR = Path(__file__).resolve().parent / "results"  # recorded results: written there only with --out


def output_root() -> Path:
    """Where a run without ``--out`` writes: outside the repository, so a run leaves a clone clean.

    ``$XDG_CACHE_HOME/bbfused/bench`` (when set to an absolute path), else ``~/.cache/bbfused/bench``, else (no
    home directory, or one inside this repository) ``<system temp dir>/bbfused/bench``.
    """
    cache = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(cache):  # the XDG specification: a relative value is ignored
        try:
            cache = str(Path.home() / ".cache")
        except RuntimeError:  # no home directory can be determined
            cache = ""
    root = Path(cache, "bbfused", "bench") if cache else None
    if root is None or REPO_ROOT in root.resolve().parents:
        root = Path(tempfile.gettempdir(), "bbfused", "bench")
    return root


def default_out_prefix(device_type: str, quick: bool, date: datetime.date | None = None) -> Path:
    """The ``--out`` prefix of a run that names none: ``output_root()/<date>_<device>[_quick]``."""
    date = date or datetime.date.today()
    return output_root() / f"{date.isoformat()}_{device_type}{'_quick' if quick else ''}"


def backend_of(impl: str) -> str:
    """The bbfused backend of a BB implementation: ``bb-cpp-momentum`` -> ``cpp``, ``bb-triton-adam`` -> ``triton``."""
    return impl.removeprefix("bb-").removesuffix(MOMENTUM_SUFFIX).removesuffix(ADAM_SUFFIX)


def has_momentum(impl: str) -> bool:
    """Whether a BB implementation runs with momentum: its -momentum and -adam forms (torch's SGD always does)."""
    return impl.endswith((MOMENTUM_SUFFIX, ADAM_SUFFIX))


def is_adam(impl: str) -> bool:
    """Whether ``impl``'s step is Adam-scaled: BB's -adam forms and torch's Adam."""
    return impl == ADAM_BASELINE or (impl.startswith("bb-") and impl.endswith(ADAM_SUFFIX))


def runs_safeguard(impl: str, safeguard: bool) -> bool:
    """Whether BB implementation ``impl`` runs the default rate control: with ``--safeguard``, and always with
    Adam's scaling (the paper's method refuses a preconditioner)."""
    return safeguard or is_adam(impl)


def eager_twin(impl: str) -> str:
    """The eager BB implementation ``impl``'s row is set against: the same step on the eager backend (torch's Adam:
    BB's Adam-scaled one; torch's SGD: BB's plain step)."""
    if impl == ADAM_BASELINE:
        return EAGER_BASELINE + ADAM_SUFFIX
    if not impl.startswith("bb-"):
        return EAGER_BASELINE
    return EAGER_BASELINE + impl.removeprefix(f"bb-{backend_of(impl)}")


# ----------------------------------------------------------------------------------------------- bytes
def bytes_per_element(impl: str, op: str, dtype: torch.dtype, safeguard: bool = False) -> int:
    """The fewest bytes one parameter element costs ``impl``'s ``op`` (see the module docstring)."""
    p = torch.empty((), dtype=dtype).element_size()
    if impl.startswith("sgd-"):
        return 5 * p
    if impl == ADAM_BASELINE:
        return 7 * p
    e = torch.empty((), dtype=state_dtype(dtype)).element_size()
    if op == "step":
        return 3 * p + (6 if is_adam(impl) else 4 if has_momentum(impl) else 2) * e
    if is_adam(impl):
        return 4 * p + 5 * e
    return 3 * p + 4 * e + (p if safeguard else 0)


# ----------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Per-call seconds of each sample (a sample averages ``calls_per_sample`` back-to-back calls)."""

    samples: list[float]
    calls_per_sample: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


@dataclass
class TimerSettings:
    """How long and how often to time one row."""

    warmup_s: float  # time spent calling before timing (after the first, compiling calls)
    budget_s: float  # rough time spent in the samples of one row
    max_samples: int
    min_samples: int
    min_sample_s: float  # back-to-back calls per sample are chosen so that a sample lasts at least this


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(calls: Sequence[Callable[[], object]], setups: Sequence[Callable[[], object]] | None, k: int) -> None:
    if setups is not None:
        setups[k % len(setups)]()
    calls[k % len(calls)]()


def measure(
    calls: Sequence[Callable[[], object]],
    device: torch.device,
    settings: TimerSettings,
    setups: Sequence[Callable[[], object]] | None = None,
) -> Timing:
    """Time ``calls`` (cycled over, one per parameter copy) on ``device``.

    Without ``setups``, each sample times several back-to-back calls (throughput: launch overhead overlaps
    the device work as in training). With ``setups``, each call is timed alone right after its untimed setup.
    """
    n = len(calls)
    for k in range(max(2, n)):  # compilation, lazily created state, every copy touched once
        _run(calls, setups, k)
    _synchronize(device)
    batch, elapsed = 1, 0.0
    while True:  # batches double until one lasts warmup_s: the per-call estimate comes from the last
        start = time.perf_counter()
        for k in range(batch):
            _run(calls, setups, k)
        _synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= settings.warmup_s:
            break
        batch *= 2
    per_call = elapsed / batch
    inner = 1 if setups is not None else max(1, math.ceil(settings.min_sample_s / per_call))
    count = int(settings.budget_s / (inner * per_call))
    count = min(settings.max_samples, max(settings.min_samples, count))

    k = 0
    if device.type == "cuda":
        events = []
        for _ in range(count):
            start_event = torch.cuda.Event(enable_timing=True)
            end_event = torch.cuda.Event(enable_timing=True)
            if setups is not None:
                setups[k % n]()
            start_event.record()
            for _ in range(inner):
                calls[k % n]()
                k += 1
            end_event.record()
            events.append((start_event, end_event))
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) / 1e3 / inner for s, e in events]
    else:
        samples = []
        for _ in range(count):
            if setups is not None:
                setups[k % n]()
            start = time.perf_counter()
            for _ in range(inner):
                calls[k % n]()
                k += 1
            samples.append((time.perf_counter() - start) / inner)
    return Timing(samples, inner)


def profile_table(
    calls: Sequence[Callable[[], object]],
    device: torch.device,
    setups: Sequence[Callable[[], object]] | None = None,
    count: int = 5,
) -> str:
    """torch.profiler's per-op table over ``count`` calls (with their setups): where one row's time goes."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    sort_by = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        sort_by = "self_device_time_total"
    with torch.profiler.profile(activities=activities) as profiler:
        for k in range(count):
            _run(calls, setups, k)
        _synchronize(device)
    return profiler.key_averages().table(sort_by=sort_by, row_limit=15)


# ----------------------------------------------------------------------------------------------- workloads
def make_parameters(shapes: Shapes, dtype: torch.dtype, device: torch.device, seed: int) -> list[torch.nn.Parameter]:
    """Parameters with standard-normal values and gradients (never zeros: zeros can run faster)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype, device=device))
        param.grad = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        params.append(param)
    return params


def build_optimizer(impl: str, params: list[torch.nn.Parameter], safeguard: bool = False) -> torch.optim.Optimizer:
    """Implementation ``impl`` over ``params`` (gradients already set, so BB sees every one as written)."""
    if impl in SGD_FORMS:
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, **SGD_FORMS[impl])
    if impl == ADAM_BASELINE:
        return torch.optim.Adam(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    # steps_per_epoch=None: a timed step never closes an epoch; the epoch end is timed on its own.
    options = dict(
        lr=LR,
        steps_per_epoch=None,
        beta=BETA,
        weight_decay=WEIGHT_DECAY,
        backend=backend_of(impl),
        safeguard=runs_safeguard(impl, safeguard),
    )
    if is_adam(impl):
        return bbfused.BB(params, momentum=MOMENTUM, preconditioner="adam", **options)
    if not has_momentum(impl):
        return bbfused.BB(params, **options)
    if "momentum" in inspect.signature(bbfused.BB).parameters:
        return bbfused.BB(params, momentum=MOMENTUM, **options)
    # A BB without a momentum argument still runs the fused momentum step when its buffer set is built with one.
    with mock.patch.object(bbfused.optimizer, "BufferSet", functools.partial(BufferSet, momentum=MOMENTUM)):
        return bbfused.BB(params, **options)


def check_updates(
    params: list[torch.nn.Parameter], step: Callable[[], object], written: list[torch.Tensor] | None = None
) -> None:
    """Raise unless one ``step`` changes every parameter tensor: a no-op must never be timed.

    ``written``: per parameter, a state tensor the step writes wherever it steps; a parameter whose values all stayed
    then passes if it changed (and some parameter changed). BB's Adam-scaled step needs this: its first moves, about
    lr·(1 − μ) = 1e-4 (its rate starts at 1e-3), are under half a bf16 ulp of all but the smallest weights, so a
    small bf16 tensor (the MLP's 10 biases) can keep every value while its second moment changes.
    """
    before = [p.detach().clone() for p in params]
    written_before = None if written is None else [t.detach().clone() for t in written]
    step()
    changed = [not torch.equal(p.detach(), old) for p, old in zip(params, before)]
    if written is not None and any(changed):
        changed = [c or not torch.equal(t.detach(), old) for c, t, old in zip(changed, written, written_before)]
    unchanged = changed.count(False)
    if unchanged:
        raise RuntimeError(f"one step left {unchanged} of {len(params)} parameter tensors unchanged")


def copies_for(numel: int, step_bytes: int, rotate_bytes: int) -> int:
    """How many parameter copies one cycle needs to move at least ``rotate_bytes`` (more than the caches)."""
    return max(1, min(64, math.ceil(rotate_bytes / (numel * step_bytes))))


@dataclass
class Workload:
    """The optimizers of one implementation over ``len(optimizers)`` copies of one parameter set."""

    impl: str
    optimizers: list[torch.optim.Optimizer]
    params: list[list[torch.nn.Parameter]]
    loss: torch.Tensor | None = None  # given to every BB step with --safeguard, as the training command does

    def step_calls(self) -> list[Callable[[], object]]:
        if self.loss is None:
            return [opt.step for opt in self.optimizers]
        return [functools.partial(opt.step, loss=self.loss) for opt in self.optimizers]

    def epoch_end_calls(self) -> list[Callable[[], object]]:
        return [opt.end_epoch for opt in self.optimizers]  # type: ignore[attr-defined]


def build_workload(
    impl: str, shapes: Shapes, dtype: torch.dtype, device: torch.device, rotate_bytes: int, safeguard: bool = False
) -> Workload:
    """``impl`` over enough copies of ``shapes`` to defeat the caches; checks that a step updates everything."""
    numel = sum(math.prod(shape) for shape in shapes)
    copies = copies_for(numel, bytes_per_element(impl, "step", dtype), rotate_bytes)
    params = [make_parameters(shapes, dtype, device, seed=copy) for copy in range(copies)]
    optimizers = [build_optimizer(impl, ps, safeguard) for ps in params]
    written = None
    if impl in BB_IMPLS and is_adam(impl):
        written = [optimizers[0].state[p][SECOND_MOMENT_KEY] for p in params[0]]
    check_updates(params[0], optimizers[0].step, written)
    loss = torch.tensor(1.0, device=device) if impl in BB_IMPLS and runs_safeguard(impl, safeguard) else None
    return Workload(impl, optimizers, params, loss)


def available_impls(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The implementations that can run on ``device`` and, for the others, why not."""
    available, skipped = [], {}
    for impl in IMPLS:
        backend = backend_of(impl)
        if backend == "triton" and device.type == "cpu":
            reason = "on the CPU Triton runs only in its interpreter (TRITON_INTERPRET=1), which is not worth timing"
        elif impl in BB_IMPLS:
            reason = unavailable_reason(backend, device)
        else:
            reason = None
        if reason is None:
            available.append(impl)
        else:
            skipped[impl] = reason
    return available, skipped


# ----------------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    """One timed operation: an implementation's step or epoch end on one parameter set and dtype."""

    set: str
    dtype: str
    impl: str
    op: str  # "step", "epoch_end", or a reference: "copy", "add_"
    tensors: int
    numel: int
    bytes_per_element: int
    copies: int
    calls_per_sample: int
    samples: int
    median_ms: float
    min_ms: float
    max_ms: float
    gb_per_s: float
    pct_of_copy: float | None = None
    x_faster_than_eager: float | None = None  # the eager BB time of the same op over this time
    time_over_sgd_fused: float | None = None  # this step's time over torch's fused SGD step
    time_over_own_step: float | None = None  # epoch end only: over the same implementation's step
    time_over_adam_fused: float | None = None  # an Adam-scaled step's time over torch's fused Adam step


def make_row(set_name: str, dtype: str, impl: str, op: str, shapes: Shapes, bpe: int, copies: int, t: Timing) -> Row:
    numel = sum(math.prod(shape) for shape in shapes)
    return Row(
        set=set_name,
        dtype=dtype,
        impl=impl,
        op=op,
        tensors=len(shapes),
        numel=numel,
        bytes_per_element=bpe,
        copies=copies,
        calls_per_sample=t.calls_per_sample,
        samples=len(t.samples),
        median_ms=t.median * 1e3,
        min_ms=min(t.samples) * 1e3,
        max_ms=max(t.samples) * 1e3,
        gb_per_s=bpe * numel / t.median / 1e9,
    )


def add_ratios(rows: list[Row], copy_gb_per_s: float) -> None:
    """Fill the derived columns: % of copy bandwidth and the ratios to the named baselines."""
    by_key = {(r.set, r.dtype, r.impl, r.op): r for r in rows}
    for r in rows:
        r.pct_of_copy = 100 * r.gb_per_s / copy_gb_per_s
        eager = by_key.get((r.set, r.dtype, eager_twin(r.impl), r.op))
        if eager is not None:
            r.x_faster_than_eager = eager.median_ms / r.median_ms
        sgd = by_key.get((r.set, r.dtype, SGD_BASELINE, "step"))
        if r.op == "step" and sgd is not None:
            r.time_over_sgd_fused = r.median_ms / sgd.median_ms
        adam = by_key.get((r.set, r.dtype, ADAM_BASELINE, "step"))
        if r.op == "step" and adam is not None and is_adam(r.impl):
            r.time_over_adam_fused = r.median_ms / adam.median_ms
        own_step = by_key.get((r.set, r.dtype, r.impl, "step"))
        if r.op == "epoch_end" and own_step is not None:
            r.time_over_own_step = r.median_ms / own_step.median_ms


# ----------------------------------------------------------------------------------------------- targets
@dataclass
class Target:
    """A performance target of the fused backend (what it measures, its threshold) evaluated on one row."""

    name: str  # what is measured, e.g. "Step time against torch's fused SGD"
    row: str
    value: float
    bound: float  # the threshold: value >= bound (higher_is_better) or value <= bound meets the target
    higher_is_better: bool
    note: str = ""
    unit: str = "x"  # "x" (a ratio) or "%"
    met: bool = field(init=False)

    def __post_init__(self) -> None:
        self.met = self.value >= self.bound if self.higher_is_better else self.value <= self.bound

    def verdict(self) -> str:
        """``met``, or by how much it is not: ``not met: 20 % over`` (a bound), ``not met: 20 % short`` (a floor)."""
        if self.met:
            return "met"
        if self.higher_is_better:
            pct, side = 100 * (1 - self.value / self.bound), "short"
        else:
            pct, side = 100 * (self.value / self.bound - 1), "over"
        return f"not met: {pct:.0f} % {side}" if pct >= 0.5 else f"not met: under 1 % {side}"

    def describe(self) -> str:
        """One line: ``Step time against torch's fused SGD (mlp fp32 step): 1.2x (target ≤ 1x): not met: 20 % over``."""
        unit = " %" if self.unit == "%" else self.unit
        relation = "≥" if self.higher_is_better else "≤"
        note = f"; {self.note}" if self.note else ""
        return (
            f"{self.name} ({self.row}): {self.value:.3g}{unit} (target {relation} {self.bound:g}{unit}): "
            f"{self.verdict()}{note}"
        )


def evaluate_targets(rows: list[Row], device: torch.device) -> list[Target]:
    """The performance targets of the fused backend of ``device`` (triton on GPU, cpp on CPU)."""
    fused = FUSED_IMPL[device.type]
    by_key = {(r.set, r.dtype, r.impl, r.op): r for r in rows}
    targets: list[Target] = []
    for r in rows:
        if r.impl not in (fused, fused + MOMENTUM_SUFFIX):
            continue
        where = f"{r.set} {r.dtype} {r.op}"
        sgd = by_key.get((r.set, r.dtype, SGD_BASELINE, "step"))
        floor = r.bytes_per_element / sgd.bytes_per_element if sgd else None
        bytes_floor = f"bytes floor {floor:.2f}x (the bytes it must move over torch's)" if floor else ""
        if has_momentum(r.impl):
            # Both with momentum, BB moves more bytes (its EMA and momentum buffer): the bound is that ratio.
            if r.op == "step" and r.time_over_sgd_fused is not None and floor is not None:
                name = "Step time with momentum against torch's fused SGD, bound: the bytes floor"
                targets.append(Target(name, where, r.time_over_sgd_fused, round(floor, 2), False))
            continue
        if r.op == "step" and r.time_over_sgd_fused is not None:
            name = "Step time against torch's fused SGD"
            targets.append(Target(name, where, r.time_over_sgd_fused, 1.0, False, bytes_floor))
        if device.type == "cuda":
            if r.op == "step" and r.set in ("resnet50", "flat") and r.pct_of_copy is not None:
                name = "Step bandwidth against copy bandwidth"
                targets.append(Target(name, where, r.pct_of_copy, 90.0, True, unit="%"))
            if r.op == "step" and r.set == "resnet50" and r.x_faster_than_eager is not None:
                name = "Step speed-up over the eager backend"
                targets.append(Target(name, where, r.x_faster_than_eager, 10.0, True))
            if r.op == "epoch_end" and r.time_over_own_step is not None:
                name = "Epoch end time against a step"
                targets.append(Target(name, where, r.time_over_own_step, 2.0, False))
        elif r.op == "step" and r.x_faster_than_eager is not None:
            name = "Step speed-up over the eager backend"
            targets.append(Target(name, where, r.x_faster_than_eager, 2.0, True))
    return targets


# ----------------------------------------------------------------------------------------------- end to end
@dataclass
class Recipe:
    """Settings of the training command in synthetic-data mode."""

    model: str
    image_size: int
    batch_size: int
    steps: int  # per epoch
    flags: tuple[str, ...] = ()


E2E_RECIPES = {
    "cuda": Recipe("resnet50", 224, 128, 100, ("--amp", "bf16", "--channels-last")),
    "cpu": Recipe("resnet50", 224, 16, 4),
    "quick": Recipe("resnet18", 64, 8, 3),
}
E2E_TIMEOUT_S = 1200  # per training run; a hung run must not hang the benchmark


@dataclass
class EndToEnd:
    """Training throughput of one optimizer: images/s of each of two epochs (the first one warms up)."""

    optimizer: str
    command: str
    images_per_s: list[float] = field(default_factory=list)
    error: str | None = None


def end_to_end(device: torch.device, bb_backend: str, recipe: Recipe) -> list[EndToEnd]:
    """Run ``python -m bbfused.train --data synthetic`` for two epochs with BB and with torch's SGD."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    results = []
    for label, flags in (
        (f"bb ({bb_backend})", ["--optimizer", "bb", "--bb-backend", bb_backend]),
        ("sgd (momentum 0.9)", ["--optimizer", "sgd"]),
    ):
        with tempfile.TemporaryDirectory() as out:
            command = [
                *(sys.executable, "-m", "bbfused.train", "--data", "synthetic", "--device", device.type),
                *("--model", recipe.model, "--image-size", str(recipe.image_size), "--epochs", "2"),
                *("--batch-size", str(recipe.batch_size), "--limit-train", str(recipe.batch_size * recipe.steps)),
                *("--limit-test", str(recipe.batch_size), *recipe.flags, *flags, "--output-dir", out),
            ]
            print(f"  end to end: {shlex.join(command)}", file=sys.stderr)
            row = EndToEnd(label, shlex.join(["python", *command[1:-2]]))
            try:
                result = subprocess.run(
                    command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=E2E_TIMEOUT_S
                )
                if result.returncode != 0:
                    row.error = f"exit code {result.returncode}: {result.stderr.strip()[-500:]}"
                else:
                    log = (Path(out) / "log.jsonl").read_text().splitlines()
                    row.images_per_s = [json.loads(line)["images_per_s"] for line in log]
            except subprocess.TimeoutExpired:
                row.error = f"no result within {E2E_TIMEOUT_S} s"
            except (OSError, ValueError, KeyError) as error:  # the training command's log changed shape
                row.error = f"images_per_s not found in its log.jsonl: {type(error).__name__}: {error}"
        results.append(row)
    return results


def format_end_to_end(results: list[EndToEnd], recipe: Recipe) -> list[str]:
    lines = [
        "",
        f"End to end ({recipe.model}, {recipe.image_size}px, batch {recipe.batch_size}, {recipe.steps} steps/epoch, "
        f"{' '.join(recipe.flags) or 'fp32'}; images/s of epoch 2, epoch 1 warms up):",
    ]
    rates = {r.optimizer: r.images_per_s[-1] for r in results if r.images_per_s}
    for r in results:
        if r.error:
            lines.append(f"- {r.optimizer}: FAILED {r.error}")
        else:
            lines.append(f"- {r.optimizer}: {r.images_per_s[-1]:,.1f} img/s (epoch 1: {r.images_per_s[0]:,.1f})")
    if len(rates) == 2:
        bb, sgd = rates.values()
        lines.append(f"- bb / sgd images/s: {bb / sgd:.3f}")
    return lines


# ----------------------------------------------------------------------------------------------- conditions
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def conditions(device: torch.device) -> dict[str, object]:
    """What the numbers depend on: machine, device, versions, load, command."""
    info: dict[str, object] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "torchvision": _version("torchvision"),
        "bbfused": bbfused.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "device": str(device),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    return info


# ----------------------------------------------------------------------------------------------- output
COLUMNS = (  # header, Row attribute, format
    ("set", "set", "{}"),
    ("dtype", "dtype", "{}"),
    ("impl", "impl", "{}"),
    ("op", "op", "{}"),
    ("B/el", "bytes_per_element", "{}"),
    ("median ms", "median_ms", "{:.4g}"),
    ("min ms", "min_ms", "{:.4g}"),
    ("max ms", "max_ms", "{:.4g}"),
    ("GB/s", "gb_per_s", "{:.1f}"),
    ("% copy", "pct_of_copy", "{:.0f}"),
    ("x faster than eager", "x_faster_than_eager", "{:.2f}"),
    ("time / SGD fused", "time_over_sgd_fused", "{:.2f}"),
    ("time / Adam fused", "time_over_adam_fused", "{:.2f}"),
    ("time / own step", "time_over_own_step", "{:.2f}"),
)


@dataclass
class Report:
    """Everything one run measured, with its conditions."""

    conditions: dict[str, object]
    rows: list[Row]
    not_timed: dict[str, str]
    targets: list[Target]
    end_to_end: list[EndToEnd] = field(default_factory=list)
    recipe: Recipe | None = None
    profiles: dict[str, str] = field(default_factory=dict)  # row title -> torch.profiler table


def format_table(rows: list[Row], markdown: bool) -> str:
    cells = [[header for header, _, _ in COLUMNS]]
    for r in rows:
        cells.append(["" if getattr(r, a) is None else f.format(getattr(r, a)) for _, a, f in COLUMNS])
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "|" + "---|" * len(COLUMNS))
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    text_columns = 4  # set, dtype, impl, op: left-aligned; numbers right-aligned
    return "\n".join(
        "  ".join(c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    )


def format_report(report: Report, markdown: bool) -> str:
    parts = []
    if markdown:
        parts += ["# bench_step results", "", "## Conditions", ""]
        parts += [f"- {key}: `{value}`" for key, value in report.conditions.items()]
        parts += ["", "## Times (per call)", ""]
    parts.append(format_table(report.rows, markdown))
    if report.not_timed:
        parts += ["", "Not timed:"] + [f"- {impl}: {reason}" for impl, reason in report.not_timed.items()]
    if report.targets:
        parts += ["", "Targets of the fused backend (bb-triton on the GPU, bb-cpp on the CPU):"]
        parts += [f"- {t.describe()}" for t in report.targets]
    if report.recipe is not None:
        parts += format_end_to_end(report.end_to_end, report.recipe)
    return "\n".join(parts)


def save(prefix: Path, report: Report) -> list[Path]:
    """Write prefix.json (everything), .csv (the rows), .md (the readable report), _profile.txt (if any)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = [Path(f"{prefix}{suffix}") for suffix in (".json", ".csv", ".md")]
    data = asdict(report)
    data["targets"] = [{**asdict(t), "verdict": t.verdict()} for t in report.targets]
    data.pop("profiles")
    paths[0].write_text(json.dumps(data, indent=1) + "\n")
    with paths[1].open("w", newline="") as csv_file:
        writer = csv.DictWriter(csv_file, fieldnames=[column.name for column in fields(Row)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in report.rows)
    paths[2].write_text(format_report(report, markdown=True) + "\n")
    if report.profiles:
        paths.append(Path(f"{prefix}_profile.txt"))
        paths[3].write_text("".join(f"== {title}\n{table}\n\n" for title, table in report.profiles.items()))
    return paths


# ----------------------------------------------------------------------------------------------- main
def measure_references(device: torch.device, log2_numel: int, settings: TimerSettings) -> list[Row]:
    """The bandwidth references over 2**log2_numel fp32 values, bytes read + written.

    ``copy``: ``y.copy_(x)``, 8 B per element, the ceiling the bandwidth target is set against. ``add_``:
    ``y.add_(x)``, 12 B per element, in place like an optimizer update; on a CPU with write-allocate caches it
    can beat the copy, whose store to a fresh line first reads it (12 B moved for the 8 B counted).
    """
    x = torch.randn(2**log2_numel, device=device)
    y = torch.randn(2**log2_numel, device=device)
    shapes = [tuple(x.shape)]
    size = f"2^{log2_numel}"
    copy = measure([lambda: y.copy_(x)], device, settings)
    add = measure([lambda: y.add_(x, alpha=1e-6)], device, settings)
    return [
        make_row(size, "fp32", "torch", "copy", shapes, 8, 1, copy),
        make_row(size, "fp32", "torch", "add_", shapes, 12, 1, add),
    ]


def run_case(
    set_name: str,
    dtype_name: str,
    impls: list[str],
    device: torch.device,
    settings: TimerSettings,
    args: argparse.Namespace,
    report: Report,
) -> None:
    """Time every implementation on one parameter set and dtype into ``report``; failures go to not_timed."""
    shapes = parameter_set(set_name, args.flat_log2)
    dtype = DTYPES[dtype_name]
    for impl in impls:
        ops = ("step", "epoch_end") if impl in BB_IMPLS else ("step",)
        try:
            workload = build_workload(impl, shapes, dtype, device, args.rotate_mib * 2**20, args.safeguard)
            for op in ops:
                calls, setups = workload.step_calls(), None
                if op == "epoch_end":
                    calls, setups = workload.epoch_end_calls(), calls
                timing = measure(calls, device, settings, setups)
                bpe = bytes_per_element(impl, op, dtype, args.safeguard)
                row = make_row(set_name, dtype_name, impl, op, shapes, bpe, len(workload.optimizers), timing)
                report.rows.append(row)
                print(f"  {set_name} {dtype_name} {impl} {op}: {row.median_ms:.4g} ms", file=sys.stderr)
                if args.profile:
                    report.profiles[f"{set_name} {dtype_name} {impl} {op}"] = profile_table(calls, device, setups)
        except Exception as error:  # a backend still being written must not stop the other rows
            report.not_timed[f"{impl} on {set_name} {dtype_name}"] = f"failed: {type(error).__name__}: {error}"
            print(f"  {set_name} {dtype_name} {impl} FAILED: {error}", file=sys.stderr)
        finally:
            workload = calls = setups = None  # frees this implementation's buffers before the next one allocates
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See benchmarks/README.md for what the columns mean.",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to time on (default: cuda when available)",
    )
    parser.add_argument("--quick", action="store_true", help="small CPU-friendly run (about a minute on 2 cores)")
    parser.add_argument(
        "--sets",
        nargs="+",
        choices=PARAMETER_SETS,
        help="parameter sets (default: all on cuda; resnet50 resnet18 mlp on cpu; mlp resnet18 with --quick)",
    )
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=list(DTYPES), help="parameter dtypes")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="implementations to time")
    parser.add_argument("--flat-log2", type=int, default=27, help="the flat tensor has 2**N values (default 27)")
    parser.add_argument(
        "--copy-log2",
        type=int,
        help="the bandwidth references use 2**N fp32 values (default 28 on cuda, 26 on cpu, 24 with --quick)",
    )
    parser.add_argument("--seconds", type=float, help="time budget per row (default 1 on cuda, 2 on cpu, 0.3 quick)")
    parser.add_argument("--samples", type=int, help="at most this many samples per row (default 100, 10 quick)")
    parser.add_argument(
        "--rotate-mib",
        type=int,
        default=512,
        help="cycle over parameter copies until one cycle moves this many MiB (more than the caches; default 512)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="also write torch.profiler tables of every row")
    parser.add_argument(
        "--safeguard",
        action="store_true",
        help="time BB with its default safeguard=True (epoch end + divergence check); default: paper-exact kernels "
        "(bb-<backend>-adam always runs the default: the paper's method has no preconditioner)",
    )
    parser.add_argument(
        "--end-to-end",
        action="store_true",
        help="also time training in synthetic-data mode (python -m bbfused.train): BB fused vs torch SGD, images/s",
    )
    parser.add_argument(
        "--out",
        metavar="PREFIX",
        help="write PREFIX.json, PREFIX.csv, PREFIX.md, exactly there (record results with --out "
        "benchmarks/results/<name>); default: outside the repository, $XDG_CACHE_HOME/bbfused/bench/"
        "<date>_<device>[_quick] (~/.cache without XDG_CACHE_HOME); '-' writes none",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here; use --device cpu")
    if not 10 <= args.flat_log2 <= 33:
        parser.error(f"--flat-log2 {args.flat_log2} is out of range; use 10..33 (default 27: 2**27 values)")
    if args.copy_log2 is not None and not 10 <= args.copy_log2 <= 33:
        parser.error(f"--copy-log2 {args.copy_log2} is out of range; use 10..33")
    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be > 0")
    if args.samples is not None and args.samples < 3:
        parser.error("--samples must be >= 3 (a median needs several samples)")
    if args.rotate_mib < 0:
        parser.error("--rotate-mib must be >= 0 (0: no parameter copies)")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> Report:
    """Run the benchmark ``argv`` asks for; print, save and return its report."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    quick = args.quick
    default_sets = PARAMETER_SETS if device.type == "cuda" else ("resnet50", "resnet18", "mlp")
    sets = args.sets or (["mlp", "resnet18"] if quick else list(default_sets))
    copy_log2 = args.copy_log2 or (24 if quick else 28 if device.type == "cuda" else 26)
    settings = TimerSettings(
        warmup_s=0.05 if quick else 0.2,
        budget_s=args.seconds or (0.3 if quick else 1.0 if device.type == "cuda" else 2.0),
        max_samples=args.samples or (10 if quick else 100),
        min_samples=3 if quick else 5,
        min_sample_s=1e-3 if device.type == "cuda" else 1e-2,
    )
    impls, not_timed = available_impls(device)
    impls = [impl for impl in impls if impl in args.impls]
    report = Report(conditions(device), [], not_timed, [])

    report.rows = measure_references(device, copy_log2, settings)
    copy_gb_per_s = report.rows[0].gb_per_s
    print(f"copy bandwidth: {copy_gb_per_s:.1f} GB/s", file=sys.stderr)
    for set_name in sets:
        for dtype_name in args.dtypes:
            run_case(set_name, dtype_name, impls, device, settings, args, report)
    add_ratios(report.rows, copy_gb_per_s)
    report.targets = evaluate_targets(report.rows, device)
    if args.end_to_end:
        fused = FUSED_IMPL[device.type]
        report.recipe = E2E_RECIPES["quick" if quick else device.type]
        if fused in not_timed:
            report.end_to_end = [EndToEnd(f"bb ({fused})", "", error=not_timed[fused])]
        else:
            report.end_to_end = end_to_end(device, backend_of(fused), report.recipe)
    report.conditions["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    print(format_report(report, markdown=False))
    if args.out != "-":
        prefix = Path(args.out) if args.out else default_out_prefix(device.type, quick)
        paths = save(prefix, report)
        print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
        if not args.out:
            print(
                f"(to record results in the repository: --out {RESULTS_DIR.relative_to(REPO_ROOT)}/<name>)",
                file=sys.stderr,
            )
    return report


if __name__ == "__main__":
    main()
