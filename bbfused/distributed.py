"""What BB needs from torch.distributed: ranks that end their epochs together over the same parameter groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .sharded import WHAT_WORKS

# Fingerprint of a rank's group sizes: a polynomial hash modulo a Mersenne prime, the same on every rank (Python's
# hash() of a tuple would do for ints, but this says what is compared).
_PRIME = 2**61 - 1
_BASE = 1_000_003


def _fingerprint(group_numels: list[int]) -> int:
    value = 0
    for numel in group_numels:
        value = (value * _BASE + numel + 1) % _PRIME
    return value


def check_ranks_agree(steps_per_epoch: int | None, param_groups: list[dict[str, Any]], device: torch.device) -> None:
    """Under an initialized default process group, raise on every rank unless all ranks have the same
    ``steps_per_epoch`` and parameter groups of the same sizes. One all-gather and a host sync; BB calls it at its
    first step and at the first step after an ``add_param_group``, which every rank must call alike.

    Ranks that end their epochs at different steps drift apart (each sets its own rate) or, with the rate control's
    epoch-end all-reduce, wait in collectives the others never call. Ranks whose groups differ (a group added on some
    ranks only, or other parameters in it) update different parameters: their models drift apart silently.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    group_numels = [sum(p.numel() for p in group["params"]) for group in param_groups]
    steps = 0 if steps_per_epoch is None else steps_per_epoch
    mine = torch.tensor(
        [steps, len(group_numels), sum(group_numels), _fingerprint(group_numels)], dtype=torch.int64, device=device
    )
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    values = [tuple(int(v) for v in t) for t in gathered]
    if len({v[0] for v in values}) > 1:
        found = _by_rank([v[0] for v in values], lambda steps: "None" if steps == 0 else str(steps))
        raise RuntimeError(
            f"bbfused.BB: steps_per_epoch differs between the ranks of torch.distributed ({found}). The ranks must "
            f"end their epochs together, or they set different rates and wait in each other's collectives. Give "
            f"every rank the same steps_per_epoch, e.g. len(loader) of a DataLoader over a DistributedSampler (which "
            f"gives every rank as many samples; with your own sharding, drop the extra batches so the counts match)"
        )
    if len({v[1:] for v in values}) > 1:
        found = _by_rank([v[1:] for v in values], lambda v: f"{v[0]} groups of {v[1]} elements in all")
        if len({v[1:3] for v in values}) == 1:
            found += ", with different sizes per group"
        raise RuntimeError(
            f"bbfused.BB: the parameter groups differ between the ranks of torch.distributed ({found}). Every rank "
            f"must build BB with the same groups and add the same groups (add_param_group) at the same step, or "
            f"the ranks update different parameters and their models drift apart"
        )


def check_not_flattened(p: torch.Tensor, where: str) -> None:
    """Raise unless ``p`` is a parameter of its own: BB refuses the flat parameters of FSDP1 (a ``FlatParameter``, or
    a view into one). DTensors (FSDP2) are checked by ``bbfused.sharded``."""
    if not (getattr(p, "_fsdp_flattened", False) or getattr(p, "_is_flat_param", False)):
        return
    raise TypeError(
        f"{where} is flattened by FSDP (torch.distributed.fsdp.FullyShardedDataParallel: a FlatParameter with "
        f"use_orig_params=False, a view into one with use_orig_params=True). bbfused.BB does not support FSDP1's "
        f"flat parameters: its epoch-end sums (the rate estimate's ‖Δθ‖² and Δθᵀy) and its divergence tests "
        f"would run on each rank's shard only, so the ranks would pick different rates and roll back different "
        f"parts of the model. {WHAT_WORKS}"
    )


def _by_rank(values: list, describe: Callable[[Any], str]) -> str:
    """``values`` (one per rank) as "value on ranks 0, 2; other on rank 1"."""
    ranks: dict = {}
    for rank, value in enumerate(values):
        ranks.setdefault(value, []).append(rank)
    parts = []
    for value, r in ranks.items():
        listed = ", ".join(map(str, r[:8])) + (", ..." if len(r) > 8 else "")
        parts.append(f"{describe(value)} on rank{'s' if len(r) > 1 else ''} {listed}")
    return "; ".join(parts)
