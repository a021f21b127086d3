"""Runs of flat buffers: the buffers of several parameter groups on one (device, dtype) allocated end to end, so a
backend whose step reads the weight decay from a per-block table updates them all with one launch, and runs each
epoch-end pass over them with one.

Each group's buffer starts on a multiple of the backend's block, so one weight decay per block is exact; the
padding between buffers is zero in every field and stays zero under the update. Only the constructor's groups of
plain tensors form runs: a group added later (``add_param_group``) and DTensor shards keep buffers of their own, and
a copy of the optimizer (deepcopy, pickle) allocates each buffer anew, so its buffers take one launch each.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .buffers import FlatBuffer, allocate_fields


class BufferRun:
    """The buffers of one (device, dtype) across groups, in group order, as slices of one allocation per field.

    ``param``, ``grad``, ``prev_params``, ``ema``, ``prev_ema``, ``momentum`` (None without momentum) and
    ``second_moment`` (None without a preconditioner) are the whole run's tensors, laid out as a flat buffer's, so a
    backend's passes take the run where they take a :class:`FlatBuffer`.
    """

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        numels: Sequence[int],
        block: int,
        momentum: bool,
        second_moment: bool = False,
    ) -> None:
        self.device, self.dtype = device, dtype
        self.numels = list(numels)
        self.blocks = [-(-n // block) for n in self.numels]  # each member's blocks
        self.starts = [block * sum(self.blocks[:member]) for member in range(len(self.numels))]
        self.numel = block * sum(self.blocks)
        self.fields = allocate_fields(self.numel, dtype, device, momentum, second_moment)
        self.param, self.grad, self.prev_params = self.fields["param"], self.fields["grad"], self.fields["prev_params"]
        self.ema, self.prev_ema = self.fields["ema"], self.fields["prev_ema"]
        self.momentum = self.fields.get("momentum")
        self.second_moment = self.fields.get("second_moment")
        self.buffers: list[FlatBuffer] = []  # filled by next_storage's callers, in member order
        self._weight_decays: tuple[float, ...] | None = None
        self._table = torch.zeros(sum(self.blocks), dtype=torch.float64, device=device)

    def next_storage(self) -> dict[str, torch.Tensor]:
        """The slices of every field for the next member buffer (the one built after the last appended)."""
        member = len(self.buffers)
        if member >= len(self.numels):
            raise RuntimeError(f"buffer run on {self.device} ({self.dtype}) has only {len(self.numels)} members")
        start, numel = self.starts[member], self.numels[member]
        return {name: tensor[start : start + numel] for name, tensor in self.fields.items()}

    def weight_decay_table(self, weight_decays: Sequence[float]) -> torch.Tensor:
        """float64 (blocks,) on the run's device: each block's group's weight decay (``weight_decays``: per group).
        Written in place when the groups' values change, so a captured step reads the current table."""
        values = tuple(float(weight_decays[buffer.group_index]) for buffer in self.buffers)
        if values != self._weight_decays:
            per_block = torch.repeat_interleave(torch.tensor(values, dtype=torch.float64), torch.tensor(self.blocks))
            self._table.copy_(per_block)
            self._weight_decays = values
        return self._table


def plan_runs(
    kinds: Sequence[dict[tuple[torch.device, torch.dtype], int | None]],
    blocks: dict[torch.device, int | None],
    momentum: bool,
    second_moment: bool = False,
) -> dict[tuple[torch.device, torch.dtype], BufferRun]:
    """The runs for groups whose buffers would be ``kinds`` (per group: (device, dtype) → planned length, None for
    DTensor shards): one per (device, dtype) that two or more groups share, on a device whose backend steps by
    blocks (``blocks``: its block, or None)."""
    numels: dict[tuple[torch.device, torch.dtype], list[int | None]] = {}
    for group in kinds:
        for kind, numel in group.items():
            numels.setdefault(kind, []).append(numel)
    runs = {}
    for (device, dtype), members in numels.items():
        block = blocks.get(device)
        if block is None or len(members) < 2 or any(n is None for n in members):
            continue
        runs[(device, dtype)] = BufferRun(device, dtype, [int(n) for n in members], block, momentum, second_moment)
    return runs
