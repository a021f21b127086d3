"""BB's checkpoint format: the ``"bb"`` entry of ``BB.state_dict()`` and the per-parameter state keys.

This is the only module that names a key of the format. The optimizer, the clock and the rate controls hand over
and take back typed records (:class:`RunState`, :class:`ControlState`); :func:`entry` writes them as the
``"bb"`` dict and :func:`read` checks a saved one completely and returns the records, so that a load that fails
has written nothing.

:func:`attach` puts that one dict both at the top level of the state dict and into every param group. The top-level
entry is the one read when present (a plain ``BB.state_dict()``, edited or not); torch.distributed.checkpoint's
``get_optimizer_state_dict`` keeps only ``"state"`` and ``"param_groups"`` (with every param group's keys), so that a
dict from it carries BB's global state replicated in its groups, and :func:`read` takes it from there (all copies
must agree). A dict with neither, such as one saved through ``get_optimizer_state_dict`` before the groups carried
it, is refused with the fix. The copies in the groups changed nothing in the entry itself: older dicts, which have
only the top-level entry, load as before and need no upgrade.

Version 7 is current. :func:`upgrade` brings an older entry up to it: version 1 had no rate-control state (its
``loss_reference``, the last good epoch's mean loss, becomes the best and the last mean loss), entries written
before groups could be added have no ``join_epochs`` (every group was a constructor's group: all 0), version 2
had no multiplier (a scheduler's writes were ignored: the rate applied was the rule's), version 3 had no
preconditioner (the step was SGD's), version 4 no gradient shares (the dead-unit test has no reference until
the next good period end), and in version 5 and earlier a gradient average held an average of d inside the window
(``window_point`` False: the optimizer turns it into the window's point at its next step, ``bbfused.average_window``).
Version 6 and earlier did not name the rate control: from version 4 on, the paper's method alone saved a fallback
rate τ₀; before, both did, and such an entry loads into either (``safeguard`` None).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .arguments import check_beta, check_positive, check_weight_decay, is_int, is_real
from .preconditioner import NAMES as PRECONDITIONERS

VERSION = 7
ENTRY = "bb"
# Per-parameter state, shaped like the parameter.
STATE_KEYS = ("ema", "prev_params", "prev_ema")
MOMENTUM_KEY = "momentum_buffer"  # with momentum, as torch.optim.SGD names it
SECOND_MOMENT_KEY = "exp_avg_sq"  # with a preconditioner, as torch.optim.Adam names it


@dataclass
class ControlState:
    """The default rate control's state (``bbfused.control.safeguard``); the paper's method keeps none and saves
    :meth:`empty`."""

    has_snapshot: bool
    lr_cap: float
    loss_sum: float
    loss_steps: int
    initial_loss: float | None
    best_loss: float | None
    last_loss: float | None
    good_lr: float | None
    loss_rollback: bool
    model_buffers: list[torch.Tensor] = field(default_factory=list)
    rate: float | None = None  # r, the rate before the end phase (None: the paper's method keeps none)
    searching: bool = False  # the first epochs' search for the rate goes on
    ceiling: float = math.inf  # r never grows past it again (the loss rose there)
    snapshot_loss: float | None = None  # the last step's loss of the last good period
    # The dead-unit test's shares of gradient values that are not zero: at the last good period end (None: none yet),
    # and at the step before the open period's last (0: not taken).
    live_reference: float | None = None
    live_before: float = 0.0
    live_rolled_back: bool = False  # the last period was rolled back by the dead-unit test

    @classmethod
    def empty(cls, epoch: int) -> ControlState:
        """A run that never rolled back nor saw a loss: the snapshots hold an epoch end from epoch 1 on."""
        return cls(epoch >= 1, math.inf, 0.0, 0, None, None, None, None, False, [])


@dataclass
class RunState:
    """Everything in the ``"bb"`` entry: the epoch counters and histories, the hyper-parameters, the groups' join
    epochs (see ``BB.add_param_group``) and the rate control's state."""

    epoch: int
    step_in_epoch: int
    lr: float  # the rate the next step applies: rule_lr times lr_multiplier
    rule_lr: float  # the rate the rate control set
    lr_multiplier: float  # what writes to the groups' "lr" (an lr_scheduler's) made of it; 1 without
    lr_history: list[float]
    rolled_back_epochs: list[int]
    steps_per_epoch: int | None
    epochs: int | None  # the planned number of epochs (the default control's end phase)
    beta: float
    momentum: float
    nesterov: bool
    tau0: float | None  # None: the default control has no fallback rate
    tau_min: float
    tau_max: float
    join_epochs: list[int]
    control: ControlState
    preconditioner: str | None = None  # None: BB's SGD step; "adam": the step's per-element scaling
    beta2_powers: list[float] = field(default_factory=list)  # per group, β₂ᵗ of its second moments' bias correction
    beta2_lags: list[list[int]] = field(default_factory=list)  # per group and parameter, the group's steps it missed
    # Inside an open window a windowed gradient average holds the window's point (False: an average of d, as saved by
    # version 5 and earlier).
    window_point: bool = True
    # The rate control that saved it: True the default's, False the paper's method; None: unknown (version 3 and
    # earlier), loads into either.
    safeguard: bool | None = True


