"""DTensor parameters (FSDP2's ``fully_shard``, ``distribute_tensor``): what BB packs of them and what it reduces.

A flat buffer holds each rank's local shard. Under FSDP2 the shard's slot in the buffer is FSDP2's padded shard, and
FSDP2's all-gather source (``FSDPParam._sharded_param_data``) is pointed at it, so FSDP2 reads the weights BB
writes with no copy; its reduce-scatter adds each gradient into the flat gradient buffer in place. The epoch-end
sums over the buffers are all-reduced over the mesh (:func:`reduce_sums`), so every rank decides as one process
over the whole model would; the per-parameter state is sharded like its parameter (:func:`like_param`).

Supported: every parameter a DTensor with one ``Shard`` placement on one 1-D mesh over all ranks (FSDP2, also with
uneven shards). Refused: Replicate or Partial placements and meshes of more dimensions (tensor parallelism, HSDP),
whose values live on several ranks, and DTensors mixed with plain tensors: their sums cannot be added once.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch

# What works, named by every refusal of a sharded parameter.
WHAT_WORKS = (
    "What works: FSDP2 (torch.distributed.fsdp.fully_shard on every module that holds parameters, the root "
    "included, over a 1-D mesh of all ranks), DistributedDataParallel, or a single process"
)


def is_dtensor(t: torch.Tensor) -> bool:
    module = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists (nor its import cost)
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, a plain tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


def check_param(p: torch.Tensor, where: str) -> None:
    """Raise TypeError unless ``p`` is a plain tensor or a DTensor BB can pack: one ``Shard`` placement on a 1-D mesh
    over every rank of the default process group, a plain local tensor."""
    if not is_dtensor(p):
        return
    mesh, placements = p.device_mesh, tuple(p.placements)
    reason = None
    if mesh.ndim != 1 or not placements[0].is_shard():
        reason = (
            "its values are held by several ranks (a Replicate or Partial placement, or a mesh of several "
            "dimensions: tensor parallelism, HSDP), so BB's epoch-end sums, all-reduced over the mesh, would count "
            "them more than once"
        )
    elif mesh.size() != _world_size():
        reason = (
            f"its mesh spans {mesh.size()} of the {_world_size()} ranks; BB all-reduces its sums over the mesh "
            f"and the losses over all ranks, which must be the same ranks"
        )
    elif type(p._local_tensor) is not torch.Tensor:
        reason = f"its local shard is a {type(p._local_tensor).__name__}, not a plain tensor BB can pack"
    if reason is not None:
        raise TypeError(
            f"{where} is a DTensor with placements {list(placements)} on a mesh of shape {tuple(mesh.shape)}: "
            f"bbfused.BB cannot take it: {reason}. {WHAT_WORKS}"
        )


def check_params_alike(params: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Raise TypeError unless the parameters are all plain or all DTensors on one mesh (checked one by one by
    :func:`check_param`): BB all-reduces the sums of every buffer over that mesh, or of none."""
    dtensors = [i for i, p in enumerate(params) if is_dtensor(p)]
    if not dtensors:
        return
    first = dtensors[0]
    plain = next((i for i, p in enumerate(params) if not is_dtensor(p)), None)
    if plain is not None:
        raise TypeError(
            f"parameter {names[plain]} is a plain tensor and parameter {names[first]} a DTensor: bbfused.BB "
            f"all-reduces its epoch-end sums over the DTensors' mesh, which would count a plain tensor, held whole "
            f"by every rank, once per rank. Shard every module that holds parameters (fully_shard the root module "
            f"too). {WHAT_WORKS}"
        )
    other = next((i for i in dtensors if params[i].device_mesh != params[first].device_mesh), None)
    if other is not None:
        raise TypeError(
            f"parameters {names[first]} and {names[other]} are DTensors on different meshes; bbfused.BB reduces its "
            f"epoch-end sums over one mesh. Shard them over the same mesh, or give each its own optimizer"
        )


def shard_group(params: Iterable[torch.Tensor]) -> Any:
    """The process group the sums over these parameters are all-reduced over; None for plain tensors."""
    for p in params:
        if is_dtensor(p):
            return p.device_mesh.get_group()
    return None


