"""Model buffers that a rollback restores (BatchNorm running statistics), packed into flat buffers.

Each tracked tensor keeps its Python identity, but its storage becomes a slice of one flat buffer per
(device, dtype), as the parameters' do (``bbfused.buffers``): the module goes on updating it in place, and an epoch
end saves or restores every tracked tensor of a kind with one ``Backend.epoch_commit`` over the flat buffer and its
snapshot, so the launches per epoch end do not grow with the number of tensors.

A tensor whose memory another tensor may see is left where it is and committed on its own (a few ops each): a view
(``t._base`` set), a tensor on a storage larger than itself, one overlapping another tracked tensor, or a tensor
subclass. Packing it would silently untie it from the tensors it shares memory with. A view of a packed tensor made
outside the tracked list (``self.half_mean = self.running_mean[:4]``) cannot be seen and is untied, as a view of a
parameter is by ``bbfused.buffers``.
"""

from __future__ import annotations

from typing import Any

import torch

from .backends import Backend
from .backends.eager import EagerBackend
from .buffers import _alias, _aligned, _extent, _layout_strides
from .devices import on

# The dtypes every backend's epoch_commit takes (the cpp kernels are built for these only); other dtypes, such as
# BatchNorm's int64 num_batches_tracked, are committed by the eager backend, which copies any dtype, except under
# the Triton backend, whose commit kernel only loads, selects and stores (one launch instead of two ops).
FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ANY_DTYPE_BACKENDS = ("triton",)
_EAGER = EagerBackend()