_RUN_KEYS = tuple(f.name for f in dataclasses.fields(RunState) if f.name != "control")
_PRECONDITIONER_KEYS = ("preconditioner", "beta2_powers", "beta2_lags")
_CONTROL_KEYS = tuple(f.name for f in dataclasses.fields(ControlState))
# The rate control's keys (its state and the rollback history), which version 1 did not have.
CONTROL_KEYS = ("rolled_back_epochs", *_CONTROL_KEYS)
# The keys introduced after version 1; an entry without them takes the values of a run that never rolled back.
_ADDED_LATER = (
    "join_epochs", "lr_multiplier", "epochs", "momentum", "nesterov", "window_point", "safeguard",
    *_PRECONDITIONER_KEYS, *CONTROL_KEYS,
)  # fmt: skip


def entry(run: RunState) -> dict[str, Any]:
    """``run`` as the ``"bb"`` dict of a state dict (plain Python values and CPU tensors)."""
    values = {key: getattr(run, key) for key in _RUN_KEYS}
    return {"version": VERSION, **values, **dataclasses.asdict(run.control)}


def attach(state_dict: dict[str, Any], run: RunState) -> None:
    """Write ``run`` into a packed state dict: as its ``"bb"`` entry and, the same dict, into each param group (where
    torch.distributed.checkpoint's ``get_optimizer_state_dict`` keeps it)."""
    bb = entry(run)
    state_dict[ENTRY] = bb
    for group in state_dict["param_groups"]:
        group[ENTRY] = bb


def group_options(saved_group: dict[str, Any]) -> dict[str, Any]:
    """A saved param group's options to restore into the live group: all but its parameters, its ``"lr"`` (BB's
    one rate is restored from the entry) and its copy of the entry."""
    return {key: value for key, value in saved_group.items() if key not in ("params", "lr", ENTRY)}


def upgrade(bb: dict[str, Any], groups: int) -> dict[str, Any]:
    """An older ``"bb"`` entry as the current version (a new dict); the current one unchanged."""
    if bb.get("version") == VERSION:
        return bb
    epoch = bb["epoch"] if is_int(bb.get("epoch")) else 0
    defaults = {
        **dataclasses.asdict(ControlState.empty(epoch)),
        "rolled_back_epochs": [],
        "join_epochs": [0] * groups,
        "lr_multiplier": 1.0,
        "epochs": None,
        "momentum": 0.0,
        "nesterov": False,
        "preconditioner": None,
        "beta2_powers": [],
        "beta2_lags": [],
        "window_point": False,
        # From version 4 on only the paper's method saved τ₀ (the default control has none).
        "safeguard": bb.get("tau0") is None if bb.get("version", 0) >= 4 else None,
    }
    upgraded = {**{key: defaults[key] for key in _ADDED_LATER}, "rule_lr": bb.get("lr"), **bb, "version": VERSION}
    if upgraded["rate"] is None:  # before the rate r was kept apart from the applied rate, they were one
        upgraded["rate"] = upgraded["rule_lr"]
    if "loss_reference" in upgraded:
        upgraded["best_loss"] = upgraded["last_loss"] = upgraded.pop("loss_reference")
    return upgraded


