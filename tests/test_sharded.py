"""Sharded parameters BB cannot take are refused, with the real engines on two gloo ranks on the CPU, each with its
reason and what works (FSDP2): FSDP1 (FlatParameter, and the original parameters with use_orig_params=True), tensor
parallelism (a Replicate bias), HSDP (a 2-D mesh), DTensors mixed with plain tensors (fully_shard on a submodule
only, a DTensor added to plain groups), at construction and in add_param_group. An FSDP2 parameter re-allocated after
BB was built (``model.to()``) is an error at the next step, not a silent loss of FSDP2's link to BB's buffer."""

from __future__ import annotations

import json

from torchrun import END_OF_RANK, run_two_ranks

SCRIPT = (
    r"""
import json
import sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module
from bbfused import BB

dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def refusal(build, kind=TypeError):
    try:
        build()
    except kind as error:
        return str(error)
    return None


found = {}
flat = FullyShardedDataParallel(net(), use_orig_params=False, device_id=torch.device("cpu"))
found["fsdp1_flat"] = refusal(lambda: BB(flat.parameters(), lr=0.1, steps_per_epoch=4))
orig = FullyShardedDataParallel(net(), use_orig_params=True, device_id=torch.device("cpu"))
found["fsdp1_orig"] = refusal(lambda: BB(orig.parameters(), lr=0.1, steps_per_epoch=4))
tp = parallelize_module(net()[0], mesh, RowwiseParallel())
found["tp_replicate"] = refusal(lambda: BB(tp.parameters(), lr=0.1, steps_per_epoch=4))
hsdp = net()
fully_shard(hsdp, mesh=init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("replicate", "shard")))
found["hsdp"] = refusal(lambda: BB(hsdp.parameters(), lr=0.1, steps_per_epoch=4))
submodule_only = net()
fully_shard(submodule_only[0])
found["mixed_submodule"] = refusal(lambda: BB(submodule_only.parameters(), lr=0.1, steps_per_epoch=4))
plain = torch.nn.Linear(3, 3)
sharded = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
opt = BB(plain.parameters(), lr=0.1, steps_per_epoch=4)
found["mixed_added"] = refusal(lambda: opt.add_param_group({"params": [sharded]}))
found["groups_after"] = len(opt.param_groups)

moved = net()
fully_shard(moved)
moved_opt = BB(moved.parameters(), lr=0.1, steps_per_epoch=4)
moved.to(torch.float64)
found["reallocated"] = refusal(moved_opt.zero_grad, RuntimeError)
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as out:
    json.dump(found, out)
"""
    + END_OF_RANK
)

# Per case: what the message must say (the engine and the reason).
EXPECTED = {
    "fsdp1_flat": ["flattened by FSDP", "FlatParameter", "each rank's shard only"],
    "fsdp1_orig": ["flattened by FSDP", "use_orig_params=True", "each rank's shard only"],
    "tp_replicate": ["DTensor with placements [Replicate()]", "tensor parallelism", "more than once"],
    "hsdp": ["mesh of shape (1, 2)", "HSDP", "more than once"],
    "mixed_submodule": ["a plain tensor", "a DTensor", "once per rank", "fully_shard the root module"],
    "mixed_added": ["a plain tensor", "a DTensor", "once per rank"],
}


def test_sharded_parameters_bb_cannot_take_are_refused_with_the_reason_and_what_works(tmp_path) -> None:
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    run_two_ranks(script, str(tmp_path), timeout=150)
    for rank in (0, 1):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert found.pop("groups_after") == 1  # the refused group was not kept
        reallocated = found.pop("reallocated")
        assert reallocated is not None and "re-allocated" in reallocated and "FSDP2" in reallocated
        assert found.keys() == EXPECTED.keys()
        for case, message in found.items():
            assert message is not None, f"rank {rank}: {case} was accepted"
            for phrase in EXPECTED[case] + ["What works: FSDP2 (torch.distributed.fsdp.fully_shard"]:
                assert phrase in message, (case, phrase, message)
            assert "share memory" not in message, (case, message)
