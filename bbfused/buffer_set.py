"""Every flat buffer of an optimizer, with what each device needs to run them: its backend, its copy of the learning
rate and its count of skipped gradient values.

A :class:`BufferSet` runs the step over every buffer and the epoch end's passes (the rate controls call them
through :class:`EpochBuffers`): each pass over every buffer, the rule's sums of a group that joined late masked
until its join epoch, and the per-buffer sums added in a fixed order on the master device, so every run gives the
same bits.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from .average_window import EMA_UPDATE, EmaMode, window_point
from .backends import Backend, load_backend
from .backends.base import write_share
from .buffer_runs import BufferRun, plan_runs
from .buffers import FlatBuffer, planned_numel, state_dtype, warn_replaced_gradients
from .clock import EpochClock, choose
from .devices import on as _on
from .preconditioner import scaling_for
from .sharded import reduce_sums


class EpochBuffers(Protocol):
    """What a rate control may do to the buffers at an epoch end (:class:`BufferSet` implements it)."""

    backends: dict[torch.device, Backend]  # each device's backend (a rollback restores model buffers with it)

    def measure(self, clock: EpochClock, partials: bool = False) -> torch.Tensor:
        """float64 (4,) on the master device: ‖Δθ‖², Δθᵀy, ‖θ‖², ‖g‖² over every buffer; in the same pass
        prev_ema ← g, g ← 0 (prev_params stays, for a rollback). ``partials``: a (4, n) tensor of per-block sums
        whose rows add up to them may come instead (for a decision kernel that adds them itself)."""

    def commit(self, rolled_back: torch.Tensor, clock: EpochClock) -> None:
        """The second pass: prev_params ← θ, or θ ← prev_params where ``rolled_back`` (a bool device tensor);
        a rolled-back epoch's momentum is zeroed."""

    def paper_pass(self, clock: EpochClock) -> torch.Tensor:
        """The paper's single pass: float64 (2,) ‖Δθ‖², Δθᵀy; prev_params ← θ, prev_ema ← g, g ← 0."""

    def snapshot_params(self) -> None:
        """prev_params ← θ (the point a diverged epoch 0 returns to)."""

    def nonzero_gradient_share(
        self,
        out: torch.Tensor,
        enabled: torch.Tensor | None = None,
        slot: torch.Tensor | None = None,
        skip: torch.Tensor | None = None,
    ) -> None:
        """out ← the share of the trainable parameters' gradient values that are not exactly zero, over every buffer
        (and the ranks that share sharded parameters); ``out``: a float64 0-dim tensor on the master device.
        ``enabled`` gates the reads and the write as an epoch-end pass's flag; ``slot`` and ``skip`` as in
        ``Backend.nonzero_share`` (with a slot ``out`` has two elements)."""

    def kernel_device(self) -> torch.device | None:
        """The device of every buffer when the Triton backend runs them all there, else None."""

    def sq_norm(self, name: str, buffers: Sequence[FlatBuffer] | None = None) -> torch.Tensor:
        """‖buffer ``name``‖² over ``buffers`` (default every buffer), float64 on the master device."""