def read(state_dict: Any) -> RunState:
    """The ``"bb"`` entry of ``state_dict`` as records, checked; raises ValueError naming the problem."""
    bb = _saved_entry(state_dict)
    version = bb.get("version") if isinstance(bb, dict) else None
    if bb is None and isinstance(state_dict, dict) and {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(
            "not a bbfused.BB state dict: it lacks BB's global state (the 'bb' entry: the rate, the epoch counters, "
            "the lr history and the rate control's state), as a dict from another optimizer, from "
            "get_optimizer_state_dict(..., options=StateDictOptions(flatten_optimizer_state_dict=True)), which "
            "drops it, or from get_optimizer_state_dict() of a bbfused that did not keep it in the param groups. "
            "Save the checkpoint again from BB.state_dict() or from get_optimizer_state_dict(model, opt) with "
            "the default options, and load that"
        )
    if (
        not isinstance(bb, dict)
        or version not in (1, 2, 3, 4, 5, 6, VERSION)
        or not {"state", "param_groups"} <= state_dict.keys()
    ):
        raise ValueError(
            f"not a bbfused.BB state dict (versions 1 to {VERSION}; found version {version!r}); load a checkpoint "
            f"saved from BB.state_dict()"
        )
    bb = upgrade(bb, len(state_dict["param_groups"]))
    missing = [key for key in (*_RUN_KEYS, *_CONTROL_KEYS) if key not in bb]
    if missing:
        hint = (
            ""
            if ENTRY in state_dict
            else " (set_optimizer_state_dict with StateDictOptions(full_state_dict=True) loses the param groups' "
            "copies of its lists: load with the default options)"
        )
        raise ValueError(f"corrupt state dict: the 'bb' entry lacks {', '.join(missing)}{hint}")
    _check_counters(bb, len(state_dict["param_groups"]))
    _check_preconditioner(bb, state_dict["param_groups"])
    _check_control(bb)
    control = ControlState(**{key: bb[key] for key in _CONTROL_KEYS})
    return RunState(**{key: bb[key] for key in _RUN_KEYS}, control=control)


def _saved_entry(state_dict: Any) -> Any:
    """The saved ``"bb"`` entry: the top-level one, else the copy every param group carries; None when there is
    neither. Raises ValueError when only some groups carry one or the copies differ."""
    if not isinstance(state_dict, dict):
        return None
    if ENTRY in state_dict:
        return state_dict[ENTRY]
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or not groups or not all(isinstance(group, dict) for group in groups):
        return None
    copies = [group.get(ENTRY) for group in groups]
    if all(copy is None for copy in copies):
        return None
    if not all(_same(copies[0], copy) for copy in copies[1:]):
        raise ValueError(
            "corrupt state dict: its param groups carry different copies of BB's global state (the 'bb' entry), or "
            "only some carry one; save it again from one BB optimizer (BB.state_dict() or get_optimizer_state_dict)"
        )
    return copies[0]


def _same(a: Any, b: Any) -> bool:
    """Whether two saved values are equal: tensors elementwise, NaN equal to NaN."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device)
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def check_resumable(
    run: RunState,
    steps_per_epoch: int | None,
    momentum: float,
    preconditioner: str | None = None,
    safeguard: bool = True,
) -> None:
    """Raise ValueError unless an optimizer built with ``steps_per_epoch``, ``momentum``, ``preconditioner`` and
    ``safeguard`` can resume ``run``: the epoch's length (or its end by ``end_epoch()``), the momentum buffer's
    presence, the step's kind and the rate control cannot change on a load."""
    if run.steps_per_epoch != steps_per_epoch:
        saved = "end_epoch() calls" if run.steps_per_epoch is None else f"epochs of {run.steps_per_epoch} steps"
        raise ValueError(
            f"the state dict was saved with {saved}, this optimizer has steps_per_epoch={steps_per_epoch}; build it "
            f"with steps_per_epoch={run.steps_per_epoch} to resume that run"
        )
    if run.safeguard is not None and run.safeguard != safeguard:
        control = "the default rate control" if run.safeguard else "the paper's method"
        raise ValueError(
            f"the state dict was saved with safeguard={run.safeguard} ({control}), this optimizer has "
            f"safeguard={safeguard}; build it with safeguard={run.safeguard} to resume that run"
        )
    if (run.momentum > 0) != (momentum > 0):
        raise ValueError(
            f"the state dict was saved with momentum={run.momentum}, this optimizer has momentum={momentum}; build "
            f"it with momentum={run.momentum} to resume that run"
        )
    if run.preconditioner != preconditioner:
        raise ValueError(
            f"the state dict was saved with preconditioner={run.preconditioner!r}, this optimizer has "
            f"preconditioner={preconditioner!r}; build it with preconditioner={run.preconditioner!r} to resume that run"
        )


def saved_steps_per_epoch(state_dict: dict[str, Any]) -> int | None:
    """The ``steps_per_epoch`` a ``BB.state_dict()`` was saved with (None: epochs ended by ``end_epoch()``);
    raises ValueError when ``state_dict`` is not one."""
    return read(state_dict).steps_per_epoch


def _check_counters(bb: dict[str, Any], groups: int) -> None:
    """Raise unless the saved epoch counters, histories and hyper-parameters are valid."""
    epoch, step, steps = bb["epoch"], bb["step_in_epoch"], bb["steps_per_epoch"]
    for name, value in (("epoch", epoch), ("step_in_epoch", step)):
        if not is_int(value) or value < 0:
            raise ValueError(f"corrupt state dict: {name} must be an int >= 0, got {value!r}")
    if steps is not None and (not is_int(steps) or steps <= 0):
        raise ValueError(f"corrupt state dict: steps_per_epoch must be a positive int or None, got {steps!r}")
    if steps is not None and step >= steps:
        raise ValueError(f"corrupt state dict: step_in_epoch {step} is not below steps_per_epoch {steps}")
    history = bb["lr_history"]
    if not isinstance(history, list) or len(history) != epoch:
        raise ValueError(f"corrupt state dict: lr_history must list the {epoch} completed epochs' rates")
    bad = [rate for rate in history if not _is_finite_nonnegative(rate)]
    if bad:
        raise ValueError(f"corrupt state dict: lr_history must hold finite rates >= 0, found {bad[0]!r}")
    for name in ("lr", "lr_multiplier"):
        if not _is_finite_nonnegative(bb[name]):
            raise ValueError(f"corrupt state dict: {name} must be a finite number >= 0, got {bb[name]!r}")
    check_positive("the saved rule_lr", bb["rule_lr"])
    check_beta(bb["beta"])
    epochs = bb["epochs"]
    if epochs is not None and (not is_int(epochs) or epochs <= 0):
        raise ValueError(f"corrupt state dict: epochs must be a positive int or None, got {epochs!r}")
    momentum = bb["momentum"]
    if not is_real(momentum) or not 0 <= momentum < 1 or not isinstance(bb["nesterov"], bool):
        raise ValueError(
            f"corrupt state dict: momentum must be a number in [0, 1) and nesterov True or False, got "
            f"{momentum!r} and {bb['nesterov']!r}"
        )
    if not isinstance(bb["window_point"], bool):
        raise ValueError(f"corrupt state dict: window_point must be True or False, got {bb['window_point']!r}")
    if bb["safeguard"] is not None and not isinstance(bb["safeguard"], bool):
        raise ValueError(f"corrupt state dict: safeguard must be True, False or None, got {bb['safeguard']!r}")
    for name in ("tau0", "tau_min", "tau_max"):
        if not (name == "tau0" and bb[name] is None):
            check_positive(f"the saved {name}", bb[name])
    if bb["tau_min"] > bb["tau_max"]:
        raise ValueError(f"corrupt state dict: tau_min {bb['tau_min']} > tau_max {bb['tau_max']}")
    join_epochs = bb["join_epochs"]
    if not isinstance(join_epochs, list) or any(not is_int(e) or e < 0 for e in join_epochs):
        raise ValueError(f"corrupt state dict: join_epochs must be a list of ints >= 0, got {join_epochs!r}")
    if len(join_epochs) != groups:
        raise ValueError(
            f"corrupt state dict: join_epochs lists {len(join_epochs)} parameter groups, param_groups {groups}"
        )
    rolled_back = bb["rolled_back_epochs"]
    # The open epoch counts once a period of it was rolled back (a split first epoch's).
    upper = epoch + (step > 0)
    if (
        not isinstance(rolled_back, list)
        or any(not is_int(e) or not 0 <= e < upper for e in rolled_back)
        or rolled_back != sorted(set(rolled_back))
    ):
        raise ValueError(
            f"corrupt state dict: rolled_back_epochs must be increasing epochs in [0, {upper}), got {rolled_back!r}"
        )


def _check_preconditioner(bb: dict[str, Any], groups: Any) -> None:
    """Raise unless the saved preconditioner is one BB has and, with one, ``beta2_powers`` lists each saved group's
    β₂ᵗ and ``beta2_lags`` each of its parameters' missed steps (both empty without one)."""
    preconditioned = bb["preconditioner"] is not None
    if bb["preconditioner"] not in PRECONDITIONERS:
        raise ValueError(
            f"corrupt state dict: preconditioner must be one of {PRECONDITIONERS}, got {bb['preconditioner']!r}"
        )
    powers, wanted_powers = bb["beta2_powers"], len(groups) if preconditioned else 0
    if (
        not isinstance(powers, list)
        or len(powers) != wanted_powers
        or any(not is_real(p) or not 0 <= p <= 1 for p in powers)
    ):
        raise ValueError(
            f"corrupt state dict: beta2_powers must list {wanted_powers} numbers in [0, 1] (one a parameter group "
            f"with a preconditioner, none without), got {powers!r}"
        )
    lags = bb["beta2_lags"]
    sizes = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else None for g in groups]
    wanted = sizes if preconditioned else []
    if (
        not isinstance(lags, list)
        or len(lags) != len(wanted)
        or any(not isinstance(group, list) or len(group) != size for group, size in zip(lags, wanted))
        or any(not is_int(lag) or lag < 0 for group in lags for lag in group)
    ):
        raise ValueError(
            f"corrupt state dict: beta2_lags must list, for each parameter group with a preconditioner, one int >= 0 "
            f"per parameter (the group's steps it missed), {wanted} of them; got {lags!r}"
        )


