"""torch.distributed.checkpoint keeps BB's whole state: ``get_optimizer_state_dict`` keeps only a state dict's
``"state"`` and ``"param_groups"``, so BB's global state (the ``"bb"`` entry) travels in every param group as well;
resumes through ``set_optimizer_state_dict`` and ``dcp.save`` / ``dcp.load`` continue bit-identically, in one process
and on two gloo ranks under DDP; a dict without BB's global state is refused before anything is written."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torchrun import END_OF_RANK, run_two_ranks

from bbfused import BB, checkpoint

STEPS_PER_EPOCH = 4
SAVED_AT = 6  # mid epoch 1; the resumed run crosses the ends of epochs 1 and 2


def build() -> tuple[torch.nn.Module, BB]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[3].parameters(), "weight_decay": 0.01}]
    opt = BB(groups, lr=0.05, steps_per_epoch=STEPS_PER_EPOCH, backend="eager")
    opt.track_buffers(model)  # the rollback snapshots of the BatchNorm buffers are part of BB's global state
    return model, opt


def train(model: torch.nn.Module, opt: BB, start: int, steps: int) -> None:
    for index in range(start, start + steps):
        generator = torch.Generator().manual_seed(index)
        x, y = torch.randn(16, 4, generator=generator), torch.randn(16, 2, generator=generator)
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step(loss=loss)


def assert_same_run(model: torch.nn.Module, opt: BB, expected_model: torch.nn.Module, expected: BB) -> None:
    assert opt.lr_history == expected.lr_history and len(opt.lr_history) == 3
    assert opt.rolled_back_epochs == expected.rolled_back_epochs and opt.lr == expected.lr
    assert (opt.epoch, opt.step_in_epoch) == (expected.epoch, expected.step_in_epoch)
    for (name, value), expected_value in zip(model.state_dict().items(), expected_model.state_dict().values()):
        assert torch.equal(value, expected_value), name


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():  # dcp's "assuming the intent is to save in a single process"
        warnings.filterwarnings("ignore", message=".*single process")
        yield


def test_get_optimizer_state_dict_carries_bb_global_state_in_every_param_group() -> None:
    model, opt = build()
    train(model, opt, 0, SAVED_AT)
    plain = opt.state_dict()
    assert all(group["bb"] is plain["bb"] for group in plain["param_groups"])  # one dict: torch.save stores it once
    saved = get_optimizer_state_dict(model, opt)
    assert set(saved) == {"state", "param_groups"}  # torch keeps no other top-level key
    assert [group["bb"]["epoch"] for group in saved["param_groups"]] == [1, 1]
    assert saved["param_groups"][0]["bb"]["step_in_epoch"] == 2
    set_optimizer_state_dict(model, opt, saved)
    assert all("bb" not in group for group in opt.param_groups)  # the copies are not options of the live groups


@pytest.mark.parametrize("through", ["dict", "full_state_dict", "dcp"])
def test_resume_through_get_set_optimizer_state_dict_is_bit_identical(tmp_path: Path, through: str) -> None:
    expected_model, expected = build()
    train(expected_model, expected, 0, SAVED_AT)
    # Got as a full, CPU-offloaded dict, it loads with the default options.
    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if through == "full_state_dict" else None
    optim = get_optimizer_state_dict(expected_model, expected, options=options)
    saved = {"model": get_model_state_dict(expected_model), "optim": optim}
    if through != "dcp":
        saved = torch.load(_saved_bytes(saved), weights_only=True)  # a copy: the live views change below
    else:
        dcp.save(saved, checkpoint_id=tmp_path)
    train(expected_model, expected, SAVED_AT, 6)

    model, opt = build()
    if through == "dcp":
        saved = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(saved, checkpoint_id=tmp_path)
    set_model_state_dict(model, saved["model"])
    set_optimizer_state_dict(model, opt, saved["optim"])
    assert (opt.epoch, opt.step_in_epoch) == (1, 2)
    train(model, opt, SAVED_AT, 6)
    assert_same_run(model, opt, expected_model, expected)


def _saved_bytes(value: Any) -> Any:
    import io

    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer


def test_dict_without_bb_global_state_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    source_model, source = build()
    train(source_model, source, 0, SAVED_AT)
    stripped = get_optimizer_state_dict(source_model, source)
    for group in stripped["param_groups"]:
        del group["bb"]  # what get_optimizer_state_dict kept before the groups carried BB's global state
    flattened = get_optimizer_state_dict(
        source_model, source, options=StateDictOptions(flatten_optimizer_state_dict=True)
    )

    model, opt = build()
    train(model, opt, 0, 1)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"lacks BB's global state.*get_optimizer_state_dict\(model, opt\)"):
        set_optimizer_state_dict(model, opt, stripped)
    with pytest.raises(ValueError, match=r"flatten_optimizer_state_dict=True\)\), which drops it"):
        set_optimizer_state_dict(model, opt, flattened, options=StateDictOptions(flatten_optimizer_state_dict=True))
    # dcp.load of a checkpoint without it fails in torch's planning, before it reads anything into the views.
    dcp.save({"optim": stripped}, checkpoint_id=tmp_path)
    with pytest.raises(BaseException, match=r"Missing key in checkpoint state_dict: optim\.param_groups\.0\.bb\."):
        dcp.load({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
    after = opt.state_dict()
    assert (opt.epoch, opt.step_in_epoch) == (0, 1)
    for key, state in before["state"].items():
        for name, value in state.items():
            assert torch.equal(after["state"][key][name], value), (key, name)


def test_param_groups_carrying_different_global_states_are_refused() -> None:
    model, opt = build()
    train(model, opt, 0, SAVED_AT)
    saved = get_optimizer_state_dict(model, opt)
    saved["param_groups"][1]["bb"] = {**saved["param_groups"][1]["bb"], "step_in_epoch": 1}
    with pytest.raises(ValueError, match="param groups carry different copies"):
        set_optimizer_state_dict(model, opt, saved)
    del saved["param_groups"][1]["bb"]
    with pytest.raises(ValueError, match="or only some carry one"):
        set_optimizer_state_dict(model, opt, saved)


def test_state_dict_saved_before_the_groups_carried_the_entry_loads() -> None:
    """A ``BB.state_dict()`` of the previous layout (the same entry, at the top level only: what the
    groups' copies were added to) resumes bit-identically; the top-level entry wins over the groups' copies."""
    expected_model, expected = build()
    train(expected_model, expected, 0, SAVED_AT)
    saved = torch.load(_saved_bytes({"model": expected_model.state_dict(), "opt": expected.state_dict()}))
    train(expected_model, expected, SAVED_AT, 6)
    for group in saved["opt"]["param_groups"]:
        del group["bb"]
    assert saved["opt"]["bb"]["version"] == checkpoint.VERSION

    model, opt = build()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    train(model, opt, SAVED_AT, 6)
    assert_same_run(model, opt, expected_model, expected)

    edited = opt.state_dict()
    edited["bb"] = {**edited["bb"], "lr": 0.125}  # a new top-level dict: the groups keep the old copy
    opt.load_state_dict(edited)
    assert opt.lr == 0.125


DDP_SCRIPT = (
    r"""
import json
import sys
import warnings
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel
from bbfused import BB, checkpoint

dist.init_process_group("gloo")
rank = dist.get_rank()
folder = sys.argv[1]


def build():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = DistributedDataParallel(net)
    groups = [{"params": net[0].parameters()}, {"params": net[2].parameters(), "weight_decay": 0.01}]
    return model, BB(groups, lr=0.05, steps_per_epoch=4, backend="eager")


def train(model, opt, start, steps):
    for index in range(start, start + steps):
        generator = torch.Generator().manual_seed(100 * index + rank)  # each rank its own batches
        x, y = torch.randn(16, 4, generator=generator), torch.randn(16, 2, generator=generator)
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step(loss=loss)


def result(model, opt):
    return {
        "lr_history": opt.lr_history,
        "rolled_back": opt.rolled_back_epochs,
        "counts": [opt.epoch, opt.step_in_epoch],
        "params": [p.detach().flatten().tolist() for p in model.parameters()],
    }


model, opt = build()
train(model, opt, 0, 6)
saved = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
dcp.save(saved, checkpoint_id=folder + "/ckpt")
train(model, opt, 6, 6)
uninterrupted = result(model, opt)

model, opt = build()
state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
dcp.load(state, checkpoint_id=folder + "/ckpt")
set_model_state_dict(model, state["model"])
set_optimizer_state_dict(model, opt, state["optim"])
loaded = [opt.epoch, opt.step_in_epoch]
train(model, opt, 6, 6)
with open(f"{folder}/rank{rank}.json", "w") as out:
    json.dump({"uninterrupted": uninterrupted, "resumed": result(model, opt), "loaded": loaded}, out)
"""
    + END_OF_RANK
)


def test_ddp_two_ranks_resume_through_dcp_is_bit_identical(tmp_path: Path) -> None:
    import json

    script = tmp_path / "ddp_dcp.py"
    script.write_text(DDP_SCRIPT)
    run_two_ranks(script, str(tmp_path), timeout=150)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for found in ranks:
        assert found["loaded"] == [1, 2]
        assert found["resumed"] == found["uninterrupted"]  # floats as JSON: bit-identical
        assert len(found["resumed"]["lr_history"]) == 3
    assert ranks[0]["resumed"] == ranks[1]["resumed"]
