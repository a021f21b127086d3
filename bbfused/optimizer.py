"""``bbfused.BB``: mini-batch SGD whose learning rate is set once per epoch by the Barzilai–Borwein rule."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from . import checkpoint
from .backends import BACKEND_NAMES, Backend, load_backend
from .buffers import FlatBuffer, check_no_shared_memory, state_dtype, warn_replaced_gradients
from .capture import DeviceEpochs
from .checkpoint import check_beta as _check_beta
from .checkpoint import check_positive as _check_positive
from .checkpoint import check_steps_per_epoch as _check_steps_per_epoch
from .checkpoint import check_weight_decay as _check_weight_decay
from .checkpoint import is_real as _is_real
from .control import EpochBuffers, PaperControl, SafeguardedControl
from .diagnostics import warn
from .distributed import check_ranks_agree
from .interrupts import deferred_sigint

_SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_EAGER_REASON = (
    "bbfused.BB steps run eagerly: they are fused kernels already, and their epoch counting is host-side state a "
    "compiled graph would freeze. Compile the model (or the forward and backward) and call opt.step() and "
    "opt.zero_grad() outside a fullgraph=True region"
)


def _eager_under_compile(method: Callable) -> Callable:
    """Keep ``method`` out of torch.compile's graphs: a compiled training step calls it eagerly (a graph break),
    and fullgraph=True fails with :data:`_EAGER_REASON`."""
    try:
        return torch.compiler.disable(method, reason=_EAGER_REASON)
    except TypeError:  # a torch whose disable() takes no reason
        return torch.compiler.disable(method)


class BB(torch.optim.Optimizer):
    r"""SGD with the Barzilai–Borwein adaptive learning rate (Liang et al., Algorithm 1).

    Each step, for every parameter θ with gradient ∇ (k: epoch, T: steps per epoch)::

        d = ∇ + λ·θ                 (L2 weight decay, per group; p.grad itself is not modified)
        θ ← θ − η̂_k · d
        g ← g + β·(d − g)           (gradient EMA, restarted from 0 at every epoch start)

    η̂_0 = η̂_1 = ``lr``. At the end of every epoch k ≥ 1, with Δθ = θ_{k,T} − θ_{k−1,T} and
    y = g_{k,T} − g_{k−1,T} taken from epoch-end snapshots and summed over all parameters of all groups (a group
    added later from the epoch end at which it has a full epoch of history, see :meth:`add_param_group`)::

        η = ‖Δθ‖² / (T·|Δθᵀy|),    η̂_{k+1} = η if τ_min/(k+2) ≤ η ≤ τ_max/(k+2) else τ_0/(k+2)

    (a zero or non-finite η takes the fallback). The authors' code agrees, except that it keeps the
    previous rate when |Δθᵀy| < 1e-10; here the paper's fallback τ_0/(k+2) applies.

    Rate control (``safeguard=True``, the default; ``bbfused.control`` has the rules and constants): the
    same estimate η, applied so that it cannot kill a network. Each epoch's rate moves towards η by at most a
    factor 2 up or 10 down and stays inside [τ_min, τ_max]/(k+2) from epoch 1 on (an η that is zero or not
    finite keeps the rate; there is no absolute fallback). An epoch whose mean training loss rose brakes the
    next rate to at most half. An epoch diverged when, at its end, a weight or gradient average is not finite,
    ‖θ‖² grew past 4 x its last good value (and past RMS 0.1), or, with the loss given to :meth:`step`, the
    epoch's mean loss or its last step's loss passed 2.5 x the best epoch's mean (and by 5 % of the initial
    loss), or a first epoch made no progress on the first step's loss while the weights moved by 10 %. A
    diverged epoch is rolled back: the weights (and with :meth:`track_buffers`, BatchNorm's running
    statistics) return to the last good epoch end; the next rate is the last good one (at most a quarter of
    the one that diverged; a tenth when none was good yet) and later rates are capped at a quarter of it.
    A second rollback in a row on the loss alone is accepted instead (the snapshot itself is no better). A
    gradient value that is inf or NaN leaves its element unchanged in that step (:attr:`skipped_gradient_values`).
    Per step this costs one scalar add on the device (the loss) and the per-element finiteness check; the epoch end
    is two passes over the buffers without host sync (``benchmarks/results/2026-12-02_cpu_rate_control.md``);
    under torch.distributed the loss sums are all-reduced once per epoch so every rank decides alike (the first
    step checks, with one all-gather, that every rank has the same ``steps_per_epoch`` and groups of the same sizes).
    Unprotected without a loss: a network wrecked without growing its weights (BatchNorm networks) is not
    seen; pass ``loss=`` (or a closure that returns it) in every step. ``safeguard=False`` is the paper's
    method exactly (eq. 13, fallback τ_0/(k+2)). The robustness suite's results:
    ``benchmarks/results/robustness.md``.

    Args (numbers may be Python or NumPy scalars or one-element real tensors, read once, as torch.optim takes lr):
        params: parameters or parameter groups, as for torch.optim. Groups may set ``weight_decay``.
            The learning rate is global: a per-group ``lr`` is ignored, and after construction every
            group's ``"lr"`` holds the current η̂ as a Python float, updated at every epoch end (the one host
            read of the rate per epoch; :attr:`lr_tensor` reads it without any).
            Writing a group's ``"lr"`` later (e.g. an LR scheduler) changes nothing: one warning, and the
            groups show η̂ again.
        lr: the initial learning rate η̂_0 (and η̂_1 in the paper's method; the default lifts it into the
            bounds for epoch 1).
        steps_per_epoch: T. The epoch ends by itself after every T calls of :meth:`step`. With None, the
            caller ends each epoch with :meth:`end_epoch` and must give ``beta``.
        weight_decay: L2 penalty λ (default for the groups).
        beta: EMA factor in (0, 1]; default min(1, 4/T).
        tau0, tau_min, tau_max: the bounds of eq. 13; the defaults are the paper's deep-network setting
            (use tau_min=1/3, tau_max=3 for shallow networks).
        backend: "eager" (reference), "triton" (CUDA), "cpp" (CPU) or "auto" (fastest for the device).
        safeguard: the default rate control (see above); False for the paper's method exactly.
        capturable: let a whole training step, ``step()`` with its epoch end included, be captured in a CUDA
            graph and replayed. The step and epoch counts live on the device and the epoch end runs inside every
            step as kernels that act only at the epoch's last step, so nothing depends on host state a replay
            cannot update. Needs ``steps_per_epoch``; run at least one step eagerly before capturing, and again after
            :meth:`load_state_dict` or :meth:`add_param_group` (host work: where a diverged epoch 0 returns to,
            the ranks' check; graph warm-up does it anyway); give the loss as a
            tensor; every parameter is stepped each step (one without a gradient sees a zero one, so weight decay
            and the EMA move it); each group's ``"lr"`` is :attr:`lr_tensor` itself, not a float; the safeguard's
            loss sums are all-reduced at every step under torch.distributed. :attr:`epoch` and the histories
            are read from the device (one sync). After :meth:`add_param_group`, capture the step again (the graph
            holds the old buffers). Default False (the host counts, at no cost).

    Parameters and gradients are packed into flat buffers: after construction each ``p.data`` and
    ``p.grad`` is an alias of a slice of the optimizer's buffers, on a storage of its own that covers that slice
    (same Parameter objects, same strides; ``torch.save`` of a sub-module writes only its values). Hence:

    * :meth:`zero_grad` always zeroes the gradient buffer in place (one fill per buffer) whatever
      ``set_to_none`` says; with ``set_to_none=True`` (default) a parameter that gets no gradient from
      backward before the next step is skipped by it (frozen or unused), as torch.optim does.
    * A gradient replaced by another tensor (``model.zero_grad(set_to_none=True)``, ``p.grad.data = t``, DDP
      ``gradient_as_bucket_view=True``) is copied back in, with one warning. A gradient written into
      ``p.grad`` in place without backward counts too, except in a step driven by GradScaler.
    * Build the optimizer after ``model.to(...)``: a parameter re-allocated afterwards (``p.data = t``
      included) raises an error.
    * Parameters that share memory (a view of another parameter, an expanded tensor) are refused: the flat
      buffer would untie them.
    * :meth:`add_param_group` adds a group at any time (mid-epoch too), packed and checked as the constructor's
      groups. Its EMA starts at 0 and its snapshot (what a rollback returns it to) is its value at the add; it
      enters the BB estimate once it has a full epoch of history (before the first step: at once, exactly as a
      constructor's group). Groups appended to ``param_groups`` directly are added the same way at the next call.
    * ``copy.deepcopy((model, opt))``, or pickling both in one object, gives an optimizer that drives the
      copied model over buffers of its own and continues exactly as the original (hooks are not copied, as in
      torch.optim).

    The epoch end is all or nothing: a Ctrl-C waits until it is done; after another exception in it the epoch
    stays open and the next :meth:`zero_grad`, :meth:`step` or :meth:`state_dict` closes it, with the same result.

    Works with ``torch.amp.GradScaler``: the step unscales the gradients itself and skips the update
    (the step still counts towards the epoch) when the scaler found an inf, without host syncs.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        steps_per_epoch: int | None = None,
        *,
        weight_decay: float = 0.0,
        beta: float | None = None,
        tau0: float = 1.0,
        tau_min: float = 0.1,
        tau_max: float = 10.0,
        backend: str = "auto",
        safeguard: bool = True,
        capturable: bool = False,
    ) -> None:
        lr = _check_positive("lr", lr)
        steps_per_epoch = _check_steps_per_epoch(steps_per_epoch)
        if beta is None:
            if steps_per_epoch is None:
                raise ValueError(
                    "beta is required when steps_per_epoch is None (epochs ended by end_epoch()); "
                    "pass beta=4/T for your expected steps per epoch T"
                )
            beta = min(1.0, 4.0 / steps_per_epoch)
        self.beta = _check_beta(beta)
        weight_decay = _check_weight_decay(weight_decay, "")
        self.tau0 = _check_positive("tau0", tau0)
        self.tau_min = _check_positive("tau_min", tau_min)
        self.tau_max = _check_positive("tau_max", tau_max)
        if self.tau_min > self.tau_max:
            raise ValueError(f"tau_min ({tau_min}) must be <= tau_max ({tau_max})")
        if not isinstance(safeguard, bool):
            raise TypeError(f"safeguard must be True or False, got {safeguard!r}")
        self.safeguard = safeguard
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be True or False, got {capturable!r}")
        if capturable and steps_per_epoch is None:
            raise ValueError(
                "capturable=True needs steps_per_epoch: a captured step counts its epoch on the device and closes it "
                "there, while end_epoch() is a host call a graph replay never makes. Pass steps_per_epoch=T"
            )
        self.capturable = capturable
        if backend not in BACKEND_NAMES:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKEND_NAMES)}")
        self.steps_per_epoch = steps_per_epoch
        groups = _as_groups(params)
        self._building = True
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})
        self._building = False
        self._check_params()

        # Backends first: an unavailable one must raise before any parameter is re-pointed at a buffer.
        devices = list(dict.fromkeys(p.device for group in self.param_groups for p in group["params"]))
        self._backends: dict[torch.device, Backend] = {d: load_backend(backend, d) for d in devices}
        self._buffers: list[FlatBuffer] = []
        for group_index in range(len(self.param_groups)):
            self._buffers.extend(self._pack_group(group_index))
        self.backend = backend
        # One float64 learning-rate tensor per device; the first is the master the BB rule writes.
        self._lr_tensors = {d: torch.tensor(lr, dtype=torch.float64, device=d) for d in devices}
        self._lr_tensor = self._lr_tensors[devices[0]]
        numel = sum(p.numel() for group in self.param_groups for p in group["params"])
        # The rate control: the paper's eq. 13, or the safeguarded policy (bbfused.control) that owns the rollback.
        self._control = (
            SafeguardedControl(devices[0], numel, capturable) if safeguard else PaperControl(devices[0], numel)
        )
        self._epoch_buffers = self._make_epoch_buffers()
        # Per group, the first epoch whose end's rate estimate includes the group: 0 for the constructor's groups, later
        # for a group added after the first step (see add_param_group). Saved in state_dict()["bb"]["join_epochs"].
        self._join_epochs = [0] * len(self.param_groups)
        self._remember_groups()
        # With the default rate control, a gradient value that is not finite skips its element's update (the
        # weights stay finite: one bad value does not cost the epoch); counted per device, read on demand.
        self._nonfinite = {d: torch.zeros((), dtype=torch.int64, device=d) for d in devices} if safeguard else {}
        self._lr_history: list[torch.Tensor] = []
        self._epoch = 0
        self._step_in_epoch = 0
        # capturable: the counts and histories on the device (the host fields above are filled from them on
        # demand), and whether the first step, which runs eagerly, is still to come.
        self._device_epochs = DeviceEpochs(devices[0]) if capturable else None
        self._first_step_pending = True
        # Set while an epoch end runs; still set after an exception in it, so that the next step() finishes it.
        self._closing = False
        # Each buffer's epoch-end pass result, kept until the epoch has closed: a finished epoch end that is run
        # again must not repeat a pass (it zeroes the gradient averages).
        self._epoch_pass_sums: dict[int, torch.Tensor] = {}
        self._ranks_checked = False
        self._warned_replaced = False
        ignored = {g["lr"] for g in self.param_groups} - {lr}
        # Each group shows η̂ as a Python float that BB writes and never reads, so a scheduler or a user writing
        # group["lr"] cannot change the rate; step() notices and says so (see _publish_lr).
        self._shown_lr = lr
        self._warned_group_lr = False
        self._publish_lr()
        self._index_state()
        if ignored:
            warn(
                f"bbfused.BB uses one global learning rate: the per-group lr {sorted(ignored)} is ignored "
                f"(lr={lr} is used for every group)"
            )

    def _pack_group(self, group_index: int) -> list[FlatBuffer]:
        """Group ``group_index``'s parameters packed into flat buffers, one per (device, dtype), in first-seen order:
        from here on each parameter's ``.data`` and ``.grad`` are views of them."""
        group = self.param_groups[group_index]
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(group["params"]):
            by_kind.setdefault((p.device, p.dtype), []).append(i)
        names = self._param_names(group_index)
        return [
            FlatBuffer([group["params"][i] for i in indices], [names[i] for i in indices], group_index)
            for indices in by_kind.values()
        ]

    def _remember_groups(self) -> None:
        """Note the groups packed so far (the list and each group's parameters), so that groups put into
        ``param_groups`` without :meth:`add_param_group` are noticed (:meth:`_adopt_assigned_groups`)."""
        self._groups_seen = self.param_groups
        self._group_params = [[id(p) for p in group["params"]] for group in self.param_groups]

    def _adopt_assigned_groups(self) -> None:
        """Add the groups appended to ``param_groups``, or found at its end after it was assigned a new list, as
        :meth:`add_param_group` adds them. Lightning's BaseFinetuning, resuming a run, assigns ``param_groups`` a list
        rebuilt from its checkpoint: this optimizer's groups (new dicts over the same parameters) followed by the
        groups it added before. Two host-side comparisons when nothing changed (every step)."""
        groups = self.param_groups
        packed = len(self._group_params)
        if groups is self._groups_seen and len(groups) == packed:
            return
        kept = [[id(p) for p in group["params"]] for group in groups[:packed]]
        if kept != self._group_params:
            raise RuntimeError(
                f"bbfused.BB: param_groups no longer starts with the {packed} groups whose parameters BB packed into "
                f"its buffers (a group was removed, reordered or given other parameters). Groups can only be added, "
                f"with add_param_group(); build a new optimizer for another set of parameters"
            )
        for index, group in enumerate(groups[:packed]):
            group["weight_decay"] = _check_weight_decay(group.get("weight_decay"), f" of param_groups[{index}]")
        added = groups[packed:]
        del groups[packed:]
        self._groups_seen = groups
        self._show_lr()  # a new list's dicts hold the lr they were saved with, which no scheduler wrote
        for group in added:
            self.add_param_group(group)

    def _index_state(self) -> None:
        """``self.state[p]``: parameter p's slices of the state buffers, as torch.optim keeps state per parameter."""
        self.state = defaultdict(dict)
        for buffer in self._buffers:
            for index, p in enumerate(buffer.params):
                self.state[p] = buffer.state_views(index)

    def _make_epoch_buffers(self) -> EpochBuffers:
        return EpochBuffers(
            measure=self._measure_epoch,
            commit=self._commit_epoch,
            paper_pass=self._paper_epoch_pass,
            snapshot_params=self._snapshot_params,
            sq_norm=self._sq_norm,
        )

    # ----------------------------------------------------------------- copies
    # torch.optim copies only defaults, state and param_groups; BB's flat buffers, rate control and counters must
    # travel too, and its parameters must end up as views of the copy's buffers.
    _NOT_COPIED = (
        "state",  # views of the buffers, rebuilt from them
        "_backends",  # rebuilt by name on the copy's side
        "_epoch_buffers",  # bound methods of this optimizer
        # Hooks stay with the original, as torch.optim's copies drop them.
        "_optimizer_step_pre_hooks",
        "_optimizer_step_post_hooks",
        "_optimizer_state_dict_pre_hooks",
        "_optimizer_state_dict_post_hooks",
        "_optimizer_load_state_dict_pre_hooks",
        "_optimizer_load_state_dict_post_hooks",
    )

    def __getstate__(self) -> dict[str, Any]:
        """Everything but what the copy rebuilds. Copy the model together with the optimizer
        (``copy.deepcopy((model, opt))``, or pickle both in one object) so that the copy drives the copied model;
        the copied parameters become views of the copy's buffers, and the copy continues exactly as the original."""
        state = {key: value for key, value in self.__dict__.items() if key not in self._NOT_COPIED}
        # Entries of opt.state that belong to no parameter (a state-dict hook's) travel, as torch.optim copies them.
        state["_state_extras"] = {key: value for key, value in self.state.items() if not isinstance(key, torch.Tensor)}
        state["_active_backends"] = {device: backend.name for device, backend in self._backends.items()}
        state["_group_lrs_were_intact"] = self._group_lrs_intact()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        extras = state.pop("_state_extras", {})
        active = state.pop("_active_backends")
        intact = state.pop("_group_lrs_were_intact")
        super().__setstate__(state)  # torch.optim's part: empty hook tables, the step hooks' wrapper
        self._backends = {device: load_backend(name, device) for device, name in active.items()}
        self._epoch_buffers = self._make_epoch_buffers()
        self._index_state()
        self.state.update(extras)
        self._remember_groups()  # the copy's parameters are other objects
        self.__dict__.setdefault("_join_epochs", [0] * len(self.param_groups))  # pickled before groups could be added
        if intact:
            self._show_lr()  # a pickled copy's groups hold equal floats, not the shown one: the copy would warn

    # ----------------------------------------------------------------- parameter groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group, as torch.optim does (e.g. to train layers unfrozen later), at any point of a run.

        The group is checked as the constructor's groups are (torch.optim's checks, then BB's: dtype, no parameter
        twice, no shared memory, ``weight_decay``), its options not given take the constructor's defaults, and a
        ``"lr"`` of its own is ignored (one global rate). Its parameters are packed into flat buffers of their own
        (``p.data`` and ``p.grad`` become views) and take part from the next :meth:`step` on, gradients already
        computed included. Their EMA starts at 0 and their epoch-start snapshot (what a rolled-back epoch returns them
        to) is their value now. Before the first step the group is exactly one passed to the constructor; later it
        enters the BB estimate once it has a full epoch of history: from the end of the next epoch when added at an
        epoch start, of the one after when added mid-epoch (until then the epoch ends only take its snapshots; the
        weight and gradient checks of the safeguard cover it from the first epoch end on).

        Under torch.distributed every rank must add the same groups at the same step, as every rank builds BB with
        the same groups: the next step checks, with one all-gather, that the ranks' groups agree.
        """
        if self._building:
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        if "params" not in param_group:
            raise ValueError("param_group must have a 'params' entry: {'params': [...], 'weight_decay': ...}")
        self._adopt_assigned_groups()
        if self._closing:
            self._close_epoch()  # an epoch end an exception interrupted: finish it over the groups it began with
        group_index = len(self.param_groups)
        # BB's list checks (ordered, not empty, no parameter twice in it) on the list torch.optim will take: a
        # generator must be read once.
        param_group["params"] = _as_groups([param_group], group_index)[0]["params"]
        given_lr = param_group.get("lr")
        # torch.optim's checks (tensors, leaves, names, a parameter already in another group), then it appends the
        # group with the defaults filled in: the constructor's, from self.defaults.
        super().add_param_group(param_group)
        try:
            self._check_group(group_index)
            self._check_no_shared_memory()
            new_devices = list(dict.fromkeys(p.device for p in param_group["params"]) - self._backends.keys())
            # Backends first, as in the constructor: an unavailable one raises before a parameter is re-pointed.
            backends = {device: load_backend(self.backend, device) for device in new_devices}
        except BaseException:
            self.param_groups.pop()
            raise
        self._backends.update(backends)
        for device in new_devices:
            self._lr_tensors[device] = _on(self._lr_tensor, device).clone()
            if self.safeguard:
                self._nonfinite[device] = torch.zeros((), dtype=torch.int64, device=device)
        buffers = self._pack_group(group_index)
        with torch.no_grad():
            for buffer in buffers:
                buffer.prev_params.copy_(buffer.param)  # the point a rollback of this epoch returns the group to
        self._buffers.extend(buffers)
        for buffer in buffers:
            for index, p in enumerate(buffer.params):
                self.state[p] = buffer.state_views(index)
        numel = sum(p.numel() for p in param_group["params"])
        self._control.add_params(numel, self._sq_norm("prev_params", buffers))
        self._join_epochs.append(self._join_epoch())
        self._group_params.append([id(p) for p in param_group["params"]])
        self._ranks_checked = False  # the next step checks that every rank added the same groups
        param_group["lr"] = self._shown_lr  # the rate BB shows in every group, not the constructor's lr
        shown = self.lr if self.capturable else self._shown_lr
        if given_lr is not None and not (_is_real(given_lr) and float(given_lr) == shown):
            warn(
                f"bbfused.BB uses one global learning rate: the added group's lr {given_lr} is ignored (every group "
                f"uses BB's rate, now {shown})"
            )

    def _join_epoch(self) -> int:
        """The first epoch whose end's rate estimate includes a group added now: the first epoch end at which its
        snapshot of the previous epoch end and the EMA it compares with each cover a whole epoch."""
        epoch, step_in_epoch = self.epoch, self.step_in_epoch
        if step_in_epoch > 0:
            return epoch + 2  # the EMA of the rest of this epoch is partial: its first full one is the next
        if epoch == 0:
            return 0  # before the first step: as a group passed to the constructor
        return epoch + 1

    def _param_names(self, group_index: int) -> list[str]:
        group = self.param_groups[group_index]
        if "param_names" in group:
            return [repr(name) for name in group["param_names"]]
        return [f"param_groups[{group_index}]['params'][{i}]" for i in range(len(group["params"]))]

    def _check_params(self) -> None:
        for group_index in range(len(self.param_groups)):
            self._check_group(group_index)
        self._check_no_shared_memory()

    def _check_group(self, group_index: int) -> None:
        """Raise unless group ``group_index``'s options and parameters are ones BB can take; stores its
        ``weight_decay`` as a float."""
        group = self.param_groups[group_index]
        group["weight_decay"] = _check_weight_decay(group["weight_decay"], f" of param_groups[{group_index}]")
        for p, name in zip(group["params"], self._param_names(group_index)):
            where = f"parameter {name} (shape {tuple(p.shape)}, dtype {p.dtype}, device {p.device})"
            if p.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(
                    f"{where}: BB optimizes real floating-point parameters (float64, float32, float16, "
                    f"bfloat16); convert it or leave it out of the optimizer"
                )
            if p.is_meta:
                raise ValueError(f"{where} is on the meta device; materialize the model before building BB")
            if p.is_sparse:
                raise TypeError(f"{where} is sparse; BB needs dense parameters")
            if p.grad is not None and p.grad.is_sparse:
                raise TypeError(f"{where} has a sparse gradient; BB needs dense gradients")

    def _check_no_shared_memory(self) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        names = [name for index in range(len(self.param_groups)) for name in self._param_names(index)]
        check_no_shared_memory(params, names)

    # ----------------------------------------------------------------- public state
    @property
    def lr(self) -> float:
        """The learning rate the next step uses (reading it synchronises with the device)."""
        return float(self._lr_tensor)

    @property
    def lr_tensor(self) -> torch.Tensor:
        """The learning rate as a float64 0-dim device tensor, updated in place (no sync to read)."""
        return self._lr_tensor

    @property
    def lr_history(self) -> list[float]:
        """The learning rate each completed epoch used, epoch 0 first (reading it synchronises)."""
        self._read_device_epochs()
        if not self._lr_history:
            return []
        return torch.stack(self._lr_history).tolist()

    @property
    def rolled_back_epochs(self) -> list[int]:
        """The epochs (0-based) the safeguard found diverged and rolled back (reading it synchronises)."""
        self._read_device_epochs()
        return self._control.rolled_back_epochs if self.safeguard else []

    @property
    def skipped_gradient_values(self) -> int:
        """How many gradient values so far were not finite, so that their elements kept their weights in that
        step (the default rate control; always 0 with ``safeguard=False``). Reading it synchronises."""
        return int(sum(int(count) for count in self._nonfinite.values()))

    def track_buffers(self, model: torch.nn.Module) -> None:
        """Let a rollback restore ``model``'s buffers (BatchNorm running statistics) with its parameters.

        With the safeguard, BB keeps a copy of every buffer of ``model`` from the last good epoch end (for epoch
        0, their values when this is called) and restores it when it rolls an epoch back, so the network BB
        keeps is the one that was evaluated as good. Call it once after construction (and before
        :meth:`load_state_dict` when resuming); the copies are part of :meth:`state_dict`. Without the safeguard
        it does nothing.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"track_buffers() takes the model (a torch.nn.Module), got {type(model).__name__}")
        if self.epoch or self.step_in_epoch:
            raise RuntimeError(
                "track_buffers() must be called before the first step (and before load_state_dict when resuming); "
                "call it right after building the optimizer"
            )
        if self.safeguard:
            self._control.track_buffers([b for b in model.buffers()])

    @property
    def active_backends(self) -> dict[str, str]:
        """The backend running each device's buffers, e.g. ``{"cpu": "cpp"}`` (what "auto" resolved to)."""
        return {str(device): backend.name for device, backend in self._backends.items()}

    @property
    def epoch(self) -> int:
        """The index of the current epoch (the number of completed epochs)."""
        self._read_device_epochs()
        return self._epoch

    @property
    def step_in_epoch(self) -> int:
        """How many steps of the current epoch have been taken."""
        self._read_device_epochs()
        return self._step_in_epoch

    def _read_device_epochs(self) -> None:
        """capturable: fill the host's counts and histories from the device's (one sync); else nothing."""
        if self._device_epochs is None:
            return
        self._epoch, self._step_in_epoch, self._lr_history, rolled_back = self._device_epochs.read()
        if self.safeguard:
            self._control.rolled_back = rolled_back

    # ----------------------------------------------------------------- the update
    @_eager_under_compile
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient buffer in place; see the class docstring for ``set_to_none``."""
        self._adopt_assigned_groups()
        if self._closing:
            # An epoch end an exception interrupted: finish it before the next forward pass moves the model's
            # buffers (BatchNorm statistics) that it snapshots.
            self._close_epoch()
        for buffer in self._buffers:
            buffer.zero_grad(set_to_none)

    @_eager_under_compile
    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, loss: torch.Tensor | float | None = None
    ) -> Any:
        """One update of every parameter that has a gradient; closes the epoch after T steps.

        ``loss``: this step's training loss (a one-element floating-point tensor, or a number), so that the
        safeguard can watch the epoch's mean loss (see the class docstring); without it, a closure's return value
        serves when it is one. Read on the device only: no sync. Returns the closure's return value."""
        self._adopt_assigned_groups()
        if self._closing:
            self._close_epoch()  # an epoch end an exception interrupted, if zero_grad() did not finish it
        if self.capturable and (self._first_step_pending or not self._ranks_checked) and _capturing():
            raise RuntimeError(
                "BB(capturable=True): run at least one step() eagerly before capturing it in a CUDA graph (the "
                "warm-up iterations torch.cuda.graph needs anyway), after building, load_state_dict() and "
                "add_param_group() alike: that step records where a diverged first epoch returns to and checks the "
                "ranks, host work a replay would never repeat"
            )
        if not self._ranks_checked:
            group_numels = [sum(p.numel() for p in group["params"]) for group in self.param_groups]
            check_ranks_agree(self.steps_per_epoch, group_numels, self._lr_tensor.device)
            self._ranks_checked = True
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        if loss is not None:
            watched = self._watched_loss(loss, "loss")
        else:
            watched = self._watched_loss(closure_loss, None)
        for buffer in self._buffers:
            buffer.check()
        replaced = [buffer.adopt_replaced_gradients() for buffer in self._buffers]
        if any(replaced) and not self._warned_replaced:
            self._warned_replaced = True
            warn_replaced_gradients()
        if not self._group_lrs_intact():
            if not self._warned_group_lr:
                self._warned_group_lr = True
                warn(
                    "bbfused.BB sets one global learning rate itself: a change to param_groups[...]['lr'] (for "
                    "example by a torch.optim.lr_scheduler) is ignored, and the groups show BB's rate again. "
                    "Remove the scheduler. This warning is shown once."
                )
            self._show_lr()
        # Set by torch.amp.GradScaler around this call (see _step_supports_amp_scaling).
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        first = self._first_step_pending if self.capturable else self._epoch == 0 and self._step_in_epoch == 0
        if first:
            self._control.first_step(self._epoch_buffers, watched)
            self._first_step_pending = False
        if watched is not None:
            self._control.add_loss(watched)
        for buffer in self._buffers:
            backend = self._backends[buffer.device]
            weight_decay = self.param_groups[buffer.group_index]["weight_decay"]
            # A captured step cannot choose its ranges on the host at replay: it steps the whole buffer.
            ranges = [(0, buffer.numel)] if self.capturable else None
            for start, end in ranges or buffer.ranges_with_gradients(count_in_place_writes=found_inf is None):
                backend.step(
                    buffer.param[start:end],
                    buffer.grad[start:end],
                    buffer.ema[start:end],
                    self._lr_tensors[buffer.device],
                    weight_decay,
                    self.beta,
                    _on(grad_scale, buffer.device),
                    _on(found_inf, buffer.device),
                    self._nonfinite.get(buffer.device),
                )
        if self.capturable:
            self._close_epoch_on_device()
            return closure_loss
        self._step_in_epoch += 1
        if self._step_in_epoch == self.steps_per_epoch:
            self._close_epoch()
        return closure_loss

    def _watched_loss(self, loss: Any, name: str | None) -> torch.Tensor | None:
        """``loss`` as a 0-dim tensor on the master device, or None. ``name``: the argument it came from, checked
        (a closure's return value that is not a loss is just not used)."""
        if isinstance(loss, torch.Tensor) and loss.is_floating_point() and loss.numel() == 1:
            return _on(loss.detach().reshape(()), self._lr_tensor.device)
        if _is_real(loss):
            if self.capturable:
                raise TypeError(
                    f"BB(capturable=True) takes the loss as a tensor, got the number {loss!r}: a number would be "
                    f"fixed in a captured graph. Pass the loss tensor itself (loss=loss, not loss.item())"
                )
            return torch.tensor(float(loss), dtype=torch.float64, device=self._lr_tensor.device)
        if name is None or loss is None:
            return None
        found = f"a {loss.dtype} tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else repr(loss)
        raise TypeError(
            f"{name} must be this step's training loss as a one-element floating-point tensor or a number, got "
            f"{found}; pass the scalar the backward pass started from (e.g. loss=loss), or leave it out"
        )

    def end_epoch(self) -> None:
        """Close the current epoch (only with ``steps_per_epoch=None``); T = the steps taken in it."""
        if self.steps_per_epoch is not None:
            raise RuntimeError(
                f"end_epoch() is for steps_per_epoch=None; this optimizer ends each epoch by itself after "
                f"{self.steps_per_epoch} steps. Remove the end_epoch() call or build BB with steps_per_epoch=None"
            )
        if self._step_in_epoch == 0:
            raise RuntimeError("end_epoch() called on an epoch with no step(); call step() at least once first")
        self._close_epoch()

    def _close_epoch(self) -> None:
        """Close the epoch through the rate control (bbfused.control): no host sync but the one read of the new
        rate that param_groups show (:meth:`_publish_lr`).

        All or nothing: a Ctrl-C waits until the epoch has closed, and after any other exception the counters
        still describe the open epoch and ``_closing`` stays set, so the next step() (or state_dict()) runs the
        epoch end again. That is exact: each buffer's pass runs once (its sums are kept), the control decides
        without writing, its commit pass may run twice, and its state changes last."""
        self._closing = True
        with deferred_sigint():
            taus = (self.tau0, self.tau_min, self.tau_max)
            new_lr, _ = self._control.close_epoch(
                self._epoch_buffers, self._lr_tensor, self._epoch, self._step_in_epoch, taus
            )
            self._lr_history.append(self._lr_tensor.clone())
            if new_lr is not None:
                for lr_tensor in self._lr_tensors.values():
                    lr_tensor.copy_(_on(new_lr, lr_tensor.device))
                self._publish_lr()
            self._epoch += 1
            self._step_in_epoch = 0
            self._epoch_pass_sums = {}
            self._closing = False

    def _close_epoch_on_device(self) -> None:
        """capturable: count the step and run the epoch end, acting only if this was the epoch's last step.

        Kernels only, every step, with device counters: what a CUDA graph replays. The passes are launched with a
        flag and exit at once before the epoch's last step; the control's decisions are a few scalar kernels."""
        epochs = self._device_epochs
        at_end = epochs.advance(self.steps_per_epoch)
        taus = (self.tau0, self.tau_min, self.tau_max)
        lr = self._lr_tensor
        new_lr, rolled_back = self._control.close_epoch(
            self._epoch_buffers, lr, epochs.epoch, self.steps_per_epoch, taus, at_end=at_end
        )
        next_lr = torch.where(at_end, new_lr, lr)
        epochs.close(at_end, lr, rolled_back)
        for lr_tensor in self._lr_tensors.values():
            lr_tensor.copy_(_on(next_lr, lr_tensor.device))

    # ----------------------------------------------------------------- the epoch-end passes the control runs
    def _per_buffer_sum(self, sums: list[torch.Tensor]) -> torch.Tensor:
        """Partial sums of every buffer added on the master device in a fixed order: the same bits every run."""
        master = self._lr_tensor.device
        return torch.stack([_on(s, master) for s in sums]).sum(0)

    def _epoch_pass(self, kind: str, enabled: torch.Tensor | None) -> torch.Tensor:
        """The sums of backend pass ``kind`` ("epoch_end" or "epoch_measure") over every buffer. Each buffer's
        result is kept until the epoch closes: the pass zeroes the gradient averages, so it must not run twice.
        ``enabled`` (a captured step): the passes act only where the device flag is set, nothing is kept."""
        sums = []
        for index, b in enumerate(self._buffers):
            run = getattr(self._backends[b.device], kind)
            if enabled is not None:
                buffer_sums = run(b.param, b.ema, b.prev_params, b.prev_ema, _on(enabled, b.device))
            else:
                if index not in self._epoch_pass_sums:
                    self._epoch_pass_sums[index] = run(b.param, b.ema, b.prev_params, b.prev_ema)
                buffer_sums = self._epoch_pass_sums[index]
            sums.append(self._rule_sums(b, buffer_sums))
        return self._per_buffer_sum(sums)

    def _rule_sums(self, buffer: FlatBuffer, sums: torch.Tensor) -> torch.Tensor:
        """``buffer``'s pass sums as the epoch end uses them. A group added later than the constructor's has no full
        epoch of history before its join epoch (its snapshots and EMA began mid-way): its ‖Δθ‖² and Δθᵀy (the first
        two sums) would mix part of an epoch, or a gradient with no previous one, into the estimate, so they count
        as 0 until then; its weight and gradient norms count from the start. capturable: the epoch is the one
        counted on the device, and the choice is made there."""
        join = self._join_epochs[buffer.group_index]
        if join == 0:
            return sums
        if self.capturable:
            joined = self._device_epochs.epoch.to(sums.device) >= join
            return torch.where(joined, sums, _without_rule_sums(sums))
        return sums if join <= self._epoch else _without_rule_sums(sums)

    def _paper_epoch_pass(self, enabled: torch.Tensor | None = None) -> torch.Tensor:
        return self._epoch_pass("epoch_end", enabled)

    def _measure_epoch(self, enabled: torch.Tensor | None = None) -> torch.Tensor:
        return self._epoch_pass("epoch_measure", enabled)

    def _commit_epoch(self, rolled_back: torch.Tensor, enabled: torch.Tensor | None = None) -> None:
        for b in self._buffers:
            backend = self._backends[b.device]
            backend.epoch_commit(b.param, b.prev_params, _on(rolled_back, b.device), _on(enabled, b.device))

    def _snapshot_params(self) -> None:
        for buffer in self._buffers:
            buffer.prev_params.copy_(buffer.param)

    def _publish_lr(self) -> None:
        """Show the current η̂ in every group's "lr" as a Python float.

        A float, not a tensor: learning-rate monitors (Lightning's, Hugging Face's) log ``group["lr"]`` and keep it;
        a live tensor updated in place would rewrite their history and warns when they copy it. Reading the rate
        synchronises with the device, so this runs only where the rate changes (epoch ends, loading, construction),
        never in a step; ``lr_tensor`` stays the sync-free way to read it. capturable: the groups show ``lr_tensor``
        itself (a captured step cannot write a float)."""
        self._shown_lr = self._lr_tensor if self.capturable else float(self._lr_tensor)
        self._show_lr()

    def _show_lr(self) -> None:
        """Put the float last published back into every group (after a scheduler wrote there), without a sync."""
        for group in self.param_groups:
            group["lr"] = self._shown_lr

    def _group_lrs_intact(self) -> bool:
        """Whether every group's "lr" is still the float object BB wrote (host-side checks only)."""
        return all(group["lr"] is self._shown_lr for group in self.param_groups)

    def _sq_norm(self, name: str, buffers: list[FlatBuffer] | None = None) -> torch.Tensor:
        """‖·‖² of buffer ``name`` ("param", "prev_params" or "ema") over ``buffers`` (default: every buffer): float64
        on the master device."""
        master = self._lr_tensor.device
        norms = [_norm(getattr(b, name)) for b in (self._buffers if buffers is None else buffers)]
        return torch.stack([_on(n, master) for n in norms]).square().sum()

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch.optim layout: per-parameter ``ema``, ``prev_params``, ``prev_ema`` shaped like the parameter
        (views of the live buffers, as torch.optim returns live state), plus a ``"bb"`` entry (format:
        ``bbfused.checkpoint``) with the epoch, the step within it, η̂, the history, the hyper-parameters and the
        rate control's state (``safeguard`` itself is the constructor's choice, not saved). Independent of backend
        and device. An epoch end an exception interrupted is finished first. The ``register_state_dict_pre_hook``
        and ``_post_hook`` hooks run as in torch.optim, around the whole dict."""
        self._adopt_assigned_groups()
        if self._closing:
            self._close_epoch()
        self._read_device_epochs()
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = checkpoint.pack(self.param_groups, self.state)
        lr = self.lr
        for group in state_dict["param_groups"]:
            group["lr"] = lr
        control = self._control.state_dict() if self.safeguard else checkpoint.empty_control_state(self._epoch)
        state_dict["bb"] = {
            "version": checkpoint.VERSION,
            "epoch": self._epoch,
            "step_in_epoch": self._step_in_epoch,
            "lr": lr,
            "lr_history": self.lr_history,
            "steps_per_epoch": self.steps_per_epoch,
            "beta": self.beta,
            "tau0": self.tau0,
            "tau_min": self.tau_min,
            "tau_max": self.tau_max,
            "join_epochs": list(self._join_epochs),
            **control,
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` from any backend or device; everything is checked before writing. Hooks
        registered with ``register_load_state_dict_pre_hook`` (which may return a replacement dict) run first, those
        of ``register_load_state_dict_post_hook`` after loading, as in torch.optim."""
        self._adopt_assigned_groups()
        if isinstance(state_dict, Mapping):
            state_dict = dict(state_dict)  # shallow copy: a pre-hook may edit it in place, as in torch.optim
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        bb = checkpoint.read_bb(state_dict)
        steps = bb["steps_per_epoch"]
        if (steps is None) != (self.steps_per_epoch is None):
            saved_mode = "end_epoch() calls" if steps is None else f"automatic epochs of {steps} steps"
            raise ValueError(
                f"the state dict was saved with {saved_mode}, this optimizer has steps_per_epoch="
                f"{self.steps_per_epoch}; build it with steps_per_epoch={steps} to resume that run"
            )
        copies = checkpoint.check_param_state(state_dict, self.param_groups, self._param_names)
        if self.safeguard:
            checkpoint.check_model_buffers(bb["model_buffers"], self._control.model_buffers)
        with torch.no_grad():
            for p, state_key, value in copies:
                self.state[p][state_key].copy_(value)
            for lr_tensor in self._lr_tensors.values():
                lr_tensor.fill_(bb["lr"])
            self._publish_lr()
        # Entries of the saved state that belong to no parameter (a state-dict pre hook's) come back, as in torch.optim.
        saved_params = {key for saved in state_dict["param_groups"] for key in saved["params"]}
        for key, value in state_dict["state"].items():
            if key not in saved_params:
                self.state[key] = value
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k not in ("params", "lr")})
            group["weight_decay"] = _check_weight_decay(group["weight_decay"], "")  # checked above: a float now
        self._epoch = bb["epoch"]
        self._step_in_epoch = bb["step_in_epoch"]
        self._lr_history = [
            torch.tensor(value, dtype=torch.float64, device=self._lr_tensor.device) for value in bb["lr_history"]
        ]
        self.steps_per_epoch = steps
        self.beta = bb["beta"]
        self.tau0, self.tau_min, self.tau_max = bb["tau0"], bb["tau_min"], bb["tau_max"]
        self._join_epochs = list(bb["join_epochs"])
        self._control.load_state_dict(bb, self._epoch, self._epoch_buffers)
        if self._device_epochs is not None:
            rolled_back = bb["rolled_back_epochs"] if self.safeguard else []
            self._device_epochs.load(self._epoch, self._step_in_epoch, bb["lr_history"], rolled_back)
        self._first_step_pending = self._epoch == 0 and self._step_in_epoch == 0
        self._closing = False
        self._epoch_pass_sums = {}
        self._ranks_checked = False  # the loaded steps_per_epoch is checked across ranks at the next step
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _as_groups(params: Any, first_index: int = 0) -> list[dict[str, Any]]:
    """torch.optim's ``params`` argument as a list of groups, checked for empty lists and duplicates; the groups
    are named from ``param_groups[first_index]`` on (add_param_group checks the group it adds).

    torch.optim would reject a parameter shared by two groups without naming it, and only warn about a
    duplicate inside one group; here both are errors that say which parameter.
    """
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or of dicts, not a tensor; wrap it in a list")
    if isinstance(params, set):
        raise TypeError("parameters must be ordered: pass a list (e.g. model.parameters()), not a set")
    groups = list(params)
    if not groups:
        raise ValueError("BB got an empty parameter list; pass model.parameters() of a model with parameters")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    for group in groups:
        if isinstance(group["params"], set):
            raise TypeError("parameter groups must be ordered: pass a list of parameters, not a set")
    groups = [
        dict(group, params=[group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"]))
        for group in groups
    ]
    seen: dict[int, str] = {}
    for group_index, group in enumerate(groups, first_index):
        if not group["params"]:
            raise ValueError(f"param_groups[{group_index}] has no parameters; drop it or give it some")
        for i, entry in enumerate(group["params"]):
            name, p = entry if isinstance(entry, tuple) else (f"param_groups[{group_index}]['params'][{i}]", entry)
            if not isinstance(p, torch.Tensor):
                continue  # torch.optim's add_param_group raises the TypeError for it
            if id(p) in seen:
                raise ValueError(
                    f"parameter {name} (shape {tuple(p.shape)}) is listed twice (also as {seen[id(p)]}); "
                    f"list each parameter once"
                )
            seen[id(p)] = name
    return groups


def _without_rule_sums(sums: torch.Tensor) -> torch.Tensor:
    """Epoch-pass sums with the BB rule's two (‖Δθ‖², Δθᵀy) zeroed and the norms kept."""
    return torch.cat([torch.zeros_like(sums[:2]), sums[2:]])


def _capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _norm(flat: torch.Tensor) -> torch.Tensor:
    """‖flat‖ as a float64 0-dim tensor, accumulated in the state dtype.

    A float64 upcast of a float32 buffer would cost a full conversion pass (30x slower on CPU); the safeguard
    compares norms against a growth bound (bbfused.control), and an overflow to inf reads as diverged, as it should.
    """
    return torch.linalg.vector_norm(flat, dtype=state_dtype(flat.dtype)).double()


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """``tensor`` on ``device`` (GradScaler keeps its tensors on one device); None stays None."""
    if tensor is None or tensor.device == device:
        return tensor
    # Asynchronous only towards a GPU: a non-blocking copy to the CPU could be read before it has landed.
    return tensor.to(device, non_blocking=device.type == "cuda")