def _is_finite_nonnegative(value: Any) -> bool:
    """A rate, or a share of gradient values (at most 1 but for a frozen parameter given a gradient by hand, which
    counts in the numerator and not in the denominator)."""
    return is_real(value) and math.isfinite(value) and value >= 0


def _check_control(bb: dict[str, Any]) -> None:
    """Raise unless the rate control's saved state is valid."""
    for name in ("has_snapshot", "loss_rollback", "live_rolled_back"):
        if not isinstance(bb[name], bool):
            raise ValueError(f"corrupt state dict: {name} must be True or False, got {bb[name]!r}")
    lr_cap = bb["lr_cap"]
    if not is_real(lr_cap) or not lr_cap > 0:
        raise ValueError(f"corrupt state dict: lr_cap must be a number > 0 or inf, got {lr_cap!r}")
    loss_steps, step = bb["loss_steps"], bb["step_in_epoch"]
    if not is_int(loss_steps) or not 0 <= loss_steps <= step:
        raise ValueError(f"corrupt state dict: loss_steps must be an int in [0, {step}], got {loss_steps!r}")
    if not is_real(bb["loss_sum"]):  # NaN too: a step's non-finite loss, which the epoch's end will judge
        raise ValueError(f"corrupt state dict: loss_sum must be a number, got {bb['loss_sum']!r}")
    for name in ("initial_loss", "best_loss", "last_loss", "snapshot_loss"):
        value = bb[name]
        if value is not None and (not is_real(value) or math.isnan(value)):
            raise ValueError(f"corrupt state dict: {name} must be a number or None, got {value!r}")
    reference, before = bb["live_reference"], bb["live_before"]
    if (reference is not None and not _is_finite_nonnegative(reference)) or not _is_finite_nonnegative(before):
        raise ValueError(
            f"corrupt state dict: live_reference must be a finite number >= 0 or None and live_before a finite number "
            f">= 0 (shares of gradient values that are not zero); got {reference!r} and {before!r}"
        )
    good_lr = bb["good_lr"]
    if good_lr is not None and (not is_real(good_lr) or not good_lr > 0):
        raise ValueError(f"corrupt state dict: good_lr must be a number > 0 or None, got {good_lr!r}")
    buffers = bb["model_buffers"]
    if not isinstance(buffers, list) or any(not isinstance(t, torch.Tensor) for t in buffers):
        raise ValueError("corrupt state dict: model_buffers must be a list of tensors")
    rate, ceiling = bb["rate"], bb["ceiling"]
    if rate is not None and (not is_real(rate) or not math.isfinite(rate) or rate <= 0):
        raise ValueError(f"corrupt state dict: rate must be a finite number > 0 or None, got {rate!r}")
    if not is_real(ceiling) or not ceiling > 0 or not isinstance(bb["searching"], bool):
        raise ValueError(
            f"corrupt state dict: ceiling must be a number > 0 or inf and searching True or False, got {ceiling!r} "
            f"and {bb['searching']!r}"
        )


