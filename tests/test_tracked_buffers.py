"""Tracked model buffers packed into flat buffers: identity and values kept, BatchNorm unchanged bit for bit, the
commit exact on every backend with and without a gate, and its launches independent of the number of tensors.

Without CUDA the tensors are on the CPU (Triton through its interpreter, see conftest.py).
"""

from __future__ import annotations

import collections
import copy
import pickle
import sys
from pathlib import Path

import pytest
import torch

from bbfused.backends import load_backend
from bbfused.tracked_buffers import TrackedBuffers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from kernel_count import LaunchCounter  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [b for b in ("eager", "cpp", "triton") if not (b == "cpp" and DEVICE.type == "cuda")]
# gate: None (a host clock's epoch end), or a device clock's flag, set (the epoch's last step) or not.
GATES = {"host": None, "gate_set": True, "gate_unset": False}


def bn_model(blocks: int = 1) -> torch.nn.Sequential:
    """BatchNorm1d, BatchNorm2d with momentum=None (a cumulative average: reads num_batches_tracked) and an affine-free
    BatchNorm1d per block."""
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(blocks):
        layers += [
            torch.nn.Linear(6, 6),
            torch.nn.BatchNorm1d(6),
            torch.nn.Unflatten(1, (6, 1, 1)),
            torch.nn.BatchNorm2d(6, momentum=None),
            torch.nn.Flatten(),
            torch.nn.BatchNorm1d(6, affine=False),
        ]
    return torch.nn.Sequential(*layers).to(DEVICE)


def mixed_tensors() -> list[torch.Tensor]:
    """Tensors of every kind a commit must handle: several dtypes and shapes, a 0-dim, an empty, a channels_last."""
    generator = torch.Generator().manual_seed(1)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    return [
        rand(3, 5).float(),
        torch.tensor(7, dtype=torch.int64),
        rand().float(),
        rand(7).double(),
        rand(4, 2).bfloat16(),
        torch.arange(3, dtype=torch.int64) * 11,
        torch.zeros(0, 4),
        rand(2, 3, 4, 5).float().contiguous(memory_format=torch.channels_last),
        rand(9).half(),
    ]


