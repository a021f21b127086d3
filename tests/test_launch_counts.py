"""Kernels a step launches on the Triton backend, counted on the CPU (benchmarks/kernel_count.py): Triton launches plus
the torch ops that would run a kernel on a GPU. Pinned so that the launch count of a step cannot grow unnoticed:
on a GPU each launch costs a few microseconds of host time whatever the size of the model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

pytest.importorskip("triton")

from kernel_count import LaunchCounter  # noqa: E402

from bbfused import BB  # noqa: E402

T = 4
# The default epoch end: the step, the measuring pass, the decision (two launches), the commit pass, and a handful
# of scalar ops (the loss, the pass sums, the history, the applied rate).
EPOCH_END_LIMIT = 12
PLAIN_STEP_LIMIT = 2  # the step kernel and the loss sum
# The paper's rule (eq. 13) runs as a dozen 0-dim torch ops; only the default control's decision is one program.
PAPER_EPOCH_END_LIMIT = 16
# A captured step (capturable=True) carries its epoch end gated on the device: the loss, the step, the dead-unit
# test's gradient count (the step before a period's last and the last, one launch), the measuring pass, the
# decision, the commit pass (and the model buffers' commit, one per dtype), the clock's period end.
CAPTURED_STEP_LIMIT = 9
# A group added after construction (a flat buffer of its own) adds its step, gradient count, measuring and commit
# launches.
PER_EXTRA_BUFFER = 4


def model(batchnorms: int) -> torch.nn.Module:
    layers: list[torch.nn.Module] = [torch.nn.Linear(6, 8)]
    for _ in range(batchnorms):
        layers += [torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 8)]
    return torch.nn.Sequential(*layers, torch.nn.Linear(8, 2))


def counted_steps(opt: BB, net: torch.nn.Module, track: bool) -> tuple[LaunchCounter, LaunchCounter]:
    """Counts of the second epoch's first step (plain) and last step (its epoch end)."""
    if track:
        opt.track_buffers(net)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=generator), torch.randint(0, 2, (16,), generator=generator)
    counts = []
    for _ in range(2 * T):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        count = LaunchCounter(count_ops=True)
        with count.active():
            opt.step(loss=loss.detach())
        counts.append(count)
    assert opt.epoch == 2, "two epochs closed"
    return counts[T], counts[2 * T - 1]


@pytest.mark.parametrize("track", [False, True], ids=["plain", "track_buffers"])
def test_default_epoch_end_launches_at_most_twelve_kernels(track):
    torch.manual_seed(0)
    net = model(batchnorms=1)
    plain, end = counted_steps(BB(net.parameters(), lr=0.1, steps_per_epoch=T, epochs=10, backend="triton"), net,
                               track)  # fmt: skip
    assert plain.total <= PLAIN_STEP_LIMIT, str(plain)
    assert plain.launches == {"_step_kernel": 1}, str(plain)
    assert end.total <= EPOCH_END_LIMIT, str(end)
    # The decision is the two single-program launches, not a hundred torch ops.
    assert end.launches["_decide_kernel"] == 1 and end.launches["_apply_kernel"] == 1, str(end)
    assert sum(end.ops.values()) <= 5, str(end)


def test_paper_epoch_end_launches_a_bounded_number_of_kernels():
    torch.manual_seed(0)
    net = model(batchnorms=1)
    opt = BB(net.parameters(), lr=0.1, steps_per_epoch=T, backend="triton", safeguard=False)
    plain, end = counted_steps(opt, net, track=False)
    assert plain.total <= PLAIN_STEP_LIMIT, str(plain)
    assert end.total <= PAPER_EPOCH_END_LIMIT, str(end)


@pytest.mark.parametrize("track", [False, True], ids=["plain", "track_buffers"])
def test_captured_step_launches_at_most_nine_kernels(track):
    torch.manual_seed(0)
    net = model(batchnorms=3)  # three BatchNorm layers: nine buffers to track, in two dtypes
    opt = BB(net.parameters(), lr=0.1, steps_per_epoch=T, epochs=10, backend="triton", capturable=True)
    plain, end = counted_steps(opt, net, track)
    # A captured step is the same launches every step (its epoch end is gated on the device), all Triton.
    assert plain.launches == end.launches and not plain.ops and not end.ops, f"{plain} / {end}"
    assert plain.host_reads == end.host_reads == 0
    assert plain.total <= CAPTURED_STEP_LIMIT, str(plain)
    assert plain.launches["_decide_kernel"] == 1 and plain.launches["_finish_kernel"] == 1, str(plain)


def two_groups(net: torch.nn.Module) -> list[dict]:
    """Weights with the optimizer's weight decay, biases and BatchNorm without: the usual ResNet recipe."""
    weights = [p for p in net.parameters() if p.ndim > 1]
    return [{"params": weights}, {"params": [p for p in net.parameters() if p.ndim == 1], "weight_decay": 0.0}]


@pytest.mark.parametrize("capturable", [False, True], ids=["default", "capturable"])
def test_groups_of_one_dtype_share_their_launches(capturable):
    """The constructor's groups of one dtype are one run of buffers (bbfused/buffer_runs.py): two groups launch what
    one does, with the BatchNorm buffers tracked too."""
    torch.manual_seed(0)
    counts = []
    for split in (True, False):
        net = model(batchnorms=3)
        params = two_groups(net) if split else net.parameters()
        opt = BB(params, lr=0.1, steps_per_epoch=T, epochs=10, weight_decay=1e-4, backend="triton",
                 capturable=capturable)  # fmt: skip
        counts.append(counted_steps(opt, net, track=True))
    (plain, end), (one_plain, one_end) = counts
    assert plain.launches == one_plain.launches and end.launches == one_end.launches, f"{plain} / {one_plain}"
    assert plain.total == one_plain.total and end.total == one_end.total
    assert end.total <= (CAPTURED_STEP_LIMIT if capturable else EPOCH_END_LIMIT), str(end)
    assert plain.launches["_step_kernel"] == 1


def test_a_group_added_later_adds_its_own_launches():
    """A group added after construction has buffers of its own: its step, gradient counts, measuring and commit
    launches."""
    torch.manual_seed(0)
    net = model(batchnorms=1)
    first, second = two_groups(net)
    opt = BB(first["params"], lr=0.1, steps_per_epoch=T, epochs=10, backend="triton", capturable=True)
    opt.add_param_group(second)
    plain, _ = counted_steps(opt, net, track=False)
    single_net = model(batchnorms=1)
    single = BB(single_net.parameters(), lr=0.1, steps_per_epoch=T, epochs=10, backend="triton", capturable=True)
    one, _ = counted_steps(single, single_net, track=False)
    assert plain.total == one.total + PER_EXTRA_BUFFER, f"{plain} / {one}"
