"""Runs of flat buffers (bbfused/buffer_runs.py): the constructor's groups of one dtype share one allocation, and the
Triton step updates them with one launch that reads each block's weight decay from a table. Checked against the
eager backend, whose buffers are one allocation each, step by step and bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from bbfused import BB
from bbfused.backends import triton_backend

pytest.importorskip("triton")

BLOCK = triton_backend.BLOCK_SIZE
# Sizes that end inside a block, span several and fill one exactly, in three groups of different weight decay.
SHAPES = [[(BLOCK + 37,), (5, 3)], [(2 * BLOCK,)], [(11,), (BLOCK - 16 - 3,)]]
WEIGHT_DECAYS = [1e-2, 0.0, 3e-1]


def build(backend: str, dtype: torch.dtype, **kwargs) -> tuple[BB, list[torch.nn.Parameter]]:
    generator = torch.Generator().manual_seed(0)
    groups, params = [], []
    for shapes, weight_decay in zip(SHAPES, WEIGHT_DECAYS):
        group = [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64).to(dtype)) for s in shapes]
        groups.append({"params": group, "weight_decay": weight_decay})
        params += group
    return BB(groups, lr=0.5, steps_per_epoch=3, backend=backend, **kwargs), params


def set_gradients(params: list[torch.nn.Parameter], seed: int, skip: int | None = None) -> None:
    generator = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype)
        if i != skip:
            p.grad.copy_(grad)


def steps(opt: BB, params: list[torch.nn.Parameter], count: int, skip: int | None = None) -> None:
    for step in range(count):
        opt.zero_grad()
        set_gradients(params, seed=step, skip=skip)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_groups_of_one_dtype_step_with_one_launch_as_eager_does(dtype):
    opt, params = build("triton", dtype)
    eager, eager_params = build("eager", dtype)
    (run,) = opt._buffers.runs
    assert [b.group_index for b in run.buffers] == [0, 1, 2] and not eager._buffers.runs
    assert run.numel == (2 + 2 + 1) * BLOCK  # each group's buffer starts on a block
    table = run.weight_decay_table(WEIGHT_DECAYS)
    assert table.tolist() == [1e-2, 1e-2, 0.0, 0.0, 3e-1]
    with triton_backend_launches() as launches:
        steps(opt, params, 1)
    assert launches == [run.numel]  # one step launch over the whole run
    steps(eager, eager_params, 1)
    for p, q in zip(params, eager_params):
        assert torch.equal(p.detach(), q.detach())
    # Over two epoch ends (the measuring and commit passes run over the run too) the weights stay equal to eager's.
    steps(opt, params, 6)
    steps(eager, eager_params, 6)
    assert opt.epoch == eager.epoch == 2
    torch.testing.assert_close(torch.tensor(opt.lr_history), torch.tensor(eager.lr_history), rtol=1e-12, atol=0)
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    # The padding between the groups' buffers is still zero in every field.
    for name, field in run.fields.items():
        used = torch.zeros(run.numel, dtype=torch.bool)
        for start, buffer in zip(run.starts, run.buffers):
            used[start : start + buffer.numel] = True
        assert torch.count_nonzero(field[~used]) == 0, name


def test_a_changed_weight_decay_reaches_the_table():
    opt, params = build("triton", torch.float32)
    eager, eager_params = build("eager", torch.float32)
    steps(opt, params, 1)
    steps(eager, eager_params, 1)
    for o in (opt, eager):
        o.param_groups[1]["weight_decay"] = 0.25
    steps(opt, params, 1)
    steps(eager, eager_params, 1)
    assert opt._buffers.runs[0].weight_decay_table([0, 0, 0]).tolist() == [0.0] * 5  # refilled in place
    for p, q in zip(params, eager_params):
        assert torch.equal(p.detach(), q.detach())


def test_a_parameter_without_gradient_splits_the_launch_and_stays_untouched():
    opt, params = build("triton", torch.float32)
    eager, eager_params = build("eager", torch.float32)
    frozen = params[2].detach().clone()
    with triton_backend_launches() as launches:
        steps(opt, params, 1, skip=2)
    assert len(launches) > 1  # the members step by their ranges with gradients
    steps(eager, eager_params, 1, skip=2)
    assert torch.equal(params[2].detach(), frozen)
    for p, q in zip(params, eager_params):
        assert torch.equal(p.detach(), q.detach())


def test_a_copy_steps_as_the_original():
    opt, params = build("triton", torch.float32)
    steps(opt, params, 2)
    twin_params, twin = copy.deepcopy((params, opt))
    assert not twin._buffers.runs  # a copy's buffers are allocated one by one
    steps(opt, params, 2)
    steps(twin, twin_params, 2)
    for p, q in zip(params, twin_params):
        assert torch.equal(p.detach(), q.detach())


def test_a_wrong_weight_decay_table_is_refused_before_any_write():
    param, grad, ema = torch.zeros(BLOCK + 1), torch.ones(BLOCK + 1), torch.zeros(BLOCK + 1)
    lr = torch.tensor(0.1, dtype=torch.float64)
    backend = triton_backend.TritonBackend()
    for table in (torch.zeros(1, dtype=torch.float64), torch.zeros(2, dtype=torch.float32)):
        with pytest.raises(ValueError, match="weight-decay table must be float64 of shape \\(2,\\)"):
            backend.step(param, grad, ema, lr=lr, weight_decay=table, beta=0.5)
    assert torch.count_nonzero(param) == 0


class triton_backend_launches:
    """The element counts of the step launches made inside the block."""

    def __enter__(self) -> list[int]:
        self.original = triton_backend.TritonBackend.step
        self.launches: list[int] = []
        original, launches = self.original, self.launches

        def step(backend, param, *args, **kwargs):
            launches.append(param.numel())
            return original(backend, param, *args, **kwargs)

        triton_backend.TritonBackend.step = step
        return self.launches

    def __exit__(self, *exc) -> None:
        triton_backend.TritonBackend.step = self.original