def check_model_buffers(saved: list[torch.Tensor], tracked: list[torch.Tensor]) -> None:
    """Raise unless the saved buffer snapshots fit the buffers this optimizer tracks (none saved always fits) and
    hold finite values where the tracked ones are floating point (a rollback would restore them)."""
    if not saved:
        return
    if len(saved) != len(tracked) or any(s.shape != t.shape or s.dtype != t.dtype for s, t in zip(saved, tracked)):
        raise ValueError(
            f"the state dict holds snapshots of {len(saved)} model buffers that do not match the {len(tracked)} "
            f"this optimizer tracks; call track_buffers() with the same model before load_state_dict()"
        )
    for index, snapshot in enumerate(saved):
        if snapshot.layout != torch.strided or snapshot.is_meta:
            raise ValueError(f"corrupt state dict: model_buffers[{index}] is not a dense tensor with values")
        if snapshot.is_floating_point() and not bool(torch.isfinite(snapshot).all()):
            raise ValueError(
                f"corrupt state dict: model_buffers[{index}] holds inf or NaN, which a rollback would restore into "
                f"the model; load a checkpoint saved before the values went bad"
            )


def check_param_state(
    state_dict: dict[str, Any],
    param_groups: list[dict[str, Any]],
    names: list[list[str]],
    finite: bool,
) -> list[tuple[torch.Tensor, str, torch.Tensor]]:
    """Check the saved per-parameter state against this optimizer's groups; returns (parameter, key, value)
    triples to copy. ``names``: the parameters' display names, per group. ``finite``: every value must be finite
    (the default rate control rolls back to the snapshots). With momentum the state holds a momentum buffer too, with a
    preconditioner the second moments."""
    run = read(state_dict)
    keys = STATE_KEYS + ((MOMENTUM_KEY,) if run.momentum > 0 else ())
    keys += (SECOND_MOMENT_KEY,) if run.preconditioner is not None else ()
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"the state dict has {len(saved_groups)} parameter groups, this optimizer {len(param_groups)}; "
            f"build the optimizer with the same groups as the saved one, and add the groups it added "
            f"(add_param_group) before load_state_dict()"
        )
    copies = []
    for group_index, (group, saved) in enumerate(zip(param_groups, saved_groups)):
        if len(group["params"]) != len(saved["params"]):
            raise ValueError(
                f"param_groups[{group_index}] has {len(group['params'])} parameters, the state dict "
                f"{len(saved['params'])}; build the optimizer over the same model as the saved one (with the same "
                f"groups, added ones included)"
            )
        check_weight_decay(saved["weight_decay"], f" of the saved param_groups[{group_index}]")
        for p, key, name in zip(group["params"], saved["params"], names[group_index]):
            saved_state = state_dict["state"].get(key, {})
            for state_key in keys:
                value = saved_state.get(state_key)
                second_moment = state_key == SECOND_MOMENT_KEY
                _check_state_tensor(value, state_key, name, p, finite and not second_moment)
                if second_moment and not bool((torch.isfinite(value) & (value >= 0)).all()):
                    raise ValueError(
                        f"the state dict's {state_key!r} for parameter {name} holds negative, inf or NaN values, "
                        f"which a second moment (an average of finite squares) cannot; load a checkpoint saved "
                        f"before they went bad"
                    )
                copies.append((p, state_key, value))
    return copies


def _check_state_tensor(value: Any, key: str, name: str, p: torch.Tensor, finite: bool) -> None:
    where = f"the state dict's {key!r} for parameter {name}"
    if (
        not isinstance(value, torch.Tensor)
        or value.shape != p.shape
        or not value.is_floating_point()
        or value.layout != torch.strided
        or value.is_meta
    ):
        if value is None:
            found = "missing"
        elif isinstance(value, torch.Tensor):
            kind = "a meta" if value.is_meta else "a sparse" if value.layout != torch.strided else "a"
            found = f"{kind} {value.dtype} tensor of shape {tuple(value.shape)}"
        else:
            found = f"a {type(value).__name__}"
        raise ValueError(
            f"{where} is {found}, expected a dense real floating-point tensor of shape {tuple(p.shape)}; load a "
            f"checkpoint of the same model"
        )
    if finite and not bool(torch.isfinite(value).all()):
        raise ValueError(
            f"{where} holds inf or NaN: the default rate control would roll the weights back to such values. Load "
            f"a checkpoint saved before they went bad, or load this one with safeguard=False"
        )
