"""BB under FSDP2 (``fully_shard``) on two gloo ranks on the CPU decides as one process over the whole model: the same
rates and rollbacks, the same parameters within float rounding, uneven shards (7 and 1 rows over 2 ranks: one rank's
shard is empty) included, on the eager, C++ and Triton (interpreted) backends, with Adam's scaling too (each shard's
second moments, the metric's sums added across ranks). A mid-epoch resume, from
``opt.state_dict()`` or from ``dcp.save`` of ``get_optimizer_state_dict``, continues bit-identically, and the
per-parameter state is sharded like its parameter. A DTensor sharded on dim 1 (``distribute_tensor``, outside FSDP2)
trains as the plain tensor does."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torchrun import END_OF_RANK, run_two_ranks, torchrun_env

# Shared by the ranks and by the single-process reference (run here, without torch.distributed).
COMMON = r"""
import torch
from bbfused import BB

STEPS, STEPS_PER_EPOCH, SAVED_AT = 12, 4, 6
RUNS = {
    "adapts": (0.05, "eager", None), "rolls_back": (30.0, "eager", None), "cpp": (30.0, "cpp", None),
    "triton": (0.05, "triton", None), "adam": (0.05, "cpp", "adam"), "adam_triton": (0.05, "triton", "adam"),
}  # fmt: skip


def net():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 7), torch.nn.ReLU(), torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 1)]
    return torch.nn.Sequential(*layers)


def optimizer(model, run):
    lr, backend, preconditioner = RUNS[run]
    return BB(
        model.parameters(), lr=lr, steps_per_epoch=STEPS_PER_EPOCH, epochs=3, weight_decay=0.01, backend=backend,
        preconditioner=preconditioner,
    )


def train(model, opt, rows, start, stop):
    for index in range(start, stop):
        generator = torch.Generator().manual_seed(100 + index)
        x, y = torch.randn(16, 6, generator=generator), torch.randn(16, 1, generator=generator)
        opt.zero_grad()
        loss = (model(x[rows]) - y[rows]).square().mean()
        loss.backward()
        opt.step(loss=loss)


def result(model, opt):
    whole = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return {"params": [p.detach().clone() for p in whole], "lrs": opt.lr_history, "rollbacks": opt.rolled_back_epochs}


def shard1_run(weight):
    # y = x·w with w (6, 4) sharded on dim 1 as a DTensor: ranks share the batch, as tensor parallelism does.
    opt = BB([weight], lr=0.05, steps_per_epoch=STEPS_PER_EPOCH, backend="eager")
    replicate = getattr(weight, "device_mesh", None)
    for index in range(STEPS):
        generator = torch.Generator().manual_seed(200 + index)
        x, y = torch.randn(16, 6, generator=generator), torch.randn(16, 4, generator=generator)
        if replicate is not None:
            from torch.distributed.tensor import Replicate, distribute_tensor

            x, y = (distribute_tensor(t, replicate, [Replicate()]) for t in (x, y))
        opt.zero_grad()
        loss = (x @ weight - y).square().mean()
        loss.backward()
        opt.step(loss=loss.full_tensor() if replicate is not None else loss)
    return {"params": [(weight.full_tensor() if replicate is not None else weight).detach().clone()],
            "lrs": opt.lr_history, "rollbacks": opt.rolled_back_epochs}


def shard1_weight():
    torch.manual_seed(1)
    return torch.randn(6, 4) * 0.3
"""

RANKS = (
    r"""
import sys
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

dist.init_process_group("gloo")
rank, out = dist.get_rank(), sys.argv[1]
rows = slice(8 * rank, 8 * rank + 8)  # each rank half of the batch of 16


def sharded(run):
    model = net()
    for layer in model[::2]:
        fully_shard(layer)
    fully_shard(model)
    return model, optimizer(model, run)


found = {}
for run in RUNS:
    model, opt = sharded(run)
    train(model, opt, rows, 0, STEPS)
    found[run] = result(model, opt)