class BufferSet:
    """The optimizer's flat buffers (a sequence of :class:`FlatBuffer`, in packing order) and their devices."""

    def __init__(
        self,
        backend: str,
        lr: float,
        skip_nonfinite: bool,
        momentum: float = 0.0,
        nesterov: bool = False,
        preconditioner: str | None = None,
    ) -> None:
        self.backend_name = backend
        self.skip_nonfinite = skip_nonfinite
        # Heavy-ball momentum in its EMA form (see base.Backend.step); 0: none, and no momentum buffers.
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        # How the step scales d (``bbfused.preconditioner``): not at all, or Adam's way with a second moment per buffer.
        self.scaling = scaling_for(preconditioner)
        self.buffers: list[FlatBuffer] = []
        # The constructor's buffers that share one allocation per (device, dtype), each stepped with one launch.
        self.runs: list[BufferRun] = []
        self.backends: dict[torch.device, Backend] = {}
        # One float64 learning-rate tensor per device; the first is the master the rate control writes.
        self.lrs: dict[torch.device, torch.Tensor] = {}
        # With skip_nonfinite, per device the count of gradient values that were not finite (read on demand).
        self.nonfinite: dict[torch.device, torch.Tensor] = {}
        # Per group, the first epoch whose end's rate estimate includes it (see BB.add_param_group).
        self.join_epochs: list[int] = []
        self._initial_lr = lr
        # Each buffer's epoch-end pass result, kept until the epoch has closed: a finished epoch end that is run
        # again after an exception must not repeat a pass (it zeroes the gradient averages).
        self._kept_sums: dict[tuple[str, int], torch.Tensor] = {}
        self._warned_replaced = False

    def __getstate__(self) -> dict[str, Any]:
        """Backends travel by name and are loaded again on the copy's side."""
        state = dict(self.__dict__)
        state["backends"] = {device: backend.name for device, backend in self.backends.items()}
        state["runs"] = []  # each copied buffer is allocated anew (FlatBuffer.__setstate__)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.backends = {device: load_backend(name, device) for device, name in state["backends"].items()}

    # ------------------------------------------------------------------ building
    def add_devices(self, devices: Sequence[torch.device]) -> None:
        """Load the backend of each new device (raising before anything changes when one is unavailable) and
        give it its copy of the rate and its counter."""
        new = [d for d in dict.fromkeys(devices) if d not in self.backends]
        backends = {d: load_backend(self.backend_name, d) for d in new}
        for device, backend in backends.items():
            self.backends[device] = backend
            rate = self._initial_lr if not self.lrs else self.lr
            self.lrs[device] = torch.as_tensor(rate, dtype=torch.float64).to(device).clone()
            if self.skip_nonfinite:
                self.nonfinite[device] = torch.zeros((), dtype=torch.int64, device=device)
            self.scaling.add_device(device)

    def pack_groups(self, groups: Sequence[dict[str, Any]], names: Sequence[list[str]]) -> None:
        """Pack the constructor's groups (see :meth:`pack`). On a backend that steps by blocks, the buffers that
        several groups have on one (device, dtype) form a run (``bbfused.buffer_runs``): one launch for them all."""
        kinds = [
            {kind: planned_numel([group["params"][i] for i in indices]) for kind, indices in _by_kind(group).items()}
            for group in groups
        ]
        blocks = {device: getattr(backend, "weight_decay_block", None) for device, backend in self.backends.items()}
        runs = plan_runs(kinds, blocks, self.momentum > 0, self.scaling.second_moment)
        for index, (group, group_names) in enumerate(zip(groups, names)):
            self.pack(group, group_names, index, join_epoch=0, runs=runs)
        self.runs = list(runs.values())

    def pack(
        self,
        group: dict[str, Any],
        names: list[str],
        group_index: int,
        join_epoch: int,
        added: bool = False,
        runs: dict[tuple[torch.device, torch.dtype], BufferRun] | None = None,
    ) -> list[FlatBuffer]:
        """Pack the group's parameters into flat buffers, one per (device, dtype), in first-seen order: from here
        on each parameter's ``.data`` and ``.grad`` are views of them. ``added``: a group added after construction
        (``BB.add_param_group``): prev_params ← θ, and its second moments count their own steps. ``runs``: the
        runs whose next member a buffer of their kind is. Returns the new buffers."""
        self.scaling.add_group(constructor=not added)
        packed = []
        for kind, indices in _by_kind(group).items():
            run = (runs or {}).get(kind)
            buffer = FlatBuffer(
                [group["params"][i] for i in indices],
                [names[i] for i in indices],
                group_index,
                momentum=self.momentum > 0,
                storage=None if run is None else run.next_storage(),
                second_moment=self.scaling.second_moment,
            )
            if run is not None:
                run.buffers.append(buffer)
            packed.append(buffer)
        if added:
            with torch.no_grad():
                for buffer in packed:
                    buffer.prev_params.copy_(buffer.param)
        for buffer in packed:
            self.scaling.add_buffer(len(buffer.params))
        self.buffers.extend(packed)
        self.join_epochs.append(join_epoch)
        return packed

    # ------------------------------------------------------------------ the sequence of buffers
    def __iter__(self) -> Iterator[FlatBuffer]:
        return iter(self.buffers)

    def __len__(self) -> int:
        return len(self.buffers)

    def __getitem__(self, index: int) -> FlatBuffer:
        return self.buffers[index]

    @property
    def master(self) -> torch.device:
        return next(iter(self.lrs))

    @property
    def lr(self) -> torch.Tensor:
        """The learning rate as a float64 0-dim tensor on the master device."""
        return self.lrs[self.master]

    def set_lr(self, value: torch.Tensor | float) -> None:
        for lr in self.lrs.values():
            if value is lr:
                continue
            if isinstance(value, torch.Tensor):
                lr.copy_(_on(value, lr.device))
            else:
                lr.fill_(value)

    def state_views(self) -> Iterator[tuple[torch.nn.Parameter, dict[str, torch.Tensor]]]:
        """Each parameter with its optimizer state, as tensors shaped like it (views of the buffers)."""
        for buffer in self.buffers:
            for index, p in enumerate(buffer.params):
                yield p, buffer.state_views(index)

    def numel(self) -> int:
        return sum(p.numel() for buffer in self.buffers for p in buffer.params)

    def second_moment_lags(self, groups: Sequence[dict[str, Any]]) -> list[list[int]]:
        """Per group, each parameter's lag (the group's steps it missed; ``bbfused.preconditioner``), in the groups'
        parameter order; none without a second moment."""
        if not self.scaling.second_moment:
            return []
        lag_of = {}
        for index, buffer in enumerate(self.buffers):
            lags = self.scaling.lags(index) or [0] * len(buffer.params)
            lag_of.update({id(p): lag for p, lag in zip(buffer.params, lags)})
        return [[lag_of[id(p)] for p in group["params"]] for group in groups]

    def load_second_moment_lags(self, groups: Sequence[dict[str, Any]], lags: list[list[int]]) -> None:
        """Take :meth:`second_moment_lags` of a checkpoint (checked) into the buffers' parameters."""
        lag_of = {id(p): lag for group, group_lags in zip(groups, lags) for p, lag in zip(group["params"], group_lags)}
        for index, buffer in enumerate(self.buffers):
            self.scaling.load_lags(index, [lag_of.get(id(p), 0) for p in buffer.params])

    def skipped_values(self) -> int:
        """How many gradient values were skipped for not being finite (reading it synchronises)."""
        return int(sum(int(count) for count in self.nonfinite.values()))

    # ------------------------------------------------------------------ the step
    def zero_grad(self, set_to_none: bool) -> None:
        for buffer in self.buffers:
            buffer.check()  # a re-allocated parameter (model.half()) gets the clear error, not torch's
        for buffer in self.buffers:
            buffer.zero_grad(set_to_none)

    def adopt_gradients(self) -> None:
        """Raise if a parameter was re-allocated; copy gradients that replaced the flat views back in (one
        warning)."""
        for buffer in self.buffers:
            buffer.check()
        replaced = [buffer.adopt_replaced_gradients() for buffer in self.buffers]
        if any(replaced) and not self._warned_replaced:
            self._warned_replaced = True
            warn_replaced_gradients()

    def step(
        self,
        weight_decays: Sequence[float],
        beta: float,
        grad_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None,
        whole_buffers: bool,
        ema_mode: EmaMode = EMA_UPDATE,
        window_steps: int = 0,
    ) -> None:
        """One update of every parameter with a gradient (every parameter with ``whole_buffers``).
        ``weight_decays``: per group; ``ema_mode``: how the step treats the gradient average of a buffer that can
        take the window (``bbfused.average_window``; the others update it), over windows of ``window_steps``."""
        self.scaling.advance(found_inf)
        launches = self._step_launches(weight_decays, whole_buffers, found_inf is None)
        for buffer, start, end, weight_decay, lag in launches:
            device = buffer.device
            second_moment = None if buffer.second_moment is None else buffer.second_moment[start:end]
            scaling = self.scaling.step_arguments(buffer_group(buffer), device, second_moment, lag)
            self.backends[device].step(
                buffer.param[start:end],
                buffer.grad[start:end],
                buffer.ema[start:end],
                lr=self.lrs[device],
                weight_decay=weight_decay,
                beta=beta,
                grad_scale=_on(grad_scale, device),
                found_inf=_on(found_inf, device),
                nonfinite=self.nonfinite.get(device),
                momentum_buffer=None if buffer.momentum is None else buffer.momentum[start:end],
                momentum=self.momentum,
                nesterov=self.nesterov,
                ema_mode=_buffer_mode(buffer, ema_mode),
                window_steps=window_steps,
                **scaling,
            )

    def open_window_late(self, steps_taken: int, buffers: Sequence[FlatBuffer] | None = None) -> None:
        """Set the gradient average of each buffer that takes the window (of ``buffers``; None: all) to the point its
        window would hold had it opened ``steps_taken`` steps ago with g, an average of d, as those steps' mean:
        g ← θ − c·η·m + η·steps_taken·g (``bbfused.average_window``). For a checkpoint saved inside a window before g
        held the point there, and for a group added inside one (m and g zero: g ← θ)."""
        for buffer in self.buffers if buffers is None else buffers:
            if buffer.momentum is None or buffer.second_moment is not None or not takes_window(buffer):
                continue
            lr = self.lrs[buffer.device]
            point = window_point(buffer.param, buffer.momentum, lr, self.momentum, self.nesterov)
            buffer.ema.copy_(point + (lr.to(buffer.ema.dtype) * steps_taken) * buffer.ema)

    def _step_launches(
        self, weight_decays: Sequence[float], whole_buffers: bool, count_in_place_writes: bool
    ) -> list[tuple[FlatBuffer | BufferRun, int, int, float | torch.Tensor, int]]:
        """What each step launch updates: (buffer or run, start, end, weight decay or a run's per-block table, the
        steps its parameters missed). A run whose every member has a gradient everywhere (and no parameter that
        missed steps) is one launch; otherwise its members step by their ranges, one for each run of parameters with
        gradients and equal lags. The scaling learns which parameters step."""
        ranges, lags = {}, {}
        for index, buffer in enumerate(self.buffers):
            stepped = [True] * len(buffer.params) if whole_buffers else buffer.with_gradients(count_in_place_writes)
            lags[id(buffer)] = self.scaling.lags(index)
            ranges[id(buffer)] = buffer.ranges(stepped, lags[id(buffer)])
            self.scaling.note_step(index, stepped)
        launches = []
        in_one_launch = set()
        for run in self.runs:
            if all(ranges[id(b)] == [(0, b.numel)] and lags[id(b)] is None for b in run.buffers):
                in_one_launch.update(id(buffer) for buffer in run.buffers)
                launches.append((run, 0, run.numel, run.weight_decay_table(weight_decays), 0))
        for buffer in self.buffers:
            if id(buffer) not in in_one_launch:
                buffer_lags = lags[id(buffer)]
                for start, end in ranges[id(buffer)]:
                    lag = 0 if buffer_lags is None else buffer_lags[bisect.bisect_right(buffer.offsets, start) - 1]
                    launches.append((buffer, start, end, weight_decays[buffer.group_index], lag))
        return launches

    def _units(self) -> list[FlatBuffer | BufferRun]:
        """What an epoch-end pass launches over: each run, and each buffer in no run."""
        in_runs = {id(buffer) for run in self.runs for buffer in run.buffers}
        return [*self.runs, *(buffer for buffer in self.buffers if id(buffer) not in in_runs)]

    # ------------------------------------------------------------------ the epoch end (EpochBuffers)
    def measure(self, clock: EpochClock, partials: bool = False) -> torch.Tensor:
        run = getattr(next(iter(self.backends.values())), "epoch_measure_partials", None)
        whole = all(self.join_epochs[b.group_index] == 0 and b.shard_group is None for b in self.buffers)
        if partials and run is not None and len(self.backends) == 1 and whole and self.buffers:
            # Every buffer on one backend that can leave the sums to the decision kernel: no sum launches.
            units = [(*_pass_args(u), u.second_moment) for u in self._units()]
            # A run's constructor groups share one count, so group 0's correction serves every unit.
            metric = self.scaling.measure_arguments(0, self.master)
            return self._run_pass(("partials", 0), clock, self.master, functools.partial(run, **metric), units)
        return reduce_sums(self._pass("epoch_measure", clock), self.buffers)

    def paper_pass(self, clock: EpochClock) -> torch.Tensor:
        return reduce_sums(self._pass("epoch_end", clock), self.buffers)

    def commit(self, rolled_back: torch.Tensor, clock: EpochClock) -> None:
        for unit in self._units():
            flag = _on(rolled_back, unit.device)
            gate = _on(clock.gate, unit.device)
            self.backends[unit.device].epoch_commit(
                unit.param, unit.prev_params, flag, enabled=gate, momentum_buffer=unit.momentum
            )

    def snapshot_params(self) -> None:
        for buffer in self.buffers:
            buffer.prev_params.copy_(buffer.param)

    def nonzero_gradient_share(
        self,
        out: torch.Tensor,
        enabled: torch.Tensor | None = None,
        slot: torch.Tensor | None = None,
        skip: torch.Tensor | None = None,
    ) -> None:
        # A frozen parameter (requires_grad=False), or one that has no gradient in this step as the step counts them
        # (an unused branch after zero_grad(set_to_none=True)), has no gradient, as a dead unit has none: it is left
        # out of the share's denominator. Sharded parameters count whenever they train: the ranks' host flags are
        # not reduced, and every rank must divide by the same number. Read on the host at each count (a captured
        # step keeps the capture's).
        any_sharded = any(b.shard_group is not None for b in self.buffers)
        total = float(max(1, sum(_numel_with_gradients(b, skip is None, any_sharded) for b in self.buffers)))
        if all(b.device == self.master and b.shard_group is None for b in self.buffers):
            # Each buffer's (or run of buffers') share added into ``out`` by its own launch: no torch op (a captured
            # step runs it).
            for index, unit in enumerate(self._units()):
                self.backends[unit.device].nonzero_share(
                    unit.grad, out, total=total, add=index > 0, enabled=enabled, slot=slot, skip=_on(skip, out.device)
                )
            if not self.buffers:
                zero = torch.zeros((), dtype=torch.float64, device=out.device)
                write_share(zero, out, False, enabled, 1.0, slot, _on(skip, out.device))
            return
        # Several devices or sharded parameters: per-buffer counts, gated alike, added (and reduced) on the master.
        active = enabled if slot is None else slot if enabled is None else slot | enabled
        counts = []
        for buffer in self.buffers:
            count = torch.zeros((), dtype=torch.float64, device=buffer.device)
            self.backends[buffer.device].nonzero_share(buffer.grad, count, enabled=_on(active, buffer.device))
            counts.append(_on(count, self.master))
        total_count = reduce_sums(torch.stack(counts).sum(), self.buffers)
        write_share(total_count, out, False, enabled, total, slot, _on(skip, self.master))

    def kernel_device(self) -> torch.device | None:
        if len(self.backends) != 1:
            return None
        ((device, backend),) = self.backends.items()
        return device if backend.name == "triton" else None

    def sq_norm(self, name: str, buffers: Sequence[FlatBuffer] | None = None) -> torch.Tensor:
        buffers = self.buffers if buffers is None else buffers
        norms = [_norm(getattr(b, name)) for b in buffers]
        return reduce_sums(torch.stack([_on(n, self.master) for n in norms]).square().sum(), buffers)

    def epoch_closed(self) -> None:
        """The epoch end went through: its kept pass results are spent."""
        self._kept_sums = {}

    def _pass(self, kind: str, clock: EpochClock) -> torch.Tensor:
        """The sums of backend pass ``kind`` over every buffer, added in buffer order on the master device. Under a
        host clock each buffer's result is kept until the epoch closes (the pass must not run twice); under a
        device clock the pass is gated and nothing is kept."""
        sums = []
        for index, buffer in enumerate(self.buffers):
            run = getattr(self.backends[buffer.device], kind)
            if kind == "epoch_measure" and buffer.second_moment is not None:
                metric = self.scaling.measure_arguments(buffer.group_index, buffer.device)
                run = functools.partial(run, second_moment=buffer.second_moment, **metric)
            buffer_sums = self._run_pass((kind, index), clock, buffer.device, run, *_pass_args(buffer))
            sums.append(self._rule_sums(buffer, buffer_sums, clock))
        if len(sums) == 1:
            return _on(sums[0], self.master)  # the sum of one row is the row: two launches fewer
        return torch.stack([_on(s, self.master) for s in sums]).sum(0)

    def _run_pass(self, key: tuple[str, int], clock: EpochClock, device: torch.device, run, *args) -> torch.Tensor:
        """``run(*args)``, a pass on ``device``: under a device clock gated (every step); under a host clock once per
        epoch end, its result kept under ``key`` for a repeated call (the pass must not run twice)."""
        if clock.gate is not None:
            return run(*args, enabled=_on(clock.gate, device))
        if key not in self._kept_sums:
            self._kept_sums[key] = run(*args)
        return self._kept_sums[key]

    def _rule_sums(self, buffer: FlatBuffer, sums: torch.Tensor, clock: EpochClock) -> torch.Tensor:
        """``buffer``'s pass sums as the epoch end uses them. A group added later than the constructor's has no full
        epoch of history before its join epoch (its snapshots and EMA began mid-way): its ‖Δθ‖² and Δθᵀy (the first
        two sums) would mix part of an epoch, or a gradient with no previous one, into the estimate, so they count
        as 0 until then; its weight and gradient norms count from the start."""
        join = self.join_epochs[buffer.group_index]
        if join == 0:
            return sums
        return choose(clock.reached(join), sums, torch.cat([torch.zeros_like(sums[:2]), sums[2:]]))


