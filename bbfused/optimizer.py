"""``bbfused.BB``: mini-batch SGD whose learning rate is set once per epoch by the Barzilai–Borwein rule."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .backends import BACKEND_NAMES, Backend, load_backend
from .buffers import FlatBuffer, state_dtype, warn_replaced_gradients
from .rule import bb_learning_rate

_SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_STATE_KEYS = ("ema", "prev_params", "prev_ema")
_STATE_DICT_VERSION = 1
_BB_KEYS = (
    "version",
    "epoch",
    "step_in_epoch",
    "lr",
    "lr_history",
    "steps_per_epoch",
    "beta",
    "tau0",
    "tau_min",
    "tau_max",
)
# After a diverged epoch the safeguard restarts from the last good epoch-end point with the rate cut tenfold, and
# the rule's rates are capped from then on at half the smallest rate that diverged (a rate that blew up once is
# not tried again: the rule's fallback 1/3 at k = 1 killed LeNet-5 on MNIST, and its next rates near 1/3 did too).
_SAFEGUARD_BACKOFF = 0.1
_SAFEGUARD_CAP = 0.5
# An epoch diverged when ‖θ‖² grew past GROWTH · max(‖θ‖² at the last good epoch end, FLOOR · number of values):
# the weights' RMS doubled and passed 0.1. The floor keeps a start from (near) zero weights from counting as growth.
# Measured per epoch (benchmarks/results/paper_mnist.md, BB on the η0 grid 1e-3..1, two seeds): epochs after which
# the network still learned grew ‖θ‖² at most 1.0-fold (the paper's MLP) and 2.75-fold (LeNet-5, η0 = 1); epochs
# that killed LeNet-5 without NaN (loss stuck at ln 10) 7.3-fold (η0 = 1, epoch 0) to 7000-fold.
_SAFEGUARD_GROWTH = 4.0
_SAFEGUARD_FLOOR = 2.5e-3
# With the training loss given to step(), an epoch also diverged when its mean loss passed LOSS_GROWTH times the
# last good epoch's mean loss (for epoch 0, the first step's loss). The weights of a BatchNorm network are
# scale-invariant: a too-large rate wrecks it without growing them. Measured (paper_mnist.md, BB without the loss
# check on the η0 grid): the MLP's epochs raised the mean loss at most 1.9-fold, the ResNet-18 stand-in's healthy
# ones 2.0-fold; the seven that wrecked ResNet-18 (test accuracy down to 30-61 % in that epoch or the next) 2.55- to
# 26-fold.
_SAFEGUARD_LOSS_GROWTH = 2.5


def _is_real(value: Any) -> bool:
    """Whether ``value`` is a Python int or float (bool excluded: True is not a rate or a loss)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    """Whether ``value`` is a Python int (bool excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive(name: str, value: Any) -> float:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_weight_decay(value: Any, where: str) -> float:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"weight_decay{where} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_beta(value: Any) -> float:
    if not _is_real(value) or not 0 < value <= 1:
        raise ValueError(f"beta must be in (0, 1], got {value!r} (the paper uses 4/steps_per_epoch)")
    return float(value)


class BB(torch.optim.Optimizer):
    r"""SGD with the Barzilai–Borwein adaptive learning rate (Liang et al., Algorithm 1).

    Each step, for every parameter θ with gradient ∇ (k: epoch, T: steps per epoch)::

        d = ∇ + λ·θ                 (L2 weight decay, per group; p.grad itself is not modified)
        θ ← θ − η̂_k · d
        g ← g + β·(d − g)           (gradient EMA, restarted from 0 at every epoch start)

    η̂_0 = η̂_1 = ``lr``. At the end of every epoch k ≥ 1, with Δθ = θ_{k,T} − θ_{k−1,T} and
    y = g_{k,T} − g_{k−1,T} taken from epoch-end snapshots and summed over all parameters of all groups::

        η = ‖Δθ‖² / (T·|Δθᵀy|),    η̂_{k+1} = η if τ_min/(k+2) ≤ η ≤ τ_max/(k+2) else τ_0/(k+2)

    (a zero or non-finite η takes the fallback). The authors' code agrees, except that it keeps the
    previous rate when |Δθᵀy| < 1e-10; here the paper's fallback τ_0/(k+2) applies.

    Safeguard (``safeguard=True``, the default): an epoch that diverged is rolled back. The rate it used
    was too large: η0 = 1 on the paper's MLP turns the weights into NaN within epoch 0, before the rule
    can act, and kills LeNet-5 (loss ln 10 for good, no NaN); the rule itself may pick up to τ_max/(k+2)
    and its fallback 1/3 at k = 1 kills LeNet-5 too. An epoch diverged when, at its end, a parameter or
    gradient average is not finite, or ‖θ‖² exceeds 4·max(‖θ‖² at the last good epoch end, 0.0025·number
    of parameter values): the weights' RMS doubled and passed 0.1. The parameters and gradient averages
    are then restored from the snapshots of the last good epoch end (for epoch 0, the parameters at the
    first step), the next epoch's rate is the diverged one divided by 10, the rule's rates are capped
    from then on at half the smallest rate that diverged, and the rule resumes once a good epoch has
    ended after a good snapshot; the epoch count goes on (the bounds keep their k). This costs nothing
    per step: the check and the restore are a few passes over the buffers at the epoch end (and one copy
    at the first step), without host sync; a run that never diverges has bit for bit the paper's rates
    and parameters. ``safeguard=False`` is the paper's method exactly.

    A rate too large for a BatchNorm network wrecks it without growing its weights (they are
    scale-invariant); the training loss shows it. Give each step its loss (``step(loss=loss)``, or a
    closure that returns it): an epoch then also diverged when its mean loss is not finite or exceeds
    2.5 times the reference, the mean loss of the last good epoch (for epoch 0, the first step's loss).
    The check needs every step of the epoch to give a loss, and a positive reference (a loss that may be
    negative disables the ratio). Per step this is one scalar add on the device; under torch.distributed
    the epoch's sums are all-reduced over the default group at its end (so every rank must close its
    epochs at the same steps, as DDP requires) and all ranks decide alike. Not caught: a network that a
    too-large rate leaves stuck at chance in epoch 0 (LeNet-5 at η0 = 1 on 4096 MNIST images): its loss
    stays at the initial network's. A rollback restores the parameters, not the model's buffers: restore
    BatchNorm's running statistics from the epoch start when :attr:`rolled_back_epochs` names the epoch
    (``bbfused-train`` does).

    Args:
        params: parameters or parameter groups, as for torch.optim. Groups may set ``weight_decay``.
            The learning rate is global: a per-group ``lr`` is ignored, and after construction every
            group's ``"lr"`` holds the current η̂ as a float64 0-dim tensor on the parameters' device.
            Writing a group's ``"lr"`` later (e.g. an LR scheduler) changes nothing: one warning, and the
            groups show η̂ again.
        lr: the initial learning rate η̂_0 = η̂_1.
        steps_per_epoch: T. The epoch ends by itself after every T calls of :meth:`step`. With None, the
            caller ends each epoch with :meth:`end_epoch` and must give ``beta``.
        weight_decay: L2 penalty λ (default for the groups).
        beta: EMA factor in (0, 1]; default min(1, 4/T).
        tau0, tau_min, tau_max: the bounds of eq. 13; the defaults are the paper's deep-network setting
            (use tau_min=1/3, tau_max=3 for shallow networks).
        backend: "eager" (reference), "triton" (CUDA), "cpp" (CPU) or "auto" (fastest for the device).
        safeguard: roll back an epoch that diverged, cut the rate tenfold and cap the later ones (see
            above); False for the paper's method exactly.

    Parameters and gradients are packed into flat buffers: after construction each ``p.data`` and
    ``p.grad`` is a view of the optimizer's buffers (same Parameter objects, same strides). Hence:

    * :meth:`zero_grad` always zeroes the gradient buffer in place (one fill per buffer) whatever
      ``set_to_none`` says; with ``set_to_none=True`` (default) a parameter that gets no gradient from
      backward before the next step is skipped by it (frozen or unused), as torch.optim does.
    * A gradient replaced by another tensor (``model.zero_grad(set_to_none=True)``, DDP
      ``gradient_as_bucket_view=True``) is copied back in, with one warning. A gradient written into
      ``p.grad`` in place without backward counts too, except in a step driven by GradScaler.
    * Build the optimizer after ``model.to(...)``: a parameter re-allocated afterwards raises an error.

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
    ) -> None:
        lr = _check_positive("lr", lr)
        if steps_per_epoch is not None and (not _is_int(steps_per_epoch) or steps_per_epoch <= 0):
            raise ValueError(f"steps_per_epoch must be a positive int or None, got {steps_per_epoch!r}")
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
        for group_index, group in enumerate(self.param_groups):
            by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
            for i, p in enumerate(group["params"]):
                by_kind.setdefault((p.device, p.dtype), []).append(i)
            names = self._param_names(group_index)
            for indices in by_kind.values():
                self._buffers.append(
                    FlatBuffer([group["params"][i] for i in indices], [names[i] for i in indices], group_index)
                )
        self.backend = backend
        # One float64 learning-rate tensor per device; the first is the master the BB rule writes.
        self._lr_tensors = {d: torch.tensor(lr, dtype=torch.float64, device=d) for d in devices}
        self._lr_tensor = self._lr_tensors[devices[0]]
        # Whether prev_params / prev_ema hold a good epoch end, so that the rule may compare with them: in the
        # paper's method from the end of epoch 0 on; with the safeguard not after a rolled-back epoch 0.
        self._has_snapshot = torch.tensor(False, device=devices[0])
        # The safeguard's reference: ‖prev_params‖² (float64), and its floor.
        self._snapshot_sq_norm = torch.zeros((), dtype=torch.float64, device=devices[0])
        # The safeguard's cap on the rule's rates: half the smallest rate that diverged (inf until one did).
        self._lr_cap = torch.tensor(math.inf, dtype=torch.float64, device=devices[0])
        # The loss check: the sum of the losses given to step() in this epoch and how many steps gave one, and the
        # reference, the last good epoch's mean loss (NaN: none yet).
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=devices[0])
        self._loss_steps = 0
        self._loss_reference = torch.tensor(math.nan, dtype=torch.float64, device=devices[0])
        numel = sum(p.numel() for group in self.param_groups for p in group["params"])
        self._sq_norm_floor = _SAFEGUARD_FLOOR * numel
        self._lr_history: list[torch.Tensor] = []
        self._rolled_back: list[torch.Tensor] = []  # per completed epoch with the safeguard: whether it was rolled back
        self._epoch = 0
        self._step_in_epoch = 0
        self._warned_replaced = False
        ignored = {g["lr"] for g in self.param_groups} - {lr}
        # Each group shows η̂ in a tensor of its own that BB writes and never reads, so a scheduler or a user
        # writing group["lr"] cannot change the rate; step() notices and says so (see _publish_lr).
        self._group_lrs = [self._lr_tensor.clone() for _ in self.param_groups]
        self._group_lr_versions: list[int] = []
        self._warned_group_lr = False
        self._publish_lr()
        for buffer in self._buffers:
            for index, p in enumerate(buffer.params):
                self.state[p] = buffer.state_views(index)
        if ignored:
            warnings.warn(
                f"bbfused.BB uses one global learning rate: the per-group lr {sorted(ignored)} is ignored "
                f"(lr={lr} is used for every group)",
                UserWarning,
                stacklevel=2,
            )

    # ----------------------------------------------------------------- construction checks
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._building:
            raise RuntimeError(
                "bbfused.BB cannot add parameter groups after construction (its buffers and learning rate "
                "cover a fixed set of parameters); pass every group to the constructor"
            )
        super().add_param_group(param_group)

    def _param_names(self, group_index: int) -> list[str]:
        group = self.param_groups[group_index]
        if "param_names" in group:
            return [repr(name) for name in group["param_names"]]
        return [f"param_groups[{group_index}]['params'][{i}]" for i in range(len(group["params"]))]

    def _check_params(self) -> None:
        for group_index, group in enumerate(self.param_groups):
            _check_weight_decay(group["weight_decay"], f" of param_groups[{group_index}]")
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
        if not self._lr_history:
            return []
        return torch.stack(self._lr_history).tolist()

    @property
    def rolled_back_epochs(self) -> list[int]:
        """The epochs (0-based) the safeguard found diverged and rolled back (reading it synchronises)."""
        if not self._rolled_back:
            return []
        return torch.stack(self._rolled_back).nonzero().flatten().tolist()

    @property
    def active_backends(self) -> dict[str, str]:
        """The backend running each device's buffers, e.g. ``{"cpu": "cpp"}`` (what "auto" resolved to)."""
        return {str(device): backend.name for device, backend in self._backends.items()}

    @property
    def epoch(self) -> int:
        """The index of the current epoch (the number of completed epochs)."""
        return self._epoch

    @property
    def step_in_epoch(self) -> int:
        """How many steps of the current epoch have been taken."""
        return self._step_in_epoch

    # ----------------------------------------------------------------- the update
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient buffer in place; see the class docstring for ``set_to_none``."""
        for buffer in self._buffers:
            buffer.zero_grad(set_to_none)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, loss: torch.Tensor | float | None = None
    ) -> Any:
        """One update of every parameter that has a gradient; closes the epoch after T steps.

        ``loss``: this step's training loss (a one-element floating-point tensor, or a number), so that the
        safeguard can watch the epoch's mean loss (see the class docstring); without it, a closure's return value
        serves when it is one. Read on the device only: no sync. Returns the closure's return value."""
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
                warnings.warn(
                    "bbfused.BB sets one global learning rate itself: a change to param_groups[...]['lr'] (for "
                    "example by a torch.optim.lr_scheduler) is ignored, and the groups show BB's rate again. "
                    "Remove the scheduler. This warning is shown once.",
                    UserWarning,
                    stacklevel=2,
                )
            self._publish_lr()
        # Set by torch.amp.GradScaler around this call (see _step_supports_amp_scaling).
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if self.safeguard and self._epoch == 0 and self._step_in_epoch == 0:
            for buffer in self._buffers:  # the point a diverged epoch 0 rolls back to
                buffer.prev_params.copy_(buffer.param)
            self._snapshot_sq_norm = self._sq_norm("prev_params")
            if watched is not None:  # the initial network's loss: epoch 0's reference
                self._loss_reference.copy_(watched)
        if self.safeguard and watched is not None:
            self._loss_sum.add_(watched)
            self._loss_steps += 1
        for buffer in self._buffers:
            backend = self._backends[buffer.device]
            weight_decay = self.param_groups[buffer.group_index]["weight_decay"]
            for start, end in buffer.ranges_with_gradients(count_in_place_writes=found_inf is None):
                backend.step(
                    buffer.param[start:end],
                    buffer.grad[start:end],
                    buffer.ema[start:end],
                    self._lr_tensors[buffer.device],
                    weight_decay,
                    self.beta,
                    _on(grad_scale, buffer.device),
                    _on(found_inf, buffer.device),
                )
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
        """Epoch-end snapshots and, from the end of epoch 1 on, the BB rule; no host sync."""
        master = self._lr_tensor.device
        diverged = self._roll_back_if_diverged() if self.safeguard else None
        sums = [self._backends[b.device].epoch_end(b.param, b.ema, b.prev_params, b.prev_ema) for b in self._buffers]
        self._lr_history.append(self._lr_tensor.clone())
        if diverged is not None:
            self._rolled_back.append(diverged)
        new_lr = None
        if self._epoch >= 1:
            # Partials summed in a fixed order: the same bits every run.
            total = torch.stack([_on(s, master) for s in sums]).sum(0)
            new_lr = bb_learning_rate(total, self._step_in_epoch, self._epoch, self.tau0, self.tau_min, self.tau_max)
            if diverged is not None:  # after a rolled-back epoch 0 the snapshots hold no epoch end to compare with
                new_lr = torch.where(self._has_snapshot, new_lr, self._lr_tensor)
        if diverged is not None:
            lowered_cap = torch.minimum(self._lr_cap, self._lr_tensor * _SAFEGUARD_CAP)
            self._lr_cap = torch.where(diverged, lowered_cap, self._lr_cap)
            kept = self._lr_tensor if new_lr is None else torch.minimum(new_lr, self._lr_cap)
            new_lr = torch.where(diverged, self._lr_tensor * _SAFEGUARD_BACKOFF, kept)
        if new_lr is not None:
            for lr_tensor in self._lr_tensors.values():
                lr_tensor.copy_(_on(new_lr, lr_tensor.device))
            self._publish_lr()
        self._has_snapshot = self._has_snapshot | (True if diverged is None else ~diverged)
        self._loss_sum.zero_()
        self._loss_steps = 0
        self._epoch += 1
        self._step_in_epoch = 0

    def _publish_lr(self) -> None:
        """Show the current η̂ in every group's "lr" (a device copy, no sync) and remember what was written."""
        for group, group_lr in zip(self.param_groups, self._group_lrs):
            group_lr.copy_(self._lr_tensor)
            group["lr"] = group_lr
        self._group_lr_versions = [group_lr._version for group_lr in self._group_lrs]

    def _group_lrs_intact(self) -> bool:
        """Whether every group's "lr" is still the tensor BB wrote, unmodified (host-side checks only)."""
        return all(
            group["lr"] is group_lr and group_lr._version == version
            for group, group_lr, version in zip(self.param_groups, self._group_lrs, self._group_lr_versions)
        )

    def _sq_norm(self, name: str) -> torch.Tensor:
        """‖·‖² of buffer ``name`` ("param", "prev_params" or "ema") over every buffer: float64 on the master device."""
        master = self._lr_tensor.device
        norms = [_norm(getattr(b, name)) for b in self._buffers]
        return torch.stack([_on(n, master) for n in norms]).square().sum()

    def _roll_back_if_diverged(self) -> torch.Tensor:
        """The safeguard's check, before the epoch end: whether the epoch diverged (see the class docstring), a
        bool 0-dim tensor on the master device. If so, parameters and gradient averages are restored from the
        snapshots, so the epoch end that follows leaves the state of the last good epoch end. No host sync."""
        sq_norm = self._sq_norm("param")
        limit = _SAFEGUARD_GROWTH * self._snapshot_sq_norm.clamp(min=self._sq_norm_floor)
        # NaN fails every comparison: "not <=" catches it along with growth past the limit.
        diverged = ~(sq_norm <= limit) | ~torch.isfinite(self._sq_norm("ema"))
        mean_loss, complete, reference = self._epoch_loss()
        # Without a positive reference (none yet: NaN; a loss that is not >= 0) only a non-finite mean loss counts.
        too_high = ~torch.isfinite(mean_loss) | ((reference > 0) & (mean_loss > _SAFEGUARD_LOSS_GROWTH * reference))
        diverged = diverged | (complete & too_high)
        # The reference moves to this epoch's mean loss when the epoch was good; without a complete loss it is lost
        # (the weights moved on), and it stays when the epoch is rolled back.
        next_reference = torch.where(complete, mean_loss, torch.full_like(mean_loss, math.nan))
        self._loss_reference = torch.where(diverged, reference, next_reference)
        for buffer in self._buffers:
            flag = _on(diverged, buffer.device)
            torch.where(flag, buffer.prev_params, buffer.param, out=buffer.param)
            torch.where(flag, buffer.prev_ema, buffer.ema, out=buffer.ema)
        self._snapshot_sq_norm = torch.where(diverged, self._snapshot_sq_norm, sq_norm)
        return diverged

    def _epoch_loss(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The epoch's mean of the losses given to step(), whether every step gave one, and the reference to
        compare it with (float64, bool, float64 0-dim tensors on the master device). Under torch.distributed the
        sums are all-reduced over the default group, and in epoch 0 the ranks' first-step losses averaged, so
        every rank decides alike (one small collective per epoch end, no host sync)."""
        totals = torch.stack([self._loss_sum, torch.full_like(self._loss_sum, self._loss_steps), self._loss_reference])
        steps, reference = self._step_in_epoch, self._loss_reference
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            torch.distributed.all_reduce(totals)
            steps *= world
            if self._epoch == 0:  # later references come from reduced means: the same on every rank already
                reference = totals[2] / world
        return totals[0] / totals[1], totals[1] == steps, reference

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """torch.optim layout: per-parameter ``ema``, ``prev_params``, ``prev_ema`` shaped like the parameter
        (views of the live buffers, as torch.optim returns live state), plus a ``"bb"`` entry with the epoch,
        the step within it, η̂, the history, the hyper-parameters and the safeguard's state (whether the snapshots
        hold a good epoch end, the rate cap, the rolled-back epochs; ``safeguard`` itself is the constructor's
        choice, not saved). Independent of backend and device."""
        state_dict = super().state_dict()
        lr = self.lr
        for group in state_dict["param_groups"]:
            group["lr"] = lr
        state_dict["bb"] = {
            "version": _STATE_DICT_VERSION,
            "epoch": self._epoch,
            "step_in_epoch": self._step_in_epoch,
            "lr": lr,
            "lr_history": self.lr_history,
            "steps_per_epoch": self.steps_per_epoch,
            "beta": self.beta,
            "tau0": self.tau0,
            "tau_min": self.tau_min,
            "tau_max": self.tau_max,
            "has_snapshot": bool(self._has_snapshot),
            "lr_cap": float(self._lr_cap),
            "rolled_back_epochs": self.rolled_back_epochs,
            "loss_sum": float(self._loss_sum),
            "loss_steps": self._loss_steps,
            "loss_reference": None if math.isnan(reference := float(self._loss_reference)) else reference,
        }
        return state_dict

    def _check_saved_schedule(self, bb: dict[str, Any]) -> None:
        """Raise unless the saved epoch counters and hyper-parameters are valid and the epoch mode matches."""
        steps = bb["steps_per_epoch"]
        if (steps is None) != (self.steps_per_epoch is None):
            saved_mode = "end_epoch() calls" if steps is None else f"automatic epochs of {steps} steps"
            raise ValueError(
                f"the state dict was saved with {saved_mode}, this optimizer has steps_per_epoch="
                f"{self.steps_per_epoch}; build it with steps_per_epoch={steps} to resume that run"
            )
        epoch, step = bb["epoch"], bb["step_in_epoch"]
        for name, value in (("epoch", epoch), ("step_in_epoch", step)):
            if not _is_int(value) or value < 0:
                raise ValueError(f"corrupt state dict: {name} must be an int >= 0, got {value!r}")
        if steps is not None and step >= steps:
            raise ValueError(f"corrupt state dict: step_in_epoch {step} is not below steps_per_epoch {steps}")
        if len(bb["lr_history"]) != epoch:
            raise ValueError(
                f"corrupt state dict: {len(bb['lr_history'])} learning rates in lr_history for {epoch} epochs"
            )
        _check_positive("the saved lr", bb["lr"])
        _check_beta(bb["beta"])
        for name in ("tau0", "tau_min", "tau_max"):
            _check_positive(f"the saved {name}", bb[name])
        if bb["tau_min"] > bb["tau_max"]:
            raise ValueError(f"corrupt state dict: tau_min {bb['tau_min']} > tau_max {bb['tau_max']}")
        rolled_back = bb.get("rolled_back_epochs", [])
        if (
            not isinstance(rolled_back, list)
            or any(not _is_int(e) or not 0 <= e < epoch for e in rolled_back)
            or rolled_back != sorted(set(rolled_back))
        ):
            raise ValueError(
                f"corrupt state dict: rolled_back_epochs must be increasing epochs in [0, {epoch}), got {rolled_back!r}"
            )
        lr_cap = bb.get("lr_cap", math.inf)
        if not _is_real(lr_cap) or not lr_cap > 0:
            raise ValueError(f"corrupt state dict: lr_cap must be a number > 0 or inf, got {lr_cap!r}")
        loss_steps = bb.get("loss_steps", 0)
        if not _is_int(loss_steps) or not 0 <= loss_steps <= step:
            raise ValueError(f"corrupt state dict: loss_steps must be an int in [0, {step}], got {loss_steps!r}")
        loss_sum, loss_reference = bb.get("loss_sum", 0.0), bb.get("loss_reference")
        if not _is_real(loss_sum):
            raise ValueError(f"corrupt state dict: loss_sum must be a number, got {loss_sum!r}")
        if loss_reference is not None and (not _is_real(loss_reference) or math.isnan(loss_reference)):
            raise ValueError(f"corrupt state dict: loss_reference must be a number or None, got {loss_reference!r}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` from any backend or device; everything is checked before writing."""
        bb = state_dict.get("bb") if isinstance(state_dict, dict) else None
        missing = [key for key in _BB_KEYS if not isinstance(bb, dict) or key not in bb]
        if missing or bb["version"] != _STATE_DICT_VERSION or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(
                f"not a bbfused.BB state dict of version {_STATE_DICT_VERSION} (missing or different: "
                f"{missing or ['version', 'state', 'param_groups']}); load a checkpoint saved from BB.state_dict()"
            )
        self._check_saved_schedule(bb)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} parameter groups, this optimizer "
                f"{len(self.param_groups)}; build the optimizer with the same groups as the saved one"
            )
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group_index, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    f"param_groups[{group_index}] has {len(group['params'])} parameters, the state dict "
                    f"{len(saved['params'])}; build the optimizer over the same model as the saved one"
                )
            _check_weight_decay(saved["weight_decay"], f" of the saved param_groups[{group_index}]")
            for p, key, name in zip(group["params"], saved["params"], self._param_names(group_index)):
                saved_state = state_dict["state"].get(key, {})
                for state_key in _STATE_KEYS:
                    value = saved_state.get(state_key)
                    if not isinstance(value, torch.Tensor) or value.shape != p.shape or not value.is_floating_point():
                        found = "missing" if value is None else f"{getattr(value, 'dtype', type(value))} of shape "
                        found += "" if value is None else str(tuple(getattr(value, "shape", ())))
                        raise ValueError(
                            f"the state dict's {state_key!r} for parameter {name} is {found}, expected a real "
                            f"floating-point tensor of shape {tuple(p.shape)}; load a checkpoint of the same model"
                        )
                    copies.append((self.state[p][state_key], value))
        steps = bb["steps_per_epoch"]
        with torch.no_grad():
            for target, value in copies:
                target.copy_(value)
            for lr_tensor in self._lr_tensors.values():
                lr_tensor.fill_(bb["lr"])
            self._publish_lr()
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: v for k, v in saved.items() if k not in ("params", "lr")})
        self._epoch = bb["epoch"]
        self._step_in_epoch = bb["step_in_epoch"]
        self._lr_history = [
            torch.tensor(value, dtype=torch.float64, device=self._lr_tensor.device) for value in bb["lr_history"]
        ]
        self.steps_per_epoch = steps
        self.beta = bb["beta"]
        self.tau0, self.tau_min, self.tau_max = bb["tau0"], bb["tau_min"], bb["tau_max"]
        # State dicts saved before the safeguard existed: the snapshots are good from the end of epoch 0 on.
        has_snapshot = bb.get("has_snapshot", bb["epoch"] >= 1)
        self._has_snapshot = torch.tensor(has_snapshot, device=self._lr_tensor.device)
        self._lr_cap = torch.tensor(bb.get("lr_cap", math.inf), dtype=torch.float64, device=self._lr_tensor.device)
        # State dicts saved before the loss check: no reference, and the current epoch's loss is not checked.
        self._loss_sum.fill_(bb.get("loss_sum", 0.0))
        self._loss_steps = bb.get("loss_steps", 0)
        reference = bb.get("loss_reference")
        self._loss_reference = torch.tensor(
            math.nan if reference is None else reference, dtype=torch.float64, device=self._lr_tensor.device
        )
        rolled_back = set(bb.get("rolled_back_epochs", []))
        self._rolled_back = (
            [torch.tensor(e in rolled_back, device=self._lr_tensor.device) for e in range(self._epoch)]
            if self.safeguard
            else []
        )
        self._snapshot_sq_norm = self._sq_norm("prev_params")


def _as_groups(params: Any) -> list[dict[str, Any]]:
    """torch.optim's ``params`` argument as a list of groups, checked for empty lists and duplicates.

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
    for group_index, group in enumerate(groups):
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


def _norm(flat: torch.Tensor) -> torch.Tensor:
    """‖flat‖ as a float64 0-dim tensor, accumulated in the state dtype.

    A float64 upcast of a float32 buffer would cost a full conversion pass (30x slower on CPU); the safeguard
    compares norms against a growth bound (_SAFEGUARD_GROWTH), and an overflow to inf reads as diverged, as it should.
    """
    return torch.linalg.vector_norm(flat, dtype=state_dtype(flat.dtype)).double()


def _on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """``tensor`` on ``device`` (GradScaler keeps its tensors on one device); None stays None."""
    if tensor is None or tensor.device == device:
        return tensor
    # Asynchronous only towards a GPU: a non-blocking copy to the CPU could be read before it has landed.
    return tensor.to(device, non_blocking=device.type == "cuda")