# Mid-epoch resumes of the run that rolls back: from opt.state_dict() (torch.save) and through dcp.
model, opt = sharded("rolls_back")
train(model, opt, rows, 0, SAVED_AT)
state = opt.state_dict()["state"]
params = list(model.parameters())
found["state_sharded"] = all(
    isinstance(value, DTensor) and value.placements == p.placements
    and value._local_tensor.shape == p._local_tensor.shape
    for index, p in enumerate(params) for value in state[index].values()
)
found["local_rows"] = [p._local_tensor.shape[0] for p in params]
saved_model = {key: value.full_tensor() for key, value in model.state_dict().items()}
torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f"{out}/saved{rank}.pt")
dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=f"{out}/dcp")
for how in ("torch_save", "dcp"):
    model, opt = sharded("rolls_back")
    if how == "torch_save":
        saved = torch.load(f"{out}/saved{rank}.pt", weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
    else:
        with torch.no_grad():
            for key, value in model.state_dict().items():
                value.copy_(distribute_tensor(saved_model[key], value.device_mesh, value.placements))
        loaded = {"optim": get_optimizer_state_dict(model, opt)}
        dcp.load(loaded, checkpoint_id=f"{out}/dcp")
        set_optimizer_state_dict(model, opt, loaded["optim"])
    train(model, opt, rows, SAVED_AT, STEPS)
    found[f"resumed_{how}"] = result(model, opt)

mesh = init_device_mesh("cpu", (2,))
weight = torch.nn.Parameter(distribute_tensor(shard1_weight(), mesh, [Shard(1)]))
found["shard1"] = shard1_run(weight)
torch.save(found, f"{out}/rank{rank}.pt")
"""
    + END_OF_RANK
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each rank's results, and the single-process runs on the whole batch."""
    out = tmp_path_factory.mktemp("fsdp2")
    script = out / "ranks.py"
    script.write_text(COMMON + RANKS)
    run_two_ranks(script, str(out), timeout=300, env=torchrun_env(TRITON_INTERPRET="1"))
    ranks = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    common: dict[str, Any] = {}
    exec(compile(COMMON, "common", "exec"), common)
    single = {}
    for run in common["RUNS"]:
        model = common["net"]()
        opt = common["optimizer"](model, run)
        common["train"](model, opt, slice(None), 0, common["STEPS"])
        single[run] = common["result"](model, opt)
    single["shard1"] = common["shard1_run"](torch.nn.Parameter(common["shard1_weight"]()))
    return {"ranks": ranks, "single": single}


def assert_ranks_identical(ranks: list[dict[str, Any]], run: str) -> None:
    first, second = ranks[0][run], ranks[1][run]
    assert first["lrs"] == second["lrs"] and first["rollbacks"] == second["rollbacks"], run
    assert all(torch.equal(a, b) for a, b in zip(first["params"], second["params"])), run


@pytest.mark.parametrize("run", ["adapts", "rolls_back", "cpp", "triton", "adam", "adam_triton", "shard1"])
def test_sharded_run_decides_as_one_process_over_the_whole_model(runs: dict[str, Any], run: str) -> None:
    assert_ranks_identical(runs["ranks"], run)
    sharded, single = runs["ranks"][0][run], runs["single"][run]
    assert len(sharded["lrs"]) == 3 and sharded["rollbacks"] == single["rollbacks"]
    # The rank sums add float64 partial sums of float32 values: the rates agree to float32 rounding.
    assert sharded["lrs"] == pytest.approx(single["lrs"], rel=1e-6)
    assert len(set(sharded["lrs"])) == 3  # the rate moved at every epoch end
    for got, expected in zip(sharded["params"], single["params"]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_the_huge_rate_is_rolled_back_and_the_shards_are_uneven(runs: dict[str, Any]) -> None:
    assert runs["single"]["rolls_back"]["rollbacks"] == [0] == runs["single"]["cpp"]["rollbacks"]
    assert runs["single"]["adapts"]["rollbacks"] == []
    # Linear(6, 7), Linear(7, 5), Linear(5, 1): weights and biases split 4 + 3, 3 + 2 and 1 + 0 rows.
    assert [ranks["local_rows"] for ranks in runs["ranks"]] == [[4, 4, 3, 3, 1, 1], [3, 3, 2, 2, 0, 0]]


@pytest.mark.parametrize("how", ["torch_save", "dcp"])
def test_a_mid_epoch_resume_continues_bit_identically(runs: dict[str, Any], how: str) -> None:
    for ranks in runs["ranks"]:
        assert ranks["state_sharded"]  # every state tensor is a DTensor placed like its parameter
        resumed, expected = ranks[f"resumed_{how}"], ranks["rolls_back"]
        assert resumed["lrs"] == expected["lrs"] and resumed["rollbacks"] == expected["rollbacks"] == [0]
        assert all(torch.equal(a, b) for a, b in zip(resumed["params"], expected["params"]))
