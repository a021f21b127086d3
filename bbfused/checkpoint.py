"""BB's checkpoint format: the ``"bb"`` entry of ``BB.state_dict()``, its checks, and the one migration path.

Version 2 (current) adds the rate control's state: the initial loss, the best and the last good epoch mean loss
(replacing version 1's ``loss_reference``, the last good epoch's mean), the last good epoch's rate, whether the
last epoch was rolled back by a loss test, and the snapshots of the model buffers BB tracks. Version 1
state dicts, with or without the safeguard's keys, are upgraded on load by :func:`upgrade`; every value is
checked before the optimizer writes anything.

``join_epochs`` (per parameter group, the first epoch whose end's rate estimate includes it; see
``BB.add_param_group``) came with adding groups after construction. It is optional within version 2: a state dict
without it was saved before groups could be added, so every group is a constructor's group, in the estimate from
the start (all 0).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

try:
    from numpy import bool_ as numpy_bool
except ImportError:  # NumPy is optional; without it no value is a NumPy bool
    numpy_bool = bool

VERSION = 2
# Per-parameter state, shaped like the parameter.
STATE_KEYS = ("ema", "prev_params", "prev_ema")
SCHEDULE_KEYS = ("epoch", "step_in_epoch", "lr", "lr_history", "steps_per_epoch", "beta", "tau0", "tau_min", "tau_max")
CONTROL_KEYS = (
    "has_snapshot",
    "lr_cap",
    "rolled_back_epochs",
    "loss_sum",
    "loss_steps",
    "initial_loss",
    "best_loss",
    "last_loss",
    "good_lr",
    "loss_rollback",
    "model_buffers",
)


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number: a Python or NumPy int or float (bool excluded: True is not a rate or a
    loss)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, numpy_bool))


def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy int (bool excluded)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, numpy_bool))


def as_number(name: str, value: Any, integer: bool = False) -> float | int:
    """``value`` as a Python float (an int with ``integer``): a Python or NumPy real number, or a one-element real
    tensor, as torch.optim accepts for ``lr``. Anything else raises ValueError naming the problem and the fix."""
    kind = "an int" if integer else "a number"
    if isinstance(value, torch.Tensor):
        found = f"a {value.dtype} tensor of shape {tuple(value.shape)}"
        if value.numel() != 1:
            raise ValueError(f"{name} must be {kind}, got {found}; pass a single value or a one-element tensor")
        if value.is_complex() or value.dtype == torch.bool or (integer and value.is_floating_point()):
            wanted = "an integer" if integer else "a real (floating-point or integer)"
            raise ValueError(f"{name} must be {kind}, got {found}; pass {wanted} tensor or a Python number")
        if value.is_meta:
            raise ValueError(f"{name} must be {kind}, got {found} on the meta device, which holds no value")
        return int(value.item()) if integer else float(value.item())
    if is_int(value) or (not integer and is_real(value)):
        return int(value) if integer else float(value)
    if isinstance(value, (bool, numpy_bool)):
        problem = "a bool"
    elif isinstance(value, numbers.Complex) and not isinstance(value, numbers.Real):
        problem = "complex"
    else:
        problem = f"of type {type(value).__name__}"
    example = "a Python int" if integer else "a float, a NumPy scalar or a one-element real tensor"
    raise ValueError(f"{name} must be {kind}, got {value!r} ({problem}); pass {example}")


def check_positive(name: str, value: Any) -> float:
    number = as_number(name, value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}; pass a positive value")
    return number


def check_beta(value: Any) -> float:
    number = as_number("beta", value)
    if not 0 < number <= 1:
        raise ValueError(f"beta must be in (0, 1], got {value!r} (the paper uses 4/steps_per_epoch)")
    return number


def check_weight_decay(value: Any, where: str) -> float:
    number = as_number(f"weight_decay{where}", value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"weight_decay{where} must be a finite number >= 0, got {value!r}; pass 0 for none")
    return number


def check_steps_per_epoch(value: Any) -> int | None:
    """``steps_per_epoch`` as a positive int, or None."""
    if value is None:
        return None
    steps = as_number("steps_per_epoch", value, integer=True)
    if steps <= 0:
        raise ValueError(f"steps_per_epoch must be a positive int or None, got {value!r}; pass len(loader)")
    return steps


def empty_control_state(epoch: int) -> dict[str, Any]:
    """The rate control's state of a run that never rolled back nor saw a loss (what ``safeguard=False`` saves):
    the snapshots hold an epoch end from the end of epoch 0 on."""
    return {
        "has_snapshot": epoch >= 1,
        "lr_cap": math.inf,
        "rolled_back_epochs": [],
        "loss_sum": 0.0,
        "loss_steps": 0,
        "initial_loss": None,
        "best_loss": None,
        "last_loss": None,
        "good_lr": None,
        "loss_rollback": False,
        "model_buffers": [],
    }


def upgrade(bb: dict[str, Any]) -> dict[str, Any]:
    """A version 1 ``"bb"`` entry as version 2 (a new dict). Keys a version 1 run did not have yet take
    :func:`empty_control_state`'s values (before the loss check no loss was kept, so the current epoch's is not
    checked); version 1's ``loss_reference``, the last good epoch's mean loss, becomes the best mean loss."""
    upgraded = {**empty_control_state(bb.get("epoch", 0) if is_int(bb.get("epoch")) else 0), **bb}
    upgraded["best_loss"] = upgraded["last_loss"] = upgraded.pop("loss_reference", None)
    upgraded["version"] = VERSION
    return upgraded


def read_bb(state_dict: Any) -> dict[str, Any]:
    """The ``"bb"`` entry of ``state_dict`` at the current version, checked; raises ValueError naming the problem."""
    bb = state_dict.get("bb") if isinstance(state_dict, dict) else None
    version = bb.get("version") if isinstance(bb, dict) else None
    if not isinstance(bb, dict) or version not in (1, VERSION) or not {"state", "param_groups"} <= state_dict.keys():
        raise ValueError(
            f"not a bbfused.BB state dict (version 1 or {VERSION}; found version {version!r}); load a checkpoint "
            f"saved from BB.state_dict()"
        )
    if version == 1:
        bb = upgrade(bb)
    missing = [key for key in (*SCHEDULE_KEYS, *CONTROL_KEYS) if key not in bb]
    if missing:
        raise ValueError(f"corrupt state dict: the 'bb' entry lacks {', '.join(missing)}")
    check_schedule(bb)
    check_control(bb)
    return check_join_epochs(bb, len(state_dict["param_groups"]))


def check_join_epochs(bb: dict[str, Any], groups: int) -> dict[str, Any]:
    """``bb`` with a checked ``join_epochs`` for ``groups`` parameter groups (a new dict when it had none)."""
    if "join_epochs" not in bb:
        return {**bb, "join_epochs": [0] * groups}
    join_epochs = bb["join_epochs"]
    if not isinstance(join_epochs, list) or any(not is_int(e) or e < 0 for e in join_epochs):
        raise ValueError(f"corrupt state dict: join_epochs must be a list of ints >= 0, got {join_epochs!r}")
    if len(join_epochs) != groups:
        raise ValueError(
            f"corrupt state dict: join_epochs lists {len(join_epochs)} parameter groups, param_groups {groups}"
        )
    return bb


def check_schedule(bb: dict[str, Any]) -> None:
    """Raise unless the saved epoch counters and hyper-parameters are valid."""
    epoch, step, steps = bb["epoch"], bb["step_in_epoch"], bb["steps_per_epoch"]
    for name, value in (("epoch", epoch), ("step_in_epoch", step)):
        if not is_int(value) or value < 0:
            raise ValueError(f"corrupt state dict: {name} must be an int >= 0, got {value!r}")
    if steps is not None and (not is_int(steps) or steps <= 0):
        raise ValueError(f"corrupt state dict: steps_per_epoch must be a positive int or None, got {steps!r}")
    if steps is not None and step >= steps:
        raise ValueError(f"corrupt state dict: step_in_epoch {step} is not below steps_per_epoch {steps}")
    if not isinstance(bb["lr_history"], list) or len(bb["lr_history"]) != epoch:
        raise ValueError(f"corrupt state dict: lr_history must list the {epoch} completed epochs' rates")
    check_positive("the saved lr", bb["lr"])
    check_beta(bb["beta"])
    for name in ("tau0", "tau_min", "tau_max"):
        check_positive(f"the saved {name}", bb[name])
    if bb["tau_min"] > bb["tau_max"]:
        raise ValueError(f"corrupt state dict: tau_min {bb['tau_min']} > tau_max {bb['tau_max']}")


def check_control(bb: dict[str, Any]) -> None:
    """Raise unless the rate control's saved state is valid."""
    epoch, step = bb["epoch"], bb["step_in_epoch"]
    for name in ("has_snapshot", "loss_rollback"):
        if not isinstance(bb[name], bool):
            raise ValueError(f"corrupt state dict: {name} must be True or False, got {bb[name]!r}")
    rolled_back = bb["rolled_back_epochs"]
    if (
        not isinstance(rolled_back, list)
        or any(not is_int(e) or not 0 <= e < epoch for e in rolled_back)
        or rolled_back != sorted(set(rolled_back))
    ):
        raise ValueError(
            f"corrupt state dict: rolled_back_epochs must be increasing epochs in [0, {epoch}), got {rolled_back!r}"
        )
    lr_cap = bb["lr_cap"]
    if not is_real(lr_cap) or not lr_cap > 0:
        raise ValueError(f"corrupt state dict: lr_cap must be a number > 0 or inf, got {lr_cap!r}")
    loss_steps = bb["loss_steps"]
    if not is_int(loss_steps) or not 0 <= loss_steps <= step:
        raise ValueError(f"corrupt state dict: loss_steps must be an int in [0, {step}], got {loss_steps!r}")
    if not is_real(bb["loss_sum"]):
        raise ValueError(f"corrupt state dict: loss_sum must be a number, got {bb['loss_sum']!r}")
    for name in ("initial_loss", "best_loss", "last_loss"):
        value = bb[name]
        if value is not None and (not is_real(value) or math.isnan(value)):
            raise ValueError(f"corrupt state dict: {name} must be a number or None, got {value!r}")
    good_lr = bb["good_lr"]
    if good_lr is not None and (not is_real(good_lr) or not good_lr > 0):
        raise ValueError(f"corrupt state dict: good_lr must be a number > 0 or None, got {good_lr!r}")
    buffers = bb["model_buffers"]
    if not isinstance(buffers, list) or any(not isinstance(t, torch.Tensor) for t in buffers):
        raise ValueError("corrupt state dict: model_buffers must be a list of tensors")


