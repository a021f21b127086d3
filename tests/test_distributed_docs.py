"""The snippets of docs/distributed.md run as they are, under torchrun on two gloo ranks on the CPU: the ranks end
bit-identical and equal to one process that trains on both ranks' batches, ``steps_per_epoch`` is one rank's
batches, and a run resumed from the epoch-0 checkpoint (``dcp.load``, ``set_optimizer_state_dict``) ends
bit-identical to the run that was not interrupted."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchrun import END_OF_RANK, run_two_ranks, torchrun_env

from bbfused import BB

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "distributed.md"
WORLD = 2
SAMPLES, FEATURES, CLASSES = 1024, 12, 4  # two ranks of 32-sample batches: 16 steps per epoch


def snippets() -> dict[str, str]:
    return dict(re.findall(r"<!-- snippet: (\w+) -->\n```python\n(.*?)```", DOC.read_text(), re.S))


def model_and_dataset() -> tuple[torch.nn.Module, TensorDataset]:
    """A small MLP and labels from a random linear teacher, the same in every process."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=generator)
    y = (x @ torch.randn(FEATURES, CLASSES, generator=generator)).argmax(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 32), torch.nn.ReLU(), torch.nn.Linear(32, CLASSES))
    return model, TensorDataset(x, y)


RANK_SCRIPT = (
    r"""
import json
import sys
import torch
import torch.distributed as dist
from test_distributed_docs import model_and_dataset, snippets

resume = sys.argv[1] == "resume"
setup = "fsdp2_setup" if sys.argv[1] == "fsdp2" else "ddp_setup"
model, dataset = model_and_dataset()
namespace = {"model": model, "dataset": dataset}
code = snippets()
exec(compile(code[setup], f"docs:{setup}", "exec"), namespace)
if resume:
    exec(compile(code["dcp_resume"], "docs:dcp_resume", "exec"), namespace)
opt, loader = namespace["opt"], namespace["loader"]
start = opt.epoch
exec(compile(code["ddp_loop"], "docs:ddp_loop", "exec"), namespace)
found = {
    "start": start,
    "steps_per_epoch": opt.steps_per_epoch,
    "batches": len(loader),
    "counts": [opt.epoch, opt.step_in_epoch],
    "lr_history": opt.lr_history,
    "rolled_back": opt.rolled_back_epochs,
    "params": [p.full_tensor().detach().flatten().tolist() if hasattr(p, "full_tensor") else
               p.detach().flatten().tolist() for p in namespace["model"].parameters()],
}
with open(f"{sys.argv[1]}_rank{dist.get_rank()}.json", "w") as out:
    json.dump(found, out)
"""
    + END_OF_RANK
)


def _launch(folder: Path, run: str) -> list[dict[str, Any]]:
    """torchrun with two processes in ``folder`` (the snippets' checkpoints go to folder/checkpoints)."""
    script = folder / "rank.py"
    script.write_text(RANK_SCRIPT)
    run_two_ranks(script, run, timeout=200, env=torchrun_env(REPO / "tests"), cwd=folder)
    return [json.loads((folder / f"{run}_rank{rank}.json").read_text()) for rank in range(WORLD)]


def _one_process_on_both_ranks_batches() -> tuple[list[list[float]], list[float], list[int], list[float]]:
    """What DDP computes, in one process: each step's batch is the two ranks' batches together (DDP averages
    equal-sized batches' gradients, and BB the ranks' losses). Returns the parameters, the rate history, the
    rolled-back epochs and the loss over the whole data set before and after."""
    model, dataset = model_and_dataset()
    samplers = [DistributedSampler(dataset, num_replicas=WORLD, rank=rank) for rank in range(WORLD)]
    loaders = [DataLoader(dataset, batch_size=32, sampler=sampler) for sampler in samplers]
    opt = BB(model.parameters(), lr=0.1, steps_per_epoch=len(loaders[0]), epochs=3)
    x_all, y_all = dataset.tensors
    with torch.no_grad():
        losses = [float(torch.nn.functional.cross_entropy(model(x_all), y_all))]
    for epoch in range(3):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        for batches in zip(*loaders):
            x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step(loss=loss)
    with torch.no_grad():
        losses.append(float(torch.nn.functional.cross_entropy(model(x_all), y_all)))
    params = [p.detach().flatten().tolist() for p in model.parameters()]
    return params, opt.lr_history, opt.rolled_back_epochs, losses


def test_distributed_doc_has_the_snippets_this_file_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert sorted(blocks) == sorted(snippets().values())
    assert set(snippets()) == {"ddp_setup", "ddp_loop", "dcp_resume", "fsdp2_setup"}


def test_ddp_and_dcp_snippets_on_two_ranks(tmp_path: Path) -> None:
    fresh = _launch(tmp_path, "fresh")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch0", "epoch1", "epoch2"]
    resumed = _launch(tmp_path, "resume")

    # steps_per_epoch is one rank's batches: 1024 samples over 2 ranks in batches of 32.
    for found in fresh + resumed:
        assert found["steps_per_epoch"] == found["batches"] == SAMPLES // (WORLD * 32) == 16
        assert found["counts"] == [3, 0] and len(found["lr_history"]) == 3
    assert [found["start"] for found in fresh + resumed] == [0, 0, 1, 1]
    # The ranks decide alike: bit-identical (floats through JSON keep every bit).
    assert fresh[0] == fresh[1] and resumed[0] == resumed[1]
    # Resumed from the epoch-0 checkpoint, the run ends exactly where the uninterrupted one did.
    assert {**resumed[0], "start": 0} == fresh[0]

    # One process on both ranks' batches: the same rates and rollbacks, parameters within float32 rounding.
    params, lr_history, rolled_back, losses = _one_process_on_both_ranks_batches()
    assert fresh[0]["lr_history"] == pytest.approx(lr_history, rel=1e-5)
    assert fresh[0]["rolled_back"] == rolled_back
    flat = torch.tensor([v for p in fresh[0]["params"] for v in p])
    expected = torch.tensor([v for p in params for v in p])
    torch.testing.assert_close(flat, expected, rtol=1e-5, atol=1e-5)  # found: 3e-6 on weights up to 4.3
    # It learns: the check above compares a run that moved. (Its third epoch, at a rate of about 5, may be rolled back:
    # the run then ends at the second epoch's weights, about a quarter below the start.)
    assert losses[1] < 0.8 * losses[0]


def test_fsdp2_snippet_on_two_ranks(tmp_path: Path) -> None:
    """The FSDP2 setup with the same loop: the ranks agree, and match one process on both ranks' batches (rates
    within float32 rounding of the gradients, the same rollbacks, weights within 1e-5)."""
    found = _launch(tmp_path, "fsdp2")
    assert found[0] == found[1]
    assert found[0]["steps_per_epoch"] == 16 and found[0]["counts"] == [3, 0]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch0", "epoch1", "epoch2"]
    params, lr_history, rolled_back, _ = _one_process_on_both_ranks_batches()
    assert found[0]["lr_history"] == pytest.approx(lr_history, rel=1e-5)
    assert found[0]["rolled_back"] == rolled_back
    flat = torch.tensor([v for p in found[0]["params"] for v in p])
    torch.testing.assert_close(flat, torch.tensor([v for p in params for v in p]), rtol=1e-5, atol=1e-5)
