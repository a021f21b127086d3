"""``bbfused.BB``: mini-batch SGD whose learning rate is set once per epoch by the Barzilai–Borwein rule.

The class wires four parts to torch.optim's contract, each in a module of its own: the flat buffers and their
backends (``buffer_set``), the rate control (``control``: the paper's rule or the safeguard), the epoch clock
(``clock``: host-counted, or on the device for CUDA graphs) and the checkpoint format (``checkpoint``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from . import checkpoint, groups
from .arguments import check_nesterov, check_options, check_weight_decay, watched_loss
from .average_window import AverageWindow
from .buffer_set import BufferSet
from .clock import make_clock
from .compiling import eager_under_compile
from .control import control_class, resolve_taus
from .distributed import check_ranks_agree
from .hooks import PeriodHookRegistry, PeriodHooks
from .missing_loss import MissingLoss
from .shown_rate import ShownRate


class BB(PeriodHookRegistry, torch.optim.Optimizer):
    r"""SGD with the Barzilai–Borwein adaptive learning rate (Liang et al., Algorithm 1).

    Each step, for every parameter θ with gradient ∇: d = ∇ + λ·θ (L2 weight decay, per group; ``p.grad`` is not
    modified), θ ← θ − η̂·d (through a momentum buffer in EMA form when momentum > 0), g ← g + β·(d − g). At every
    epoch end, from snapshots of θ and g (Δθ, y: their changes over the epoch), the rule's estimate is
    η = ‖Δθ‖² / (T·|Δθᵀy|). ``safeguard=False`` is the paper exactly (eq. 13: η if τ_min/(k+2) ≤ η ≤ τ_max/(k+2),
    else τ_0/(k+2)). The default (``bbfused.control.safeguard``) splits the first epoch into rate periods, searches
    for the rate there, then follows the estimate in bounded steps, anneals over the second half of ``epochs`` and
    rolls a diverged period back; pass the loss to :meth:`step` (``loss=``) so that it can watch it. With momentum,
    after the first epoch, g is the mean of d over the last quarter of each epoch, read from two points of the run
    (``bbfused.average_window``): the steps in between move no bytes of g.

    Args:
        params: parameters or parameter groups, as for torch.optim; groups may set ``weight_decay``. The rate is
            global: every group's ``"lr"`` shows it (a per-group ``lr`` is ignored, with a warning).
        lr: the initial learning rate η̂_0.
        steps_per_epoch: T; the epoch ends by itself after every T steps. None: end each epoch with
            :meth:`end_epoch` (then give ``beta``).
        epochs: the planned number of epochs: the default control anneals the rate over the second half of them.
        weight_decay: L2 penalty λ (the groups' default).
        momentum, nesterov: heavy-ball (or Nesterov) momentum in EMA form, so the rate is the effective step;
            default 0.9 (0 with ``safeguard=False``).
        beta: EMA factor in (0, 1]; default min(1, 4/T).
        tau0, tau_min, tau_max: the paper's eq. 13 (default 1, 0.1, 10; shallow networks: 1/3, 3); the default
            control has no tau0 and bounds the rate to [tau_min, tau_max] (default 1e-4, 100).
        backend: "eager" (reference), "triton" (CUDA), "cpp" (CPU) or "auto" (the fastest for each device).
        safeguard: the default rate control; False for the paper's method exactly.
        capturable: a whole training step (its epoch end included) can be captured in a CUDA graph and replayed.
        preconditioner: None (the SGD step above) or "adam": d is divided elementwise by √v̂ + ε (v the EMA of d²
            with Adam's β₂ and ε, bias-corrected: ``bbfused.preconditioner``) before the momentum, BB's estimate is
            taken in that metric, and the run starts at lr or the control's first-rate limit, whichever is smaller
            (``bbfused.control.preconditioned``). One more state buffer (``exp_avg_sq``).

    Parameters and gradients live in flat buffers (each ``p.data`` and ``p.grad`` becomes a view), so build the
    optimizer after ``model.to(...)``. The full behaviour reference is ``docs/behaviour.md``.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        steps_per_epoch: int | None = None,
        *,
        epochs: int | None = None,
        weight_decay: float = 0.0,
        momentum: float | None = None,
        nesterov: bool = False,
        beta: float | None = None,
        tau0: float | None = None,
        tau_min: float | None = None,
        tau_max: float | None = None,
        backend: str = "auto",
        safeguard: bool = True,
        capturable: bool = False,
        preconditioner: str | None = None,
    ) -> None:
        options = check_options(
            lr, steps_per_epoch, epochs, weight_decay, momentum, nesterov, beta, tau0, tau_min, tau_max, backend,
            safeguard, capturable, preconditioner,
        )  # fmt: skip
        kind = control_class(options.safeguard, options.preconditioner)  # its defaults fill what was not given
        self.tau0, self.tau_min, self.tau_max = resolve_taus(kind, options.taus)
        lr, self.beta, self.epochs = min(options.lr, kind.FIRST_RATE_LIMIT), options.beta, options.epochs
        momentum = kind.DEFAULT_MOMENTUM if options.momentum is None else options.momentum
        check_nesterov(options.nesterov, momentum)  # the paper's default momentum is 0
        self.safeguard, self.capturable = options.safeguard, options.capturable  # the choices, for reading
        self._building = True
        super().__init__(groups.as_groups(params), {"lr": lr, "weight_decay": options.weight_decay})
        self._building = False
        ignored = {group["lr"] for group in self.param_groups} - {lr}
        for index, group in enumerate(self.param_groups):
            groups.check_group(group, index)
            groups.check_global_options(group, index, momentum, options.nesterov)
        groups.check_groups_apart(self.param_groups)
        devices = [p.device for group in self.param_groups for p in group["params"]]
        self._buffers = BufferSet(
            options.backend, lr, kind.skips_nonfinite, momentum, options.nesterov, options.preconditioner
        )
        self._buffers.add_devices(devices)  # raises before any parameter is re-pointed at a buffer
        periods, kernels = kind.FIRST_EPOCH_PERIODS, self._buffers.kernel_device() == devices[0]  # Triton: clock too
        window = AverageWindow(kind.AVERAGE_WINDOW if momentum else None)  # g's window: its point needs m
        self._clock = make_clock(options.capturable, options.steps_per_epoch, devices[0], periods, kernels, window)
        numel = sum(p.numel() for group in self.param_groups for p in group["params"])
        self._control = kind(self._clock, devices[0], numel, lr, self.epochs)
        names = [groups.param_names(group, index) for index, group in enumerate(self.param_groups)]
        self._buffers.pack_groups(self.param_groups, names)
        self._packed = groups.PackedGroups(self.param_groups)
        self._closing = False  # set while an epoch end runs; still set after an exception in it
        self._ranks_checked = False
        self._late_window_steps = 0  # a loaded window's steps whose g is an average, not the point (load_state_dict)
        self._missing_loss = MissingLoss()  # warns once when a step that needs the loss comes without it
        self._optimizer_period_hooks = PeriodHooks()  # dropped by copies, as torch.optim's hook tables
        self._shown = ShownRate(self._buffers, self._clock, self.param_groups)
        self._index_state()
        self.register_state_dict_post_hook(BB._bb_entry, prepend=True)
        groups.warn_ignored_lrs(ignored, lr)

    def _index_state(self) -> None:
        """``self.state[p]``: parameter p's slices of the state buffers, as torch.optim keeps state per parameter."""
        extras = {key: value for key, value in getattr(self, "state", {}).items() if not isinstance(key, torch.Tensor)}
        self.state = defaultdict(dict, self._buffers.state_views())
        self.state.update(extras)

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the hooks (as torch.optim's copies drop them; BB's own is registered again). Copy the model
        with the optimizer (``copy.deepcopy((model, opt))``) so that the copy drives the copied model, exactly as the
        original would."""
        hooks = [key for key in self.__dict__ if key.startswith("_optimizer_") and key.endswith("_hooks")]
        state = {key: value for key, value in self.__dict__.items() if key not in ("state", *hooks)}
        # Entries of opt.state that belong to no parameter (a state-dict hook's) travel, as torch.optim copies them.
        state["state"] = {key: value for key, value in self.state.items() if not isinstance(key, torch.Tensor)}
        state["_group_lrs_were_intact"] = self._shown.intact(self.param_groups)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        intact = state.pop("_group_lrs_were_intact")
        super().__setstate__(state)  # torch.optim's part: empty hook tables, the step hooks' wrapper
        self._index_state()
        self._packed.remember(self.param_groups)  # the copy's parameters are other objects
        self._optimizer_period_hooks = PeriodHooks()
        self.register_state_dict_post_hook(BB._bb_entry, prepend=True)
        if intact:
            self._shown.show(self.param_groups)  # a pickled copy's groups hold equal floats, not the shown one

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, as torch.optim does (e.g. layers unfrozen later), at any point of a run.

        It is checked and packed as the constructor's groups are (its own ``"lr"`` is ignored) and takes part from
        the next :meth:`step` on. Its EMA starts at 0 and its snapshot (what a rollback returns it to) is its value
        now; it enters the BB estimate once it has a full epoch of history. Under torch.distributed every rank
        must add the same groups at the same step (the next step checks)."""
        if self._building:
            super().add_param_group(param_group)
            return
        groups.check_group_dict(param_group)
        self._settle()  # an interrupted epoch end finishes over the groups it began with
        index = len(self.param_groups)
        # BB's list checks on the list torch.optim will take: a generator must be read once.
        param_group["params"] = groups.as_groups([param_group], index)[0]["params"]
        given_lr = param_group.get("lr")
        super().add_param_group(param_group)  # torch.optim's checks; the constructor's defaults filled in
        try:
            groups.check_group(param_group, index)
            groups.check_global_options(param_group, index, self._buffers.momentum, self._buffers.nesterov)
            groups.check_groups_apart(self.param_groups)
            self._buffers.add_devices([p.device for p in param_group["params"]])
        except BaseException:
            self.param_groups.pop()
            raise
        epoch, step = self._clock.counts()
        names = groups.param_names(param_group, index)
        # Its snapshot, the point a rollback of this epoch returns the group to, is its value now.
        buffers = self._buffers.pack(param_group, names, index, groups.join_epoch(epoch, step), added=True)
        if self._clock.window.steps_since_opening(epoch, step, self.steps_per_epoch):
            self._buffers.open_window_late(0, buffers)  # its window's point: where it joins, with m zero
        self._index_state()
        numel = sum(p.numel() for p in param_group["params"])
        self._control.add_params(numel, self._buffers.sq_norm("prev_params", buffers))
        self._packed.append(param_group)
        self._ranks_checked = False  # the next step checks that every rank added the same groups
        param_group["lr"] = self._shown.value
        groups.warn_ignored_lrs([given_lr], self.lr, added=True)

    @property
    def steps_per_epoch(self) -> int | None:
        """T, the steps of every epoch (None: epochs ended by :meth:`end_epoch`)."""
        return self._clock.steps_per_epoch

    @property
    def lr(self) -> float:
        """The learning rate the next step uses (reading it synchronises with the device)."""
        return float(self.lr_tensor)

    @property
    def lr_tensor(self) -> torch.Tensor:
        """The learning rate as a float64 0-dim device tensor, updated in place (no sync to read)."""
        self._shown.take_writes(self.param_groups)  # a scheduler's write since the last step
        return self._buffers.lr

    @property
    def lr_history(self) -> list[float]:
        """The learning rate each completed epoch used, epoch 0 first (reading it synchronises)."""
        return self._clock.lr_history()

    @property
    def rolled_back_epochs(self) -> list[int]:
        """The epochs (0-based) the safeguard found diverged and rolled back (reading it synchronises)."""
        return self._clock.rolled_back_epochs()

    @property
    def skipped_gradient_values(self) -> int:
        """How many gradient values were not finite, so that their elements kept their weights in that step (the
        safeguard's; always 0 with ``safeguard=False``). Reading it synchronises."""
        return self._buffers.skipped_values()

    @property
    def active_backends(self) -> dict[str, str]:
        """The backend running each device's buffers, e.g. ``{"cpu": "cpp"}`` (what "auto" resolved to)."""
        return {str(device): backend.name for device, backend in self._buffers.backends.items()}

    @property
    def epoch(self) -> int:
        """The index of the current epoch (the number of completed epochs)."""
        return self._clock.counts()[0]

    @property
    def step_in_epoch(self) -> int:
        """How many steps of the current epoch have been taken."""
        return self._clock.counts()[1]

    def track_buffers(self, model: torch.nn.Module) -> None:
        """Let a rollback restore ``model``'s buffers (BatchNorm running statistics) with its parameters: the
        safeguard keeps a copy of them from the last good epoch end. Call it once, right after construction (before
        :meth:`load_state_dict` when resuming); the copies are part of :meth:`state_dict`."""
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"track_buffers() takes the model (a torch.nn.Module), got {type(model).__name__}")
        if self._clock.counts() != (0, 0):
            raise RuntimeError(
                "track_buffers() must be called before the first step (and before load_state_dict when resuming); "
                "call it right after building the optimizer"
            )
        self._control.track_buffers(list(model.buffers()))
        self._missing_loss.track(model, self._control.rolls_back)

    @eager_under_compile
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient buffer in place (one fill per buffer, whatever ``set_to_none`` says); with
        ``set_to_none=True`` a parameter that gets no gradient before the next step is skipped by it."""
        self._settle()  # an interrupted epoch end snapshots model buffers the next forward pass moves
        self._buffers.zero_grad(set_to_none)

    @eager_under_compile
    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, loss: torch.Tensor | float | None = None
    ) -> Any:
        """One update of every parameter that has a gradient; closes the epoch after T steps.

        ``loss``: this step's training loss (a one-element floating-point tensor, or a number) for the safeguard; a
        closure's return value serves when it is one. Read on the device only: no sync. Returns the closure's."""
        self._settle()
        self._clock.check_capture(self._ranks_checked)
        if not self._ranks_checked:
            check_ranks_agree(self.steps_per_epoch, self.param_groups, self._buffers.master)
            self._ranks_checked = True
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        given, name = (loss, "loss") if loss is not None else (closure_loss, None)
        watched = watched_loss(given, name, self._buffers.master, self._clock.check_loss_number)
        self._missing_loss.step(watched)
        self._buffers.adopt_gradients()
        self._shown.take_writes(self.param_groups)
        # Set by torch.amp.GradScaler around this call (see _step_supports_amp_scaling).
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if self._clock.first_step_pending:
            self._control.first_step(self._buffers, watched, found_inf)
        if watched is not None:
            self._control.add_loss(watched)
        if self._late_window_steps:  # never under capture: the first step after a load runs eagerly (check_capture)
            self._buffers.open_window_late(self._late_window_steps)
            self._late_window_steps = 0
        self._buffers.step(
            weight_decays=[group["weight_decay"] for group in self.param_groups],
            beta=self.beta,
            grad_scale=grad_scale,
            found_inf=found_inf,
            whole_buffers=self._clock.steps_whole_buffers(),
            ema_mode=self._clock.ema_mode(),
            window_steps=self._clock.window.window_steps(self.steps_per_epoch) or 0,
        )
        closes = self._clock.advance()
        self._control.step_taken(self._buffers, self._clock, closes, found_inf)
        if closes:
            self._close_epoch()
        return closure_loss

    def end_epoch(self) -> None:
        """Close the current epoch (only with ``steps_per_epoch=None``); T = the steps taken in it."""
        if self.steps_per_epoch is not None:
            raise RuntimeError(
                f"end_epoch() is for steps_per_epoch=None; this optimizer ends each epoch by itself after "
                f"{self.steps_per_epoch} steps. Remove the end_epoch() call or build BB with steps_per_epoch=None"
            )
        if self.step_in_epoch == 0:
            raise RuntimeError("end_epoch() called on an epoch with no step(); call step() at least once first")
        self._close_epoch()

    def _settle(self) -> None:
        """Before any work: add the groups put into ``param_groups`` directly, and finish an epoch end an exception
        interrupted (exactly as it would have ended)."""
        added = self._packed.added(self.param_groups)
        if added is not None:
            self._shown.show(self.param_groups)  # a new list's dicts hold the lr they were saved with
            for group in added:
                self.add_param_group(group)
        if self._closing:
            self._close_epoch()

    def _close_epoch(self) -> None:
        """The epoch end, all or nothing: the rate control measures, decides and commits (no host sync but the one
        read of the rate the groups show). After an exception ``_closing`` stays set and the next call runs it
        again, with the same result: each buffer's pass runs once, the control writes its state last."""
        self._closing = True
        hooks = self._optimizer_period_hooks
        epoch = self._clock.counts()[0] if hooks else 0  # the closing period's epoch (read only for hooks)
        with self._clock.epoch_end():
            taus = (self.tau0, self.tau_min, self.tau_max)
            new_base, rolled_back = self._control.close_epoch(self._buffers, self._shown.base, self._clock, taus)
            self._clock.finish_period(new_base, rolled_back, self._shown, self.param_groups)
            self._buffers.epoch_closed()
            self._closing = False
        hooks.period_ended(self, epoch, rolled_back)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict (its hooks included): per-parameter state shaped like the parameter (live views)
        and BB's global state (``bbfused.checkpoint``), independent of backend and device. An epoch end an exception
        interrupted is finished first."""
        self._settle()
        return super().state_dict()

    def _bb_entry(self, state_dict: dict[str, Any]) -> None:
        """Add the ``"bb"`` entry to a packed state dict (the first state-dict post hook)."""
        # A scheduler's write into capturable's rate tensor is saved as taken.
        self._shown.settle_write_in_place(self.param_groups)
        rate = self.lr
        for group in state_dict["param_groups"]:
            group["lr"] = rate
        epoch, step = self._clock.counts()
        run = checkpoint.RunState(
            epoch=epoch,
            step_in_epoch=step,
            lr=rate,
            rule_lr=float(self._shown.base),
            lr_multiplier=float(self._shown.multiplier),
            lr_history=self.lr_history,
            rolled_back_epochs=self.rolled_back_epochs,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.epochs,
            beta=self.beta,
            momentum=self._buffers.momentum,
            nesterov=self._buffers.nesterov,
            tau0=self.tau0,
            tau_min=self.tau_min,
            tau_max=self.tau_max,
            join_epochs=list(self._buffers.join_epochs),
            control=self._control.state(epoch),
            preconditioner=self._buffers.scaling.name,
            beta2_powers=self._buffers.scaling.group_powers(),
            beta2_lags=self._buffers.second_moment_lags(self.param_groups),
            safeguard=not self._control.is_paper_method,
        )
        checkpoint.attach(state_dict, run)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` from any backend or device. Everything is checked before anything is
        written: a refused load leaves the optimizer and the parameters as they were. The load pre and post hooks
        run as in torch.optim (a pre hook may return a replacement dict)."""
        self._settle()
        if isinstance(state_dict, Mapping):
            state_dict = dict(state_dict)  # shallow copy: a pre-hook may edit it in place, as in torch.optim
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            state_dict = state_dict if result is None else result
        run = checkpoint.read(state_dict)
        checkpoint.check_resumable(
            run, self.steps_per_epoch, self._buffers.momentum, self._buffers.scaling.name,
            not self._control.is_paper_method,
        )  # fmt: skip
        self._buffers.scaling.check_powers(run.beta2_powers)
        names = [groups.param_names(group, index) for index, group in enumerate(self.param_groups)]
        copies = checkpoint.check_param_state(state_dict, self.param_groups, names, self._control.rolls_back)
        self._control.check_state(run.control)
        self._clock.load(run.epoch, run.step_in_epoch, run.lr_history, run.rolled_back_epochs, run.steps_per_epoch)
        with torch.no_grad():
            for p, key, value in copies:
                self.state[p][key].copy_(value)
        # Entries of the saved state that belong to no parameter (a state-dict pre hook's) come back, as in torch.optim.
        saved_params = {key for saved in state_dict["param_groups"] for key in saved["params"]}
        self.state.update({key: value for key, value in state_dict["state"].items() if key not in saved_params})
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(checkpoint.group_options(saved))
            group["weight_decay"] = check_weight_decay(group["weight_decay"])  # checked above: a float now
        self.beta, self._buffers.momentum, self._buffers.nesterov = run.beta, run.momentum, run.nesterov
        self.tau0, self.tau_min, self.tau_max = run.tau0, run.tau_min, run.tau_max
        replanned = self.epochs is not None and self.epochs != run.epochs
        self.epochs = run.epochs if self.epochs is None else self.epochs  # a new plan given to the constructor wins
        self._control.epochs = self.epochs
        self._buffers.join_epochs = list(run.join_epochs)
        self._buffers.scaling.load(run.beta2_powers)
        self._buffers.load_second_moment_lags(self.param_groups, run.beta2_lags)
        self._control.load_state(run.control, self._buffers)
        applied, rule_lr = run.lr, run.rule_lr
        if replanned and (rate := self._control.replanned_rate(run.epoch)) is not None:
            applied, rule_lr = rate * run.lr_multiplier, rate
        self._shown.load(applied, rule_lr, run.lr_multiplier, self.param_groups)
        self._closing = False
        self._buffers.epoch_closed()
        self._ranks_checked = False  # the loaded steps_per_epoch is checked across ranks at the next step
        # An older checkpoint saved inside a window holds an average there: the next step turns it into the point.
        window = self._clock.window
        late = 0 if run.window_point else window.steps_since_opening(run.epoch, run.step_in_epoch, self.steps_per_epoch)
        self._late_window_steps = late
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