def check_model_buffers(saved: list[torch.Tensor], tracked: list[torch.Tensor]) -> None:
    """Raise unless the saved buffer snapshots fit the buffers this optimizer tracks (none saved always fits)."""
    if not saved:
        return
    if len(saved) != len(tracked) or any(s.shape != t.shape or s.dtype != t.dtype for s, t in zip(saved, tracked)):
        raise ValueError(
            f"the state dict holds snapshots of {len(saved)} model buffers that do not match the {len(tracked)} "
            f"this optimizer tracks; call track_buffers() with the same model before load_state_dict()"
        )


def check_param_state(state_dict: dict[str, Any], param_groups: list[dict[str, Any]], names) -> list:
    """Check the saved per-parameter state against this optimizer's groups; returns (parameter, key, value)
    triples to copy. ``names(group_index)`` gives the parameters' display names."""
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
        for p, key, name in zip(group["params"], saved["params"], names(group_index)):
            saved_state = state_dict["state"].get(key, {})
            for state_key in STATE_KEYS:
                value = saved_state.get(state_key)
                if not isinstance(value, torch.Tensor) or value.shape != p.shape or not value.is_floating_point():
                    found = "missing" if value is None else f"{getattr(value, 'dtype', type(value))} of shape "
                    found += "" if value is None else str(tuple(getattr(value, "shape", ())))
                    raise ValueError(
                        f"the state dict's {state_key!r} for parameter {name} is {found}, expected a real "
                        f"floating-point tensor of shape {tuple(p.shape)}; load a checkpoint of the same model"
                    )
                copies.append((p, state_key, value))
    return copies


def pack(param_groups: list[dict[str, Any]], state: dict[Any, Any]) -> dict[str, Any]:
    """torch.optim's state-dict layout (without its hooks, which ``BB.state_dict`` runs around the whole dict):
    each parameter as its index in group order, the state keyed by that index. A key of ``state`` that is not a
    tensor (what a state-dict pre hook may add) is kept as it is, as torch.optim keeps it."""
    index: dict[int, int] = {}
    groups = []
    for group in param_groups:
        packed = {key: value for key, value in group.items() if key != "params"}
        packed["params"] = [index.setdefault(id(p), len(index)) for p in group["params"]]
        groups.append(packed)
    packed_state = {(index[id(key)] if isinstance(key, torch.Tensor) else key): value for key, value in state.items()}
    return {"state": packed_state, "param_groups": groups}


def saved_steps_per_epoch(state_dict: dict[str, Any]) -> int | None:
    """The ``steps_per_epoch`` a ``BB.state_dict()`` was saved with (None: epochs ended by ``end_epoch()``);
    raises ValueError when ``state_dict`` is not one."""
    return read_bb(state_dict)["steps_per_epoch"]