class _Pack:
    """The packed tensors of one (device, dtype): ``live`` is their memory, ``snapshot`` a copy with the same
    layout; tensor ``indices[i]`` of the tracked list lives at ``offsets[i]``."""

    def __init__(self, tensors: list[torch.Tensor], indices: list[int]) -> None:
        self.indices = indices
        self.device = tensors[0].device
        self.dtype = tensors[0].dtype
        self.offsets: list[int] = []
        numel = 0
        for t in tensors:
            self.offsets.append(numel)
            numel = _aligned(numel + t.numel())
        self.live = torch.zeros(numel, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for t, offset in zip(tensors, self.offsets):
                alias = _alias(self.live, offset, t.shape, _layout_strides(t))
                alias.copy_(t)
                t.data = alias
        self.snapshot = self.live.clone()

    def snapshot_view(self, tensor: torch.Tensor, position: int) -> torch.Tensor:
        offset = self.offsets[position]
        return self.snapshot[offset : offset + tensor.numel()].as_strided(tensor.shape, tensor.stride())


def _distinct(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``tensor`` without the repeats of ``like``'s expanded dimensions (stride 0): index 0 along each of them, so
    that every element left is a memory location of its own and can be written."""
    index = tuple(
        slice(0, 1) if stride == 0 and size > 1 else slice(None) for size, stride in zip(like.shape, like.stride())
    )
    return tensor[index]


def _shares_memory(tensors: list[torch.Tensor]) -> set[int]:
    """The indices of the tensors whose address range overlaps another's on the same device (or that appear twice)."""
    spans: dict[torch.device, list[tuple[int, int, int]]] = {}
    for index, t in enumerate(tensors):
        if type(t) is torch.Tensor and t.numel() and not t.is_meta:
            start = t.data_ptr()
            spans.setdefault(t.device, []).append((start, start + _extent(t) * t.element_size(), index))
    shared: set[int] = set()
    for device_spans in spans.values():
        reach, reaching = -1, -1  # the furthest end seen so far, and whose it is
        for start, end, index in sorted(device_spans):
            if start < reach:
                shared.update((index, reaching))
            if end > reach:
                reach, reaching = end, index
    return shared


def _packable(tensor: torch.Tensor) -> bool:
    """Whether the tensor's storage holds its elements and nothing else, and it is not a view. A tensor subclass
    (a DTensor's local shard lives inside it) stays loose."""
    return (
        type(tensor) is torch.Tensor
        and not tensor.is_meta
        and tensor._base is None
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        and _layout_strides(tensor) == tensor.stride()
    )


def _check_flag(name: str, flag: Any) -> None:
    if not isinstance(flag, torch.Tensor) or flag.dtype != torch.bool or flag.numel() != 1:
        got = f"{flag.dtype} of shape {tuple(flag.shape)}" if isinstance(flag, torch.Tensor) else type(flag).__name__
        raise ValueError(
            f"TrackedBuffers.commit: {name} must be a one-element bool tensor (read on the device), got {got}; pass "
            f"the rate control's flag tensor"
        )


class TrackedBuffers:
    """Tensors (a model's buffers) with a snapshot each, which ``commit`` takes again or restores.

    ``live``: the tracked tensors, the same objects, in the order given. The snapshot starts as their values now.
    """

    def __init__(self, tensors: list[torch.Tensor], names: list[str] | None = None) -> None:
        tensors = list(tensors)
        names = [f"buffer {i}" for i in range(len(tensors))] if names is None else list(names)
        if len(names) != len(tensors):
            raise ValueError(f"TrackedBuffers: {len(names)} names for {len(tensors)} tensors; give one name each")
        for t, name in zip(tensors, names):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"TrackedBuffers: {name} is a {type(t).__name__}, not a tensor")
            if t.layout != torch.strided:
                raise ValueError(
                    f"TrackedBuffers: {name} is a {t.layout} tensor; a rollback restores dense buffers only. Keep it "
                    f"dense (register it with .to_dense()) or do not track this model's buffers"
                )
        self.live = tensors
        self.names = names
        shared = _shares_memory(tensors)
        kinds: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        self._loose: list[int] = []
        for index, t in enumerate(tensors):
            if index in shared or not _packable(t):
                self._loose.append(index)
            else:
                kinds.setdefault((t.device, t.dtype), []).append(index)
        self._packs = [_Pack([tensors[i] for i in indices], indices) for indices in kinds.values()]
        # A loose tensor's snapshot holds each memory location once (an expanded tensor's first repeat).
        self._loose_snapshots = [_distinct(tensors[i], tensors[i]).detach().clone() for i in self._loose]

    def __len__(self) -> int:
        return len(self.live)

    @property
    def launch_groups(self) -> int:
        """How many commits an epoch end runs: one per (device, dtype) packed, one per tensor left loose."""
        return len(self._packs) + len(self._loose)

    def snapshot_views(self) -> list[torch.Tensor]:
        """The snapshots, shaped like the tracked tensors and in their order: views of the snapshot memory (clone
        them to keep the values; write them through :meth:`load_snapshots`)."""
        views: list[torch.Tensor | None] = [None] * len(self.live)
        for pack in self._packs:
            for position, index in enumerate(pack.indices):
                views[index] = pack.snapshot_view(self.live[index], position)
        for index, snapshot in zip(self._loose, self._loose_snapshots):
            views[index] = snapshot.expand(self.live[index].shape)
        return views

    def load_snapshots(self, values: list[torch.Tensor]) -> None:
        """Copy ``values`` (as :meth:`snapshot_views` gives them, on any device) into the snapshots; checks every
        value before writing any."""
        if len(values) != len(self.live) or any(v.shape != t.shape for v, t in zip(values, self.live)):
            raise ValueError(
                f"TrackedBuffers.load_snapshots: got {len(values)} values of shapes "
                f"{[tuple(v.shape) for v in values]} for {len(self.live)} tensors of shapes "
                f"{[tuple(t.shape) for t in self.live]}; pass one value per tracked tensor, in order"
            )
        views = self.snapshot_views()
        with torch.no_grad():
            for view, value, live in zip(views, values, self.live):
                _distinct(view, live).copy_(_distinct(value, live))

    def commit(
        self, rolled_back: torch.Tensor, gate: torch.Tensor | None, backends: dict[torch.device, Backend]
    ) -> None:
        """Snapshot ← live, or live ← snapshot when ``rolled_back`` (a bool 0-dim tensor, read on the device); with
        a ``gate`` (a bool 0-dim tensor: a device clock's epoch end) only where it is set. One ``epoch_commit`` per
        (device, dtype) through ``backends[device]`` (the eager backend for a dtype outside FUSED_DTYPES or a device
        without a backend), and one per loose tensor."""
        _check_flag("rolled_back", rolled_back)
        if gate is not None:
            _check_flag("gate", gate)
        flags: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

        def flags_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
            if device not in flags:
                flags[device] = (on(rolled_back, device), on(gate, device))
            return flags[device]

        for pack in self._packs:
            flag, enabled = flags_on(pack.device)
            backend = backends.get(pack.device, _EAGER)
            if pack.dtype not in FUSED_DTYPES and backend.name not in ANY_DTYPE_BACKENDS:
                backend = _EAGER
            backend.epoch_commit(pack.live, pack.snapshot, flag, enabled=enabled)
        with torch.no_grad():
            for index, snapshot in zip(self._loose, self._loose_snapshots):
                live = self.live[index]
                flag, enabled = flags_on(live.device)
                _EAGER.epoch_commit(_distinct(live, live), snapshot, flag, enabled=enabled)

    def __getstate__(self) -> dict[str, Any]:
        """What a copy needs: the tensors (copied along with their model) and the snapshot values; the packing is
        redone around the copied tensors, so that they alias the copy's flat buffers."""
        return {"live": self.live, "names": self.names, "snapshots": self.snapshot_views()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["live"], state["names"])
        self.load_snapshots(state["snapshots"])
