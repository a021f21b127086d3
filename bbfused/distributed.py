"""What BB needs from torch.distributed: ranks that end their epochs together."""

from __future__ import annotations

import torch


def check_steps_per_epoch_agree(steps_per_epoch: int | None, device: torch.device) -> None:
    """Under an initialized default process group, raise on every rank unless all ranks have the same
    ``steps_per_epoch`` (one all-gather and a host sync; BB calls it once, at its first step).

    Ranks that end their epochs at different steps drift apart (each sets its own rate) or, with the rate control's
    epoch-end all-reduce, wait in collectives the others never call.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = torch.tensor([0 if steps_per_epoch is None else steps_per_epoch], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    values = [int(t) for t in gathered]
    if len(set(values)) == 1:
        return
    ranks: dict[int, list[int]] = {}
    for rank, value in enumerate(values):
        ranks.setdefault(value, []).append(rank)
    found = "; ".join(
        f"{'None' if value == 0 else value} on rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r[:8]))}"
        f"{', ...' if len(r) > 8 else ''}"
        for value, r in ranks.items()
    )
    raise RuntimeError(
        f"bbfused.BB: steps_per_epoch differs between the ranks of torch.distributed ({found}). The ranks must end "
        f"their epochs together, or they set different rates and wait in each other's collectives. Give every rank "
        f"the same steps_per_epoch, e.g. len(loader) of a DataLoader over a DistributedSampler (which gives every "
        f"rank as many samples; with your own sharding, drop the extra batches so the counts match)"
    )