def buffer_group(unit: FlatBuffer | BufferRun) -> int:
    """The group index of a buffer, or of a run's first member (a run's members are constructor groups)."""
    return unit.buffers[0].group_index if isinstance(unit, BufferRun) else unit.group_index


def _by_kind(group: dict[str, Any]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """The indices of the group's parameters per (device, dtype), in first-seen order."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(group["params"]):
        by_kind.setdefault((p.device, p.dtype), []).append(i)
    return by_kind


def takes_window(buffer: FlatBuffer | BufferRun) -> bool:
    """Whether ``buffer``'s gradient average can be the window's mean: its parameters are in the state dtype. A
    16-bit parameter rounds each step to 8 or 11 bits, which buries the steps' sum in the window's point difference."""
    return buffer.param.dtype == buffer.ema.dtype


def _buffer_mode(buffer: FlatBuffer | BufferRun, ema_mode: EmaMode) -> EmaMode:
    """The step's ``ema_mode`` for ``buffer``: the clock's on its device, or EMA_UPDATE where it takes no window."""
    if not takes_window(buffer):
        return EMA_UPDATE
    return _on(ema_mode, buffer.device) if isinstance(ema_mode, torch.Tensor) else ema_mode


def _pass_args(buffer: FlatBuffer | BufferRun) -> tuple[torch.Tensor, ...]:
    """What an epoch-end pass reads and writes: θ, g, θ_prev, g_prev."""
    return buffer.param, buffer.ema, buffer.prev_params, buffer.prev_ema


def _norm(flat: torch.Tensor) -> torch.Tensor:
    """‖flat‖ as a float64 0-dim tensor, accumulated in the state dtype.

    A float64 upcast of a float32 buffer would cost a full conversion pass (30x slower on CPU); the safeguard
    compares norms against a growth bound, and an overflow to inf reads as diverged, as it should.
    """
    return torch.linalg.vector_norm(flat, dtype=state_dtype(flat.dtype)).double()


def _numel_with_gradients(buffer: FlatBuffer, count_in_place_writes: bool, every_trainable: bool) -> int:
    """The values of ``buffer``'s trainable parameters that have a gradient in this step, as the step decides it
    (``count_in_place_writes``: a gradient written in place counts, as without GradScaler); with ``every_trainable``,
    those of every trainable parameter."""
    stepped = [True] * len(buffer.params) if every_trainable else buffer.with_gradients(count_in_place_writes)
    return sum(p.numel() for p, has_grad in zip(buffer.params, stepped) if has_grad and p.requires_grad)