def to_device(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


def flag(value: bool | None) -> torch.Tensor | None:
    return None if value is None else torch.tensor(value, device=DEVICE)


def overwrite(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Give every tensor new values in place (as a forward pass would); returns copies of them."""
    with torch.no_grad():
        for t in tensors:
            t.copy_((t.double() * 3 + 1).to(t.dtype) if t.is_floating_point() else t * 3 + 1)
    return [t.clone() for t in tensors]


def assert_equal(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert torch.equal(a.cpu(), e.cpu()), (a, e)


# ------------------------------------------------------------------------------------------- packing
def test_packing_keeps_identity_values_and_state_dict() -> None:
    model = bn_model()
    buffers = list(model.buffers())
    before = [b.clone() for b in buffers]
    strides = [b.stride() for b in buffers]
    tracked = TrackedBuffers(buffers)

    assert [id(b) for b in model.buffers()] == [id(b) for b in buffers] == [id(b) for b in tracked.live]
    assert model[1].running_mean is buffers[0]
    assert_equal(list(model.buffers()), before)
    assert [b.stride() for b in buffers] == strides
    assert tracked.launch_groups == 2  # float32 and int64
    assert_equal(tracked.snapshot_views(), before)

    # The module's in-place updates land in the flat buffer the commit copies: snapshot ← live takes them.
    model.train()(torch.randn(8, 6, device=DEVICE))
    assert model[3].num_batches_tracked.item() == 1
    tracked.commit(flag(False), None, {})
    assert_equal(tracked.snapshot_views(), [b.clone() for b in buffers])

    # state_dict reads the packed tensors; load_state_dict writes into them in place.
    state = model.state_dict()
    assert_equal([state[name] for name, _ in model.named_buffers()], buffers)
    pointers = [b.data_ptr() for b in buffers]
    model.load_state_dict(bn_model().state_dict())
    assert [b.data_ptr() for b in buffers] == pointers
    assert_equal(buffers, before)
    tracked.commit(flag(True), None, {})  # restores the snapshot taken after the forward pass
    assert_equal(buffers, [state[name] for name, _ in model.named_buffers()])


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_batchnorm_training_after_packing_equals_an_unpacked_twin(momentum: float | None) -> None:
    model, twin = bn_model(blocks=2), bn_model(blocks=2)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    for m in twin.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    tracked = TrackedBuffers(list(model.buffers()))
    pointers = [b.data_ptr() for b in model.buffers()]
    generator = torch.Generator().manual_seed(2)
    for _ in range(4):
        x = torch.randn(16, 6, generator=generator).to(DEVICE)
        assert torch.equal(model.train()(x), twin.train()(x))
    assert_equal(list(model.buffers()), list(twin.buffers()))
    assert model[3].num_batches_tracked.item() == 4
    assert [b.data_ptr() for b in model.buffers()] == pointers  # updated in place, never re-allocated
    x = torch.randn(16, 6, generator=generator).to(DEVICE)
    assert torch.equal(model.eval()(x), twin.eval()(x))
    # and the flat buffers hold what the modules wrote: a rollback brings back the start
    tracked.commit(flag(True), None, {})
    assert_equal(list(model.buffers()), list(bn_model(blocks=2).buffers()))


# ------------------------------------------------------------------------------------------- the commit
@pytest.mark.parametrize("gate", GATES.values(), ids=GATES.keys())
@pytest.mark.parametrize("rolled_back", [False, True], ids=["kept", "rolled_back"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_commit_restores_or_snapshots_exactly(backend: str, rolled_back: bool, gate: bool | None) -> None:
    tensors = to_device(mixed_tensors())
    start = [t.clone() for t in tensors]
    tracked = TrackedBuffers(tensors)
    assert tracked.launch_groups == 5  # float32, int64, float64, bfloat16, float16 packed; none loose
    new = overwrite(tensors)
    tracked.commit(flag(rolled_back), flag(gate), {DEVICE: load_backend(backend, DEVICE)})
    if gate is False:
        live, snapshot = new, start
    elif rolled_back:
        live, snapshot = start, start
    else:
        live, snapshot = new, new
    assert_equal(tensors, live)
    assert_equal(tracked.snapshot_views(), snapshot)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loose_tensors_stay_tied_and_are_committed(backend: str) -> None:
    """A view of another tracked tensor, an expanded tensor and a strided slice are not packed (packing would untie
    them from the memory they share); the commit still restores them exactly, and the ties hold."""
    base = torch.arange(12.0, device=DEVICE)
    view = base[2:6]  # shares memory with base: both stay loose
    source = torch.arange(3.0, device=DEVICE)
    expanded = source.expand(4, 3)  # stride 0: four rows over one memory row
    every_other = torch.arange(10.0, device=DEVICE)[::2]
    plain = torch.ones(5, device=DEVICE)
    tensors = [base, view, expanded, every_other, plain]
    start = [t.clone() for t in tensors]
    tracked = TrackedBuffers(tensors)
    assert tracked.launch_groups == 5  # plain packed, four loose
    assert_equal(tracked.snapshot_views(), start)
    with torch.no_grad():
        base.add_(100)
        source.add_(10)
        every_other.mul_(-1)
        plain.fill_(3)
    assert view[0].item() == 102  # still a view of base
    tracked.commit(flag(True), None, {DEVICE: load_backend(backend, DEVICE)})
    assert_equal(tensors, start)
    assert torch.equal(source.cpu(), start[2][0].cpu())  # restored through the expanded tensor
    with torch.no_grad():
        base.add_(1)
    assert torch.equal(view.cpu(), start[1].cpu() + 1)
    tracked.commit(flag(False), flag(True), {DEVICE: load_backend(backend, DEVICE)})
    assert_equal(tracked.snapshot_views(), [t.clone() for t in tensors])


# ------------------------------------------------------------------------------------------- launches
def count_commit(blocks: int, backend: str, gate: bool | None) -> tuple[int, collections.Counter[str], int]:
    model = bn_model(blocks)
    tracked = TrackedBuffers(list(model.buffers()))
    backends = {DEVICE: load_backend(backend, DEVICE)}
    rolled_back, gate_flag = flag(True), flag(gate)
    tracked.commit(rolled_back, gate_flag, backends)  # compiled before counting
    counter = LaunchCounter(count_ops=True)
    with counter.active():
        tracked.commit(rolled_back, gate_flag, backends)
    return len(tracked), counter.ops, sum(counter.launches.values())


# Per commit of BatchNorm buffers (float32 stats, int64 counts), views left out (they launch nothing): the float32
# pack through the backend, the int64 pack through the eager backend (with a gate, the flags' `and`; then a where,
# and a copy or a where), except under Triton, whose kernel takes both packs. The cpp backend reads the gate on the
# host (a CPU tensor: no sync).
EXPECTED = {
    ("eager", None): ({"where": 2, "copy_": 2}, 0),
    ("eager", True): ({"bitwise_and": 2, "where": 4}, 0),
    ("cpp", None): ({"cpp_epoch_commit": 1, "where": 1, "copy_": 1}, 0),
    ("cpp", True): ({"cpp_epoch_commit": 1, "bitwise_and": 1, "where": 2}, 0),
    ("triton", None): ({}, 2),
    ("triton", True): ({}, 2),
}


@pytest.mark.parametrize("gate", [None, True], ids=["host", "gated"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_commit_launches_do_not_grow_with_the_tensors(backend: str, gate: bool | None) -> None:
    small = count_commit(1, backend, gate)
    large = count_commit(20, backend, gate)
    assert (small[0], large[0]) == (9, 180)
    assert small[1:] == large[1:]
    expected_ops, expected_launches = EXPECTED[(backend, gate)]
    assert dict(large[1]) == expected_ops and large[2] == expected_launches


# ------------------------------------------------------------------------------------------- checkpoints, copies
def test_snapshots_save_and_load_in_order() -> None:
    tensors = to_device(mixed_tensors())
    start = [t.clone() for t in tensors]
    tracked = TrackedBuffers(tensors)
    saved = [v.detach().cpu().clone() for v in tracked.snapshot_views()]
    new = overwrite(tensors)
    tracked.commit(flag(False), None, {})
    assert_equal(tracked.snapshot_views(), new)
    tracked.load_snapshots(saved)
    assert_equal(tracked.snapshot_views(), start)
    with pytest.raises(ValueError, match="one value per tracked tensor"):
        tracked.load_snapshots(saved[:-1])
    with pytest.raises(ValueError, match="one value per tracked tensor"):
        tracked.load_snapshots([torch.zeros(1)] + new[1:])
    assert_equal(tracked.snapshot_views(), start)  # nothing written by a refused load


@pytest.mark.parametrize(
    "make_copy", [copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))], ids=["deepcopy", "pickle"]
)
def test_copy_packs_the_copied_model(make_copy) -> None:
    model = bn_model()
    tracked = TrackedBuffers(list(model.buffers()))
    start = [b.clone() for b in model.buffers()]
    model.train()(torch.randn(8, 6, device=DEVICE))
    twin_model, twin = make_copy((model, tracked))
    assert [id(b) for b in twin.live] == [id(b) for b in twin_model.buffers()]
    assert_equal(twin.snapshot_views(), start)
    twin.commit(flag(True), None, {})
    assert_equal(list(twin_model.buffers()), start)
    assert not torch.equal(model[1].running_mean, start[0])  # the original is not the copy
    twin_model.train()(torch.randn(8, 6, device=DEVICE))  # the copy's modules write into the copy's packs
    twin.commit(flag(True), None, {})
    assert_equal(list(twin_model.buffers()), start)


def test_bad_input_is_refused_before_anything_is_written() -> None:
    with pytest.raises(TypeError, match="buffer 1 is a list, not a tensor"):
        TrackedBuffers([torch.zeros(2), [1.0]])
    sparse = torch.zeros(3, 3).to_sparse()
    dense = torch.ones(2)
    pointer = dense.data_ptr()
    with pytest.raises(ValueError, match="running_sparse is a torch.sparse_coo tensor"):
        TrackedBuffers([dense, sparse], names=["running_dense", "running_sparse"])
    assert dense.data_ptr() == pointer  # not packed
    with pytest.raises(ValueError, match="2 names for 1 tensors"):
        TrackedBuffers([dense], names=["a", "b"])
    tracked = TrackedBuffers([dense])
    dense.fill_(5)
    for rolled_back, gate in [(torch.tensor(1), None), (torch.ones(2, dtype=torch.bool), None), (True, None)]:
        with pytest.raises(ValueError, match="rolled_back must be a one-element bool tensor"):
            tracked.commit(rolled_back, gate, {})
    with pytest.raises(ValueError, match="gate must be a one-element bool tensor"):
        tracked.commit(torch.tensor(True), torch.tensor(1.0), {})
    assert torch.equal(dense, torch.full((2,), 5.0))
    assert torch.equal(tracked.snapshot_views()[0], torch.ones(2))
