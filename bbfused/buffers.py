"""Flat multi-tensor buffers: the parameters of one group on one (device, dtype), packed end to end.

Every parameter's ``.data`` and ``.grad`` become aliases of a slice of a flat 1-D buffer, so a fused backend
updates all of them with one launch per buffer (or per run of buffers, ``bbfused.buffer_runs``). The optimizer state
(EMA, the two epoch-end snapshots and, with momentum, the momentum buffer; with a preconditioner, the second moment)
lives in flat buffers with the same layout.
Each slice starts on a 16-element boundary (aligned vector loads); the padding between slices is zero in every buffer
and stays zero under the update.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import torch

from . import sharded
from .checkpoint import MOMENTUM_KEY, SECOND_MOMENT_KEY, STATE_KEYS
from .diagnostics import warn

ALIGNMENT = 16  # elements; every slice starts at a multiple of this


# A flat buffer's tensors: those in the parameter dtype, then those in the state dtype (momentum only with momentum,
# the second moment only with a preconditioner).
PARAM_FIELDS = ("param", "grad", "prev_params")
STATE_FIELDS = ("ema", "prev_ema")
OPTIONAL_FIELDS = ("momentum", "second_moment")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the EMA and of the arithmetic: float64 for float64 parameters, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def allocate_fields(
    numel: int, dtype: torch.dtype, device: torch.device, momentum: bool, second_moment: bool = False
) -> dict[str, torch.Tensor]:
    """Zeroed flat tensors of ``numel`` elements for every field of a buffer of ``dtype`` parameters."""
    fields = {name: torch.zeros(numel, dtype=dtype, device=device) for name in PARAM_FIELDS}
    optional = dict(zip(OPTIONAL_FIELDS, (momentum, second_moment)))
    state_fields = STATE_FIELDS + tuple(name for name, wanted in optional.items() if wanted)
    fields |= {name: torch.zeros(numel, dtype=state_dtype(dtype), device=device) for name in state_fields}
    return fields


def _packed(sizes: list[int]) -> tuple[list[int], int]:
    """Where each of slices of ``sizes`` elements starts when packed end to end on ALIGNMENT boundaries, and the
    packed length."""
    offsets, numel = [], 0
    for size in sizes:
        offsets.append(numel)
        numel = _aligned(numel + size)
    return offsets, numel


def planned_numel(params: list[torch.Tensor]) -> int | None:
    """The length of the flat buffer that ``params`` would make; None for DTensors (their slots are laid out by
    FSDP2)."""
    if any(sharded.is_dtensor(p) for p in params):
        return None
    return _packed([p.numel() for p in params])[1]


def _layout_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """The tensor's strides when it is dense (contiguous, channels_last, any permutation), else contiguous."""
    # empty_like preserves the strides of a non-overlapping dense tensor and falls back to contiguous.
    return torch.empty_like(tensor, device="meta").stride()


def _slice_strides(p: torch.Tensor, slot: sharded.ShardSlot | None) -> tuple[int, ...]:
    """The strides of parameter ``p``'s slice in a flat buffer: its layout's, a DTensor's local shard's; FSDP2's
    padded shard is contiguous."""
    if slot is None:
        return _layout_strides(p)
    if slot.padded_shape != slot.local_shape:
        return torch.empty(slot.padded_shape, device="meta").stride()
    return _layout_strides(sharded.local(p))


def _alias(flat: torch.Tensor, offset: int, size: torch.Size, stride: tuple[int, ...]) -> torch.Tensor:
    """A dense tensor over elements ``[offset, offset + numel)`` of ``flat``, on a storage of its own.

    The storage is a slice of ``flat``'s (same memory, keeps ``flat`` alive) covering exactly these elements, so
    ``torch.save`` and safetensors see one parameter's bytes, not the whole buffer. Unlike an autograd view it has
    a version counter of its own: it counts only the in-place writes to this slice, which tells which gradients
    were written since ``zero_grad``.
    """
    itemsize = flat.element_size()
    start = (flat.storage_offset() + offset) * itemsize
    storage = flat.untyped_storage()[start : start + size.numel() * itemsize]
    alias = torch.empty(0, dtype=flat.dtype, device=flat.device)
    return alias.set_(storage, 0, size, stride)


def _address(t: torch.Tensor) -> int:
    """Where ``t`` starts in memory; unlike ``data_ptr()`` also for an empty tensor (an empty shard of a DTensor)."""
    return t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()


