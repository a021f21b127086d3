"""The torch.distributed process group of a run under torchrun: joining it, leaving it after a success, and
aborting it after a failure so that the other processes stop within seconds instead of waiting in a collective."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .data import Shard


def init_distributed(device_name: str) -> tuple[Shard, torch.device]:
    """This process's shard and device. Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on
    GPUs (each process takes the GPU of its local rank), gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(device_name)
    if world == 1:
        return Shard(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Shard(rank, world), device


def leave(shard: Shard) -> None:
    """Leave the process group after a successful run (all ranks reach this barrier)."""
    if shard.world > 1 and dist.is_initialized():
        dist.barrier()  # gloo may abort a process that tears its group down while another is still in it
        dist.destroy_process_group()


def abort(shard: Shard) -> None:
    """Leave the process group after a failure without waiting for the other ranks: their pending
    collectives fail at once (gloo: connection closed) instead of waiting out the timeout."""
    if shard.world > 1 and dist.is_initialized():
        abort_group = getattr(dist.distributed_c10d, "_abort_process_group", None)
        try:
            abort_group() if abort_group is not None else dist.destroy_process_group()
        except Exception:  # the group may be broken already; the process is exiting anyway
            pass