def reduce_sums(sums: torch.Tensor, buffers: Iterable[Any]) -> torch.Tensor:
    """``sums`` (added over ``buffers``, each a FlatBuffer) summed over the ranks that share the buffers' sharded
    parameters, as a new tensor (``sums`` may be a pass result kept for a repeated epoch end): each rank added its
    shards only. ``sums`` itself for plain parameters. A collective: every rank calls it at the same point."""
    group = next((b.shard_group for b in buffers if b.shard_group is not None), None)
    if group is None:
        return sums
    total = sums.clone()
    torch.distributed.all_reduce(total, group=group)
    return total


def check_grad_like(grad: torch.Tensor, p: torch.Tensor, name: str) -> None:
    """Raise unless a gradient assigned to ``p`` is sharded as ``p`` is (both plain, or DTensors placed alike)."""
    if is_dtensor(grad) == is_dtensor(p) and (not is_dtensor(p) or grad.placements == p.placements):
        return
    raise RuntimeError(
        f"parameter {name} was given a gradient that is {_kind(grad)}, expected {_kind(p)} like the parameter; "
        f"assign gradients sharded as their parameters"
    )


def _kind(t: torch.Tensor) -> str:
    return f"a DTensor with placements {list(t.placements)}" if is_dtensor(t) else "a plain tensor"


def like_param(p: torch.Tensor, local_tensor: torch.Tensor) -> torch.Tensor:
    """``local_tensor`` (this rank's part of something shaped like ``p``) as ``p`` is: a DTensor with ``p``'s mesh and
    placements when ``p`` is one, sharing ``local_tensor``'s memory."""
    if not is_dtensor(p):
        return local_tensor
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        return DTensor.from_local(
            local_tensor, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )


class ShardSlot:
    """Where a DTensor parameter's shard lives: its local shape, and the shape of its slot in a flat buffer (FSDP2's
    padded shard, whose zero tail evens out uneven shards; else the local shape)."""

    def __init__(self, p: torch.Tensor, fsdp_params: dict[int, Any]) -> None:
        self.local_shape = local(p).shape
        self.fsdp_param = fsdp_params.get(id(p))
        self.padded_shape = self.local_shape if self.fsdp_param is None else self.fsdp_param.padded_sharded_param_size
        self.shard_dim = p.placements[0].dim if is_dtensor(p) else 0

    def attach(self, p: torch.Tensor, padded: torch.Tensor) -> torch.Tensor:
        """Make ``padded`` (the slot, in the flat buffer) hold ``p``'s shard: its local tensor and, under FSDP2, the
        all-gather source. Returns the local tensor."""
        shard = padded.narrow(self.shard_dim, 0, self.local_shape[self.shard_dim])
        p._local_tensor = shard
        if self.fsdp_param is not None:
            # FSDP2 keeps this alias when it re-checks its shards (reset_sharded_param: the same storage).
            self.fsdp_param._sharded_param_data = padded.view(-1)
        return shard

    def reads(self, p: torch.Tensor, slot_address: int) -> bool:
        """Whether FSDP2 still all-gathers ``p`` from its slot, which starts at ``slot_address`` (it re-allocates its
        shard on ``model.to()`` or a load with ``assign=True``)."""
        if self.fsdp_param is None:
            return True
        source = self.fsdp_param._sharded_param_data
        return self.fsdp_param.sharded_param is p and source.data_ptr() == slot_address


def fsdp_params() -> dict[int, Any]:
    """FSDP2's per-parameter records (``FSDPParam``), by ``id()`` of the sharded parameter, over every module that
    ``fully_shard`` has wrapped in this process."""
    if "torch.distributed._composable_state" not in sys.modules:
        return {}
    from torch.distributed._composable_state import _module_state_mapping

    found = {}
    for state in list(_module_state_mapping.values()):
        state = state() if isinstance(state, weakref.ref) else state
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # older torch: one group per module
            group = getattr(state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        for group in groups:
            for fsdp_param in group.fsdp_params:
                found[id(fsdp_param.sharded_param)] = fsdp_param
    return found


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
