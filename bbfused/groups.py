"""Parameter groups as BB takes them: torch.optim's ``params`` argument checked, each group's parameters checked,
named for messages, and groups put into ``param_groups`` behind the optimizer's back noticed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .arguments import SUPPORTED_DTYPES, check_weight_decay, is_real
from .buffers import check_no_shared_memory
from .diagnostics import warn
from .distributed import check_not_flattened
from .sharded import check_param, check_params_alike


def as_groups(params: Any, first_index: int = 0) -> list[dict[str, Any]]:
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


def param_names(group: dict[str, Any], group_index: int) -> list[str]:
    """How messages name the group's parameters: by ``named_parameters()`` name when the group has them."""
    if "param_names" in group:
        return [repr(name) for name in group["param_names"]]
    return [f"param_groups[{group_index}]['params'][{i}]" for i in range(len(group["params"]))]


def warn_ignored_lrs(given: Iterable[Any], rate: float, added: bool = False) -> None:
    """Warn once for group lrs other than BB's global ``rate`` (None: not given); ``added``: by add_param_group."""
    ignored = [value for value in given if value is not None and not (is_real(value) and float(value) == rate)]
    if ignored and added:
        warn(
            f"bbfused.BB uses one global learning rate: the added group's lr {ignored[0]} is ignored (every group "
            f"uses BB's rate, now {rate})"
        )
    elif ignored:
        warn(
            f"bbfused.BB uses one global learning rate: the per-group lr {sorted(ignored)} is ignored "
            f"(lr={rate} is used for every group)"
        )


def check_group_dict(param_group: Any) -> None:
    """What ``add_param_group`` needs before anything else: a dict with a ``"params"`` entry."""
    if not isinstance(param_group, dict):
        raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
    if "params" not in param_group:
        raise ValueError("param_group must have a 'params' entry: {'params': [...], 'weight_decay': ...}")


def check_group(group: dict[str, Any], group_index: int) -> None:
    """Raise unless the group's options and parameters are ones BB can take; stores its ``weight_decay`` as a
    float."""
    group["weight_decay"] = check_weight_decay(group["weight_decay"], f" of param_groups[{group_index}]")
    for p, name in zip(group["params"], param_names(group, group_index)):
        check_not_flattened(p, f"parameter {name} (shape {tuple(p.shape)})")
        check_param(p, f"parameter {name} (shape {tuple(p.shape)})")
        where = f"parameter {name} (shape {tuple(p.shape)}, dtype {p.dtype}, device {p.device})"
        if p.dtype not in SUPPORTED_DTYPES:
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


def check_global_options(group: dict[str, Any], group_index: int, momentum: float, nesterov: bool) -> None:
    """Raise unless the group leaves torch.optim.SGD's per-group momentum options unset or at BB's global values:
    BB runs one momentum for every group, and a group's other value would be ignored."""
    wanted = {"momentum": momentum, "nesterov": nesterov, "dampening": 0.0}
    for key, value in wanted.items():
        if key in group and group[key] != value:
            fix = f"build BB with {key}={group[key]!r}" if key != "dampening" else "BB has no dampening"
            raise ValueError(
                f"param_groups[{group_index}] sets {key}={group[key]!r}, but BB applies one {key} to every group "
                f"({key}={value!r}); drop the group's {key!r}, or {fix} (a group dict another optimizer was built "
                f"from holds that optimizer's options: give BB new dicts)"
            )


def check_groups_apart(param_groups: list[dict[str, Any]]) -> None:
    """Raise unless no two parameters (of any groups) share memory, and they are all plain or all DTensors on one
    mesh."""
    params = [p for group in param_groups for p in group["params"]]
    names = [name for index, group in enumerate(param_groups) for name in param_names(group, index)]
    check_params_alike(params, names)
    check_no_shared_memory(params, names)


class PackedGroups:
    """Which groups BB has packed (the ``param_groups`` list and each group's parameters), so that groups appended
    to ``param_groups``, or found at its end after it was assigned a new list, are noticed and added as
    :meth:`BB.add_param_group` adds them. Lightning's BaseFinetuning, resuming a run, assigns ``param_groups`` a list
    rebuilt from its checkpoint: this optimizer's groups (new dicts over the same parameters) followed by the groups
    it added before."""

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        self.remember(param_groups)

    def remember(self, param_groups: list[dict[str, Any]]) -> None:
        self.groups_seen = param_groups
        self.params = [[id(p) for p in group["params"]] for group in param_groups]

    def added(self, param_groups: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """None when nothing changed (two host-side comparisons, every step); else the groups put in since, taken
        off the end of ``param_groups`` (the caller adds them back one by one)."""
        packed = len(self.params)
        if param_groups is self.groups_seen and len(param_groups) == packed:
            return None
        kept = [[id(p) for p in group["params"]] for group in param_groups[:packed]]
        if kept != self.params:
            raise RuntimeError(
                f"bbfused.BB: param_groups no longer starts with the {packed} groups whose parameters BB packed into "
                f"its buffers (a group was removed, reordered or given other parameters). Groups can only be added, "
                f"with add_param_group(); build a new optimizer for another set of parameters"
            )
        for index, group in enumerate(param_groups[:packed]):
            group["weight_decay"] = check_weight_decay(group.get("weight_decay"), f" of param_groups[{index}]")
        added = param_groups[packed:]
        del param_groups[packed:]
        self.groups_seen = param_groups
        return added

    def append(self, group: dict[str, Any]) -> None:
        self.params.append([id(p) for p in group["params"]])


def join_epoch(epoch: int, step_in_epoch: int) -> int:
    """The first epoch whose end's rate estimate includes a group added now: the first epoch end at which its
    snapshot of the previous epoch end and the EMA it compares with each cover a whole epoch."""
    if step_in_epoch > 0:
        return epoch + 2  # the EMA of the rest of this epoch is partial: its first full one is the next
    if epoch == 0:
        return 0  # before the first step: as a group passed to the constructor
    return epoch + 1