def _mark_written(buffer_ref: weakref.ref, index: int, param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: parameter ``index`` of the buffer received a gradient from backward."""
    buffer = buffer_ref()
    if buffer is not None:
        buffer.written[index] = True


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        if handle is not None:
            handle.remove()


class GradientReplacedWarning(UserWarning):
    """A parameter's .grad was replaced by another tensor and had to be copied back into the flat buffer."""


class FlatBuffer:
    """The parameters of one group on one (device, dtype) and their optimizer state, as flat buffers.

    Buffers (all 1-D, ``numel`` elements): ``param`` and ``grad`` in the parameter dtype, ``ema`` and
    ``prev_ema`` in ``state_dtype(dtype)``, ``prev_params`` in the parameter dtype; with ``momentum``, the
    momentum buffer ``momentum`` in ``state_dtype(dtype)`` (else None), and with ``second_moment`` the
    preconditioner's ``second_moment`` likewise. ``offsets[i]`` is where parameter i's slice starts.

    A DTensor parameter (``bbfused.sharded``) contributes its local shard: its slice is the shard's slot
    (``shapes[i]``, FSDP2's padded shard) and its gradient and state views are DTensors shaped like it.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        names: list[str],
        group_index: int,
        momentum: bool = False,
        storage: dict[str, torch.Tensor] | None = None,
        second_moment: bool = False,
    ) -> None:
        """``storage``: the buffers (:func:`allocate_fields`, :func:`planned_numel` elements) when they are slices of
        a larger allocation (``bbfused.buffer_runs``); by default each is allocated here."""
        self.params = params
        self.names = names
        self.group_index = group_index
        self.device = params[0].device
        self.dtype = params[0].dtype
        fsdp_params = sharded.fsdp_params() if any(sharded.is_dtensor(p) for p in params) else {}
        self.slots = [sharded.ShardSlot(p, fsdp_params) if sharded.is_dtensor(p) else None for p in params]
        self.shard_group = sharded.shard_group(params)
        # Each parameter's slice: its shape (a DTensor's: its slot's) and strides.
        self.shapes = [p.shape if slot is None else slot.padded_shape for p, slot in zip(params, self.slots)]
        self.strides = [_slice_strides(p, slot) for p, slot in zip(params, self.slots)]
        self.offsets, numel = _packed([shape.numel() for shape in self.shapes])
        self.numel = numel
        if storage is None:
            storage = allocate_fields(numel, self.dtype, self.device, momentum, second_moment)
        self.param, self.grad, self.prev_params = storage["param"], storage["grad"], storage["prev_params"]
        self.ema, self.prev_ema = storage["ema"], storage["prev_ema"]
        self.momentum = storage["momentum"] if momentum else None
        self.second_moment = storage["second_moment"] if second_moment else None
        self.grad_views: list[torch.Tensor] = []  # what p.grad is (for a DTensor: one over grad_locals[i])
        self.grad_locals: list[torch.Tensor] = []  # the plain tensor over the buffer under each
        # written[i]: parameter i got a gradient since the last zero_grad, from backward (a hook) or by
        # assigning p.grad. zeroed_versions[i]: its gradient view's version then, to see in-place writes.
        # Parameters with neither are skipped by the step, as torch.optim skips None gradients.
        self.written = [p.grad is not None for p in params]
        with torch.no_grad():
            for i, p in enumerate(params):
                data = self._slice_alias(self.param, i)
                if self.slots[i] is None:
                    data.copy_(p.data)
                    p.data = data
                else:
                    shard = self._local(data, i)
                    shard.copy_(sharded.local(p))
                    self.slots[i].attach(p, data)
                grad = self._local(self._slice_alias(self.grad, i), i)
                if p.grad is not None:
                    grad.copy_(sharded.local(p.grad))
                view = sharded.like_param(p, grad)
                p.grad = view
                self.grad_views.append(view)
                self.grad_locals.append(sharded.local(view))
        self.zeroed_versions = [local._version for local in self.grad_locals]
        self.data_ptrs = [_address(sharded.local(p)) for p in params]
        # Where each gradient view points: `p.grad.data = t` keeps the view object but moves it off the buffer.
        self.grad_ptrs = [_address(local) for local in self.grad_locals]
        self._hooks: list = [None] * len(params)
        weakref.finalize(self, _remove_hooks, self._hooks)
        self.register_hooks()

    def __getstate__(self) -> dict[str, Any]:
        """What a copy (``copy.deepcopy``, pickle) needs: the parameters, copied along with their model, and the
        state. The parameter buffer, the views and the hooks are rebuilt around the copied parameters."""
        in_place = [local._version != version for local, version in zip(self.grad_locals, self.zeroed_versions)]
        state = {name: getattr(self, name) for name in ("params", "names", "group_index", "written")}
        state.update({name: getattr(self, name) for name in self._state_buffers()})
        return state | {"grad": self.grad, "written_in_place": in_place}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copied Parameter holds its own values (deepcopy clones them, pickle restores them): pack those afresh.
        # A state without "momentum" ("second_moment") comes from a buffer without one.
        self.__init__(
            state["params"],
            state["names"],
            state["group_index"],
            momentum="momentum" in state,
            second_moment="second_moment" in state,
        )
        with torch.no_grad():
            for name in ("grad", *self._state_buffers()):
                getattr(self, name).copy_(state[name])
        self.written = list(state["written"])
        # An in-place write to a gradient since zero_grad is told by its view's version: keep that difference.
        self.zeroed_versions = [
            local._version - int(written) for local, written in zip(self.grad_locals, state["written_in_place"])
        ]

    def register_hooks(self) -> list[int]:
        """Hook every parameter that requires grad and has no hook yet; returns the indices hooked now.

        Parameters frozen at construction (requires_grad=False) cannot take a hook; they get one here
        once they are unfrozen.
        """
        hooked = []
        for i, p in enumerate(self.params):
            if self._hooks[i] is None and p.requires_grad:
                self._hooks[i] = p.register_post_accumulate_grad_hook(
                    functools.partial(_mark_written, weakref.ref(self), i)
                )
                hooked.append(i)
        return hooked

    def view(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """Parameter ``index``'s slice of ``flat``, shaped and strided like the parameter (a DTensor's: like its
        local shard)."""
        offset = self.offsets[index]
        sliced = flat[offset : offset + self.shapes[index].numel()].as_strided(self.shapes[index], self.strides[index])
        return self._local(sliced, index)

    def _slice_alias(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """Parameter ``index``'s whole slice of ``flat`` (a DTensor's slot), on a storage of its own (``_alias``)."""
        return _alias(flat, self.offsets[index], self.shapes[index], self.strides[index])

    def _local(self, sliced: torch.Tensor, index: int) -> torch.Tensor:
        """The part of parameter ``index``'s slice its values fill: all of it but a DTensor slot's padding."""
        slot = self.slots[index]
        if slot is None:
            return sliced
        return sliced.narrow(slot.shard_dim, 0, slot.local_shape[slot.shard_dim])

    def check(self) -> None:
        """Raise if a parameter was re-allocated or holds a sparse gradient. Writes nothing."""
        for i, (p, ptr, name) in enumerate(zip(self.params, self.data_ptrs, self.names)):
            # The buffer keeps the old storage alive, so a re-allocated parameter always has a new address.
            slot = self.slots[i]
            if _address(sharded.local(p)) != ptr or not (slot is None or slot.reads(p, ptr)):
                raise RuntimeError(
                    f"parameter {name} was re-allocated after the BB optimizer was built (for example by "
                    f"model.to(), .half(), assigning .data or, under FSDP2, load_state_dict(assign=True)): its "
                    f"values no longer live in the optimizer's buffer. Move or convert the model first, then "
                    f"construct the optimizer; to load new values, copy them in place instead of assigning .data "
                    f"(with torch.no_grad(): p.copy_(values))."
                )
            grad = p.grad
            if grad is not None and grad.is_sparse:
                raise TypeError(
                    f"parameter {name} has a sparse gradient, which BB does not support; use dense "
                    f"gradients (e.g. nn.Embedding(sparse=False))."
                )

    def _repoint(self, index: int) -> None:
        """Point gradient view ``index`` back at its slice of the buffer (after ``p.grad.data = t``)."""
        local = self.grad_locals[index]
        if _address(local) != self.grad_ptrs[index] or local.shape != sharded.local(self.params[index]).shape:
            with torch.no_grad():
                slice_alias = self._slice_alias(self.grad, index)
                if self.slots[index] is None:
                    local.set_(slice_alias)
                else:  # a slot's narrowed part is not a storage of its own: point the DTensor at a new tensor
                    self.grad_locals[index] = self.grad_views[index]._local_tensor = self._local(slice_alias, index)

    def adopt_replaced_gradients(self) -> bool:
        """Copy gradients that replaced the flat views back into the buffer and restore the views.

        Both forms count: ``p.grad = t`` (a new tensor) and ``p.grad.data = t`` (the view's storage swapped).
        A gradient set to None leaves the slice zeroed and the parameter without a gradient in this step.
        Returns whether any gradient had been replaced.
        """
        replaced = False
        for i, (p, view) in enumerate(zip(self.params, self.grad_views)):
            grad = p.grad
            if grad is view and _address(self.grad_locals[i]) == self.grad_ptrs[i]:
                continue
            replaced = True
            if grad is None:
                self._repoint(i)
                self.grad_locals[i].zero_()
                self.zeroed_versions[i] = self.grad_locals[i]._version
                self.written[i] = False
            else:
                if grad.shape != p.shape:
                    raise RuntimeError(
                        f"parameter {self.names[i]} (shape {tuple(p.shape)}) has a gradient of shape "
                        f"{tuple(grad.shape)} (assigned through .grad.data); give it a gradient of the "
                        f"parameter's shape"
                    )
                sharded.check_grad_like(grad, p, self.names[i])
                with torch.no_grad():
                    self.view(self.grad, i).copy_(sharded.local(grad))
                self._repoint(i)
                self.written[i] = True
            p.grad = view
        return replaced

    def with_gradients(self, count_in_place_writes: bool) -> list[bool]:
        """Which parameters have a gradient in this step. ``count_in_place_writes``: a gradient written in place
        since zero_grad (``p.grad.copy_(...)``) counts too. GradScaler rewrites every gradient in place to look for
        infs, so under it only backward and assignment count. A parameter unfrozen since zero_grad has no hook yet:
        it counts."""
        for i in self.register_hooks():
            self.written[i] = True
        written = self.written
        if not all(written) and count_in_place_writes:
            written = [
                has_grad or view._version != version
                for has_grad, view, version in zip(written, self.grad_locals, self.zeroed_versions)
            ]
        return list(written)

    def ranges(self, stepped: list[bool], keys: list[int] | None = None) -> list[tuple[int, int]]:
        """Element ranges [start, end) covering the parameters ``stepped`` marks: the whole buffer when it marks
        every one (the usual case: one launch); otherwise one range per run of consecutive marked parameters (with
        equal ``keys``, when given), so frozen and unused ones stay untouched."""
        if all(stepped) and (keys is None or len(set(keys)) <= 1):
            return [(0, self.numel)]
        ranges: list[tuple[int, int]] = []
        for i, has_grad in enumerate(stepped):
            if not has_grad:
                continue
            end = self.offsets[i] + sharded.local(self.params[i]).numel()
            if i > 0 and stepped[i - 1] and (keys is None or keys[i] == keys[i - 1]):
                ranges[-1] = (ranges[-1][0], end)  # extends over the zero padding between the two slices
            else:
                ranges.append((self.offsets[i], end))
        return ranges

    def zero_grad(self, set_to_none: bool) -> None:
        """Zero the gradient buffer with one fill and restore replaced views.

        ``set_to_none=True`` marks every parameter as having no gradient until backward gives it one;
        ``False`` keeps a parameter that had a gradient marked as having one (now zero), as torch.optim's
        zeroed gradients are, and one without a gradient without one.
        """
        self.grad.zero_()
        for i, (p, view) in enumerate(zip(self.params, self.grad_views)):
            self._repoint(i)
            if p.grad is not view:
                p.grad = view
            # As torch.optim: set_to_none clears every gradient; without it, only existing ones stay (zeroed).
            self.written[i] = self.written[i] and not set_to_none
            self.zeroed_versions[i] = self.grad_locals[i]._version
        self.register_hooks()

    def _state_buffers(self) -> tuple[str, ...]:
        """The names of the optimizer-state buffers this one has."""
        optional = tuple(name for name in OPTIONAL_FIELDS if getattr(self, name) is not None)
        return ("ema", "prev_params", "prev_ema") + optional

    def state_views(self, index: int) -> dict[str, torch.Tensor]:
        """Parameter ``index``'s optimizer state as tensors shaped like the parameter (views, no copies), under the
        checkpoint's names (``bbfused.checkpoint``); a DTensor parameter's are DTensors sharded like it."""
        flats = {name: getattr(self, name) for name in STATE_KEYS}
        if self.momentum is not None:
            flats[MOMENTUM_KEY] = self.momentum
        if self.second_moment is not None:
            flats[SECOND_MOMENT_KEY] = self.second_moment
        if self.slots[index] is None:
            return {name: self.view(flat, index) for name, flat in flats.items()}
        # A DTensor over a view that starts inside its storage cannot be saved (torch.save raises "invalid python
        # storage"): its shard gets a storage of its own.
        p = self.params[index]
        return {
            name: sharded.like_param(p, self._local(self._slice_alias(flat, index), index))
            for name, flat in flats.items()
        }


def warn_replaced_gradients() -> None:
    warn(
        "bbfused.BB: a parameter's .grad was replaced by another tensor (model.zero_grad(set_to_none=True), "
        "assigning p.grad or p.grad.data, or DDP gradient_as_bucket_view=True), so it was copied into the "
        "optimizer's flat gradient buffer. This costs an extra copy per step: call optimizer.zero_grad() instead, "
        "write gradients in place (p.grad.copy_(t)) and keep DDP's gradient_as_bucket_view=False. This warning is "
        "shown once.",
        GradientReplacedWarning,
    )


def _extent(p: torch.Tensor) -> int:
    """How many elements of storage ``p`` spans, from its first element to its last (strides are >= 0)."""
    return 1 + sum((size - 1) * stride for size, stride in zip(p.shape, p.stride()))


def _element_offsets(p: torch.Tensor) -> torch.Tensor:
    """The storage offsets of ``p``'s elements, relative to its first element (int64, CPU)."""
    return torch.arange(_extent(p)).as_strided(p.shape, p.stride()).flatten()


def _overlaps_itself(p: torch.Tensor) -> bool:
    """Whether two elements of ``p`` share memory (an expanded tensor: a stride 0)."""
    dims = sorted((stride, size) for size, stride in zip(p.shape, p.stride()) if size > 1)
    extent = 0  # elements spanned by the dims with smaller strides
    if dims and dims[0][0] == 0:
        return True
    for stride, size in dims:
        if stride <= extent:
            # Maybe interleaved without overlap (e.g. strides (2, 3) over sizes (3, 2)): count exactly.
            return len(torch.unique(_element_offsets(p))) < p.numel()
        extent += (size - 1) * stride
    return False


def check_no_shared_memory(params: list[torch.Tensor], names: list[str]) -> None:
    """Raise ValueError when a parameter's elements share memory with each other (an expanded tensor) or with
    another parameter's (a view of it): packed into a flat buffer each copy would become an independent value,
    silently untying what the model ties. Parameters that only share a storage without overlapping (the views of
    a flat buffer a checkpoint was saved from) are fine."""
    spans: dict[torch.device, list[tuple[int, int, int]]] = {}
    params = [sharded.local(p) for p in params]  # a DTensor's memory is its shard's
    for index, p in enumerate(params):
        if p.numel() == 0:
            continue
        if _overlaps_itself(p):
            raise ValueError(
                f"parameter {names[index]} (shape {tuple(p.shape)}, strides {p.stride()}) has elements that share "
                f"memory (an expanded or broadcast tensor), which BB would update as independent values. Make it a "
                f"tensor of its own (p.data = p.data.clone()) before building BB, or keep the smaller tensor as the "
                f"parameter and expand it in forward()"
            )
        start = p.data_ptr()
        end = start + _extent(p) * p.element_size()
        # By device, not storage: two storages can cover the same memory (a storage slice, NumPy, DLPack).
        spans.setdefault(p.device, []).append((start, end, index))
    for storage_spans in spans.values():
        active: list[tuple[int, int]] = []  # (end, index) of the spans seen so far that may reach further
        for start, end, second in sorted(storage_spans):
            active = [(e, i) for e, i in active if e > start]
            first = next((i for _, i in active if _share_elements(params[i], params[second])), None)
            if first is not None:
                raise ValueError(
                    f"parameters {names[first]} and {names[second]} share memory (one is a view of the other, or "
                    f"both view one tensor): BB packs every parameter into its own flat buffer, which would untie "
                    f"them. Tie parameters by using one Parameter object in both places (e.g. "
                    f"decoder.weight = encoder.weight), or give each its own copy (p.data = p.data.clone()) before "
                    f"building BB"
                )
            active.append((end, second))


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors with overlapping address ranges have an element in common."""
    if a.element_size() != b.element_size() or (b.data_ptr() - a.data_ptr()) % a.element_size():
        return True  # reinterpreted bytes: treat any overlap as shared
    shift = (b.data_ptr() - a.data_ptr()) // a.element_size()
    return bool(torch.isin(_element_offsets(b) + shift, _element_offsets(a)).any())
