"""Sharded parameters are refused, with the real engines on two gloo ranks on the CPU: FSDP1 (FlatParameter, and
the original parameters with use_orig_params=True), FSDP2's fully_shard and tensor-parallel DTensors, at
construction and in add_param_group. Their epoch-end sums and divergence tests would run per shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json
import sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from bbfused import BB

dist.init_process_group("gloo")
rank = dist.get_rank()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def refusal(build):
    try:
        build()
    except TypeError as error:
        return str(error)
    return None


found = {}
flat = FullyShardedDataParallel(net(), use_orig_params=False, device_id=torch.device("cpu"))
found["fsdp1_flat"] = refusal(lambda: BB(flat.parameters(), lr=0.1, steps_per_epoch=4))
orig = FullyShardedDataParallel(net(), use_orig_params=True, device_id=torch.device("cpu"))
found["fsdp1_orig"] = refusal(lambda: BB(orig.parameters(), lr=0.1, steps_per_epoch=4))
sharded = net()
fully_shard(sharded)
found["fsdp2"] = refusal(lambda: BB(sharded.parameters(), lr=0.1, steps_per_epoch=4))
tp = parallelize_module(net()[0], mesh, ColwiseParallel())
found["tp"] = refusal(lambda: BB(tp.parameters(), lr=0.1, steps_per_epoch=4))
plain = torch.nn.Linear(3, 3)
mixed = torch.nn.Parameter(distribute_tensor(torch.ones(4, 2), mesh, [Shard(0)]))
found["mixed"] = refusal(lambda: BB([plain.weight, mixed], lr=0.1, steps_per_epoch=4))
opt = BB(plain.parameters(), lr=0.1, steps_per_epoch=4)
found["added"] = refusal(lambda: opt.add_param_group({"params": [mixed]}))
found["groups_after"] = len(opt.param_groups)
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as out:
    json.dump(found, out)
dist.barrier()
dist.destroy_process_group()
"""


def test_fsdp_and_dtensor_parameters_are_refused_with_the_reason_and_what_works(tmp_path) -> None:
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    finished = subprocess.run(
        [*command, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=150
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    for rank in (0, 1):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert found.pop("groups_after") == 1  # the refused group was not kept
        for case, message in found.items():
            assert message is not None, f"rank {rank}: {case} was accepted"
            assert "does not support sharded parameters" in message, (case, message)
            assert "each rank's shard" in message and "DistributedDataParallel" in message, (case, message)
            assert "share memory" not in message, (case, message)
            engine = "FSDP" if case.startswith("fsdp1") else "DTensor"
            assert engine in message, (case, message)
