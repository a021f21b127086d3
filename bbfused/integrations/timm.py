"""BB in timm's optimizer factory: after ``register()``, ``timm.optim.create_optimizer_v2(model, opt="bb", lr=...,
weight_decay=..., steps_per_epoch=...)`` builds BB with timm's parameter groups (no weight decay on biases and
norms)."""

from __future__ import annotations

from typing import Any

from timm.optim import OptimInfo, get_optimizer_info, list_optimizers
from timm.optim._optim_factory import default_registry

from ..optimizer import BB


def _bb(params: Any, foreach: bool | None = None, **kwargs: Any) -> BB:
    """BB from timm's arguments. ``foreach`` is a speed hint BB has no use for (its step is one fused pass)."""
    groups = list(params)
    if groups and isinstance(groups[0], dict):
        scaled = [g for g in groups if g.get("lr_scale", 1.0) != 1.0]
        if scaled:
            raise ValueError(
                "BB uses one global learning rate, so timm's layer-wise rate decay (layer_decay=...) cannot apply; "
                "leave layer_decay out"
            )
        # timm makes a no-decay group even when a model has no 1-d parameter; BB refuses empty groups.
        groups = [{k: v for k, v in g.items() if k != "lr_scale"} for g in groups if list(g["params"])]
    return BB(groups, **kwargs)


def register(name: str = "bb") -> None:
    """Register BB in timm's optimizer registry under ``name`` (idempotent)."""
    if name in list_optimizers() and get_optimizer_info(name).opt_class is _bb:
        return
    default_registry.register(
        OptimInfo(
            name=name,
            opt_class=_bb,
            description="SGD with the Barzilai-Borwein learning rate, set once per epoch (bbfused)",
            has_eps=False,
            has_momentum=False,
            has_betas=False,
        )
    )
