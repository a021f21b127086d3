"""``BB(capturable=True)``: a training step whose epoch end is device work, so that a CUDA graph can replay it.

On the CPU: the capturable step follows the host-counted trajectory bit for bit (rollbacks included), reads
nothing back to the host after its first call, and leaves every piece of host state and every state tensor's
identity unchanged, which is what a graph replay (kernels only, no Python) needs. With CUDA: a real capture.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp
from test_control import BACKENDS

import bbfused.clock
from bbfused import BB
from bbfused.backends import base as backends_base
from bbfused.backends.eager import EagerBackend

STEPS = 5


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def _build(
    model: torch.nn.Module,
    capturable: bool,
    safeguard: bool,
    backend: str,
    lr: float,
    preconditioner: str | None = None,
) -> BB:
    groups = [
        {"params": [p for n, p in model.named_parameters() if n.endswith("weight")], "weight_decay": 1e-3},
        {"params": [p for n, p in model.named_parameters() if not n.endswith("weight")]},
    ]
    opt = BB(
        groups, lr=lr, steps_per_epoch=STEPS, backend=backend, safeguard=safeguard, capturable=capturable,
        preconditioner=preconditioner,
    )  # fmt: skip
    opt.track_buffers(model)
    return opt


def _step(model: torch.nn.Module, opt: BB, step: int) -> None:
    x, y = _batch(step)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step(loss=loss)


def _run(
    capturable: bool, safeguard: bool, backend: str, lr: float, steps: int, preconditioner: str | None = None
) -> tuple[torch.nn.Module, BB]:
    model = _model()
    opt = _build(model, capturable, safeguard, backend, lr, preconditioner)
    for step in range(steps):
        _step(model, opt, step)
    return model, opt


# (safeguard, preconditioner): the paper's method, the default, and the default with Adam's scaling.
MODES = [(False, None), (True, None), (True, "adam")]


@pytest.mark.parametrize("backend", ["eager", "cpp", "triton"])
@pytest.mark.parametrize(("safeguard", "preconditioner"), MODES)
@pytest.mark.parametrize("lr", [0.3, 30.0])
def test_capturable_step_follows_the_host_counted_trajectory(
    backend: str, safeguard: bool, preconditioner: str | None, lr: float
) -> None:
    """Same weights, BatchNorm statistics, rates, rollbacks and checkpoint after 6 epochs and 2 steps; η0 = 30
    makes the safeguard roll epochs back (the device-side rollback and history are exercised; with Adam's scaling the
    run starts at 1e-3 whatever η0, and the second moments' bias correction counts on the device)."""
    steps = 6 * STEPS + 2
    model, opt = _run(False, safeguard, backend, lr, steps, preconditioner)
    captured_model, captured = _run(True, safeguard, backend, lr, steps, preconditioner)
    for a, b in zip(model.state_dict().values(), captured_model.state_dict().values()):
        assert torch.equal(a, b)
    assert captured.lr_history == opt.lr_history and len(opt.lr_history) == 6
    assert captured.rolled_back_epochs == opt.rolled_back_epochs
    if safeguard and lr > 1 and preconditioner is None:
        assert opt.rolled_back_epochs, "the large rate was meant to trigger a rollback"
    if preconditioner is not None:
        assert len(set(opt.lr_history)) > 2  # the rate moved
    assert (captured.epoch, captured.step_in_epoch) == (opt.epoch, opt.step_in_epoch) == (6, 2)
    assert captured.lr == opt.lr
    saved, captured_saved = opt.state_dict(), captured.state_dict()
    buffers, captured_buffers = saved["bb"].pop("model_buffers", []), captured_saved["bb"].pop("model_buffers", [])
    assert saved["bb"] == captured_saved["bb"]
    assert all(torch.equal(a, b) for a, b in zip(buffers, captured_buffers))
    for a, b in zip(saved["state"].values(), captured_saved["state"].values()):
        assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.parametrize("safeguard", [True, False])
def test_checkpoints_move_between_capturable_and_host_counted(safeguard: bool) -> None:
    """A capturable run saved mid-epoch resumes in either mode, and a host-counted one in a capturable
    optimizer; all continue exactly as the uninterrupted run."""
    total, cut = 4 * STEPS + 1, 2 * STEPS + 3
    reference_model, reference = _run(False, safeguard, "eager", 30.0, total)
    for saving, resuming in ((True, False), (False, True), (True, True)):
        model, opt = _run(saving, safeguard, "eager", 30.0, cut)
        saved = copy.deepcopy(opt.state_dict())
        resumed = _build(model, resuming, safeguard, "eager", 0.1)
        resumed.load_state_dict(saved)
        for step in range(cut, total):
            _step(model, resumed, step)
        assert resumed.lr_history == reference.lr_history
        assert resumed.rolled_back_epochs == reference.rolled_back_epochs
        assert (resumed.epoch, resumed.step_in_epoch) == (reference.epoch, reference.step_in_epoch)
        for a, b in zip(model.state_dict().values(), reference_model.state_dict().values()):
            assert torch.equal(a, b)


def _cpu_momentum_restart(name: str, tensor: torch.Tensor) -> bool:
    """Whether this read is the one the backends' commit makes by design on the CPU only: its momentum-restart flag,
    read to skip a fill pass when nothing rolled back (no sync there; other devices fill through the mask unread)."""
    caller = sys._getframe(2).f_code
    return (
        name == "__bool__"
        and tensor.device.type == "cpu"
        and tensor.dtype == torch.bool
        and tensor.dim() == 0
        and caller.co_name == "zero_momentum_if_rolled_back"
        and caller.co_filename == backends_base.__file__
    )


@contextlib.contextmanager
def _no_host_reads():
    """Make every way of reading a tensor's value on the host raise (a device sync, and a graph breaker), but for
    the CPU-only read of :func:`_cpu_momentum_restart`."""

    def refusing(name: str):
        def refuse(tensor, *args, **kwargs):
            if _cpu_momentum_restart(name, tensor):
                return saved[name](tensor, *args, **kwargs)
            raise AssertionError("a tensor value was read on the host")

        return refuse

    names = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refusing(name))
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def _tensor_state(opt: BB) -> dict[str, tuple[int, int]]:
    """Every state tensor the optimizer, its rate control and its device counters hold: identity and address. The
    histories' host copies, filled from the device when read, are not state a replay updates."""
    owners = {
        "opt": vars(opt),
        "control": vars(opt._control),
        "epochs": vars(opt._clock),
        "buffers": vars(opt._buffers),
    }
    if hasattr(opt._control, "loss"):
        owners["loss"] = vars(opt._control.loss)
    found = {}
    for owner, attributes in owners.items():
        for name, value in attributes.items():
            values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
            for index, tensor in enumerate(values):
                if isinstance(tensor, torch.Tensor):
                    found[f"{owner}.{name}[{index}]"] = (id(tensor), tensor.data_ptr())
    return found


def _host_state(opt: BB) -> dict[str, object]:
    """The host-side values a replay could not update (everything but tensors and the parameter groups' lr)."""
    skip = {"state", "param_groups", "_buffers", "_backends", "_epoch_buffers"}
    state = {}
    for owner, attributes in (("opt", vars(opt)), ("control", vars(opt._control)), ("epochs", vars(opt._clock))):
        for name, value in attributes.items():
            if name in skip or isinstance(value, torch.Tensor) or callable(value):
                continue
            if isinstance(value, (list, dict)) and any(
                isinstance(v, torch.Tensor) for v in (value.values() if isinstance(value, dict) else value)
            ):
                state[f"{owner}.{name}"] = len(value)
                continue
            plain = isinstance(value, (int, float, str, tuple, list, dict, type(None)))
            state[f"{owner}.{name}"] = copy.copy(value) if plain else id(value)
    return state


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize(("safeguard", "preconditioner"), MODES)
def test_capturable_steps_read_nothing_on_the_host_and_change_only_tensors_in_place(
    safeguard: bool, preconditioner: str | None, backend: str
) -> None:
    """After the first (eager) step, 3 epochs of steps, their epoch ends and rollbacks included, never read a tensor
    on the host, change no host-side state and re-bind no state tensor: replaying the recorded kernels alone does
    what calling step() does (the torch ops of the eager backend, the Triton launches of the triton backend)."""
    model = _model()
    opt = _build(model, True, safeguard, backend, 30.0, preconditioner)
    _step(model, opt, 0)
    tensors, host = _tensor_state(opt), _host_state(opt)
    with _no_host_reads():
        for step in range(1, 3 * STEPS + 1):
            _step(model, opt, step)
            assert _tensor_state(opt) == tensors
            assert _host_state(opt) == host
    assert opt.epoch == 3 and opt.step_in_epoch == 1
    assert opt.param_groups[0]["lr"] is opt.lr_tensor
    opt.load_state_dict(opt.state_dict())  # a graph captured before loading must go on with the loaded state
    assert _tensor_state(opt) == tensors
    if safeguard and preconditioner is None:
        assert opt.rolled_back_epochs  # the device-side rollback ran inside those steps


def test_capturable_bad_inputs_name_the_fix(monkeypatch) -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"capturable=True needs steps_per_epoch.*Pass steps_per_epoch=T"):
        BB(model.parameters(), lr=0.1, capturable=True, beta=0.5)
    with pytest.raises(TypeError, match=r"capturable must be True or False, got 1"):
        BB(model.parameters(), lr=0.1, steps_per_epoch=3, capturable=1)
    opt = _build(model, True, True, "eager", 0.1)
    x, y = _batch(0)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"takes the loss as a tensor, got the number 2.5.*loss=loss, not"):
        opt.step(loss=2.5)
    monkeypatch.setattr(bbfused.clock, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"run at least one step\(\) eagerly before capturing"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    monkeypatch.undo()
    opt.step()
    monkeypatch.setattr(bbfused.clock, "_capturing", lambda: True)
    opt.step()  # warmed up: a capture may begin
    assert opt.step_in_epoch == 2
    monkeypatch.undo()
    opt.load_state_dict(opt.state_dict())
    monkeypatch.setattr(bbfused.clock, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"after building, load_state_dict\(\) and add_param_group\(\) alike"):
        opt.step()


@pytest.mark.parametrize("backend", [EagerBackend(), *BACKENDS], ids=lambda b: b.name)
def test_epoch_passes_with_a_false_flag_write_nothing(backend) -> None:
    """The flag a captured step hands the passes: false writes nothing; true is the unflagged pass."""
    generator = torch.Generator().manual_seed(3)
    n = 1037
    device = "cuda" if backend.name == "triton" and torch.cuda.is_available() else "cpu"
    buffers = [torch.randn(n, generator=generator).to(device) for _ in range(4)]
    flag = {value: torch.tensor(value, device=device) for value in (True, False)}
    for name in ("epoch_end", "epoch_measure"):
        off = [b.clone() for b in buffers]
        sums = getattr(backend, name)(*off, enabled=flag[False])
        assert all(torch.equal(a, b) for a, b in zip(off, buffers)) and not sums.any()
        on, plain = [b.clone() for b in buffers], [b.clone() for b in buffers]
        assert torch.equal(getattr(backend, name)(*on, enabled=flag[True]), getattr(backend, name)(*plain))
        assert all(torch.equal(a, b) for a, b in zip(on, plain))
    for rolled_back in (True, False):
        off = [b.clone() for b in buffers]
        backend.epoch_commit(off[0], off[2], flag[rolled_back], enabled=flag[False])
        assert all(torch.equal(a, b) for a, b in zip(off, buffers))
        on, plain = [b.clone() for b in buffers], [b.clone() for b in buffers]
        backend.epoch_commit(on[0], on[2], flag[rolled_back], enabled=flag[True])
        backend.epoch_commit(plain[0], plain[2], flag[rolled_back])
        assert all(torch.equal(a, b) for a, b in zip(on, plain))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("safeguard", [True, False])
def test_whole_training_step_replays_in_a_cuda_graph(safeguard: bool) -> None:
    """Forward, backward and step() (epoch ends included) captured once and replayed for 4 epochs follow the same
    steps run eagerly with the same optimizer settings."""
    device = torch.device("cuda")
    batches = [tuple(t.to(device) for t in _batch(step)) for step in range(4 * STEPS + 1)]

    def make() -> tuple[torch.nn.Module, BB]:
        model = _model().to(device)
        return model, _build(model, True, safeguard, "triton", 0.3)

    def train_step(model, opt, x, y) -> None:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)

    model, opt = make()
    for x, y in batches:
        train_step(model, opt, x, y)

    graphed_model, graphed = make()
    static_x, static_y = (t.clone() for t in batches[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        train_step(graphed_model, graphed, static_x, static_y)  # warm-up: the first step, eagerly
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static_x.copy_(batches[1][0]), static_y.copy_(batches[1][1])
    with torch.cuda.graph(graph):
        train_step(graphed_model, graphed, static_x, static_y)  # capturing runs nothing: replay step 1 too
    for x, y in batches[1:]:
        static_x.copy_(x), static_y.copy_(y)
        graph.replay()
    torch.cuda.synchronize()
    assert (graphed.epoch, graphed.step_in_epoch) == (opt.epoch, opt.step_in_epoch) == (4, 1)
    assert graphed.rolled_back_epochs == opt.rolled_back_epochs
    torch.testing.assert_close(torch.tensor(graphed.lr_history), torch.tensor(opt.lr_history), rtol=1e-5, atol=0)
    for a, b in zip(graphed_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not math.isnan(graphed.lr)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize("safeguard", [True, False])
def test_group_added_mid_run_joins_the_estimate_as_with_host_counts(safeguard: bool, backend: str) -> None:
    """A group added mid-epoch (the model's last layer, frozen until then) joins the rule at the same epoch end,
    counted on the device, as with the host's counts: the same rates and weights over 5 epochs."""
    results = []
    for capturable in (False, True):
        model = _model()
        head = list(model[3].parameters())
        for p in head:
            p.requires_grad_(False)
        body = [p for p in model.parameters() if p.requires_grad]
        opt = BB(body, lr=0.3, steps_per_epoch=STEPS, backend=backend, safeguard=safeguard, capturable=capturable)
        for step in range(5 * STEPS):
            if step == STEPS + 2:
                for p in head:
                    p.requires_grad_(True)
                opt.add_param_group({"params": head})
            _step(model, opt, step)
        results.append((model, opt))
    (model, opt), (captured_model, captured) = results
    assert captured.lr_history == opt.lr_history and len(set(opt.lr_history[3:])) > 1
    for a, b in zip(model.parameters(), captured_model.parameters()):
        assert torch.equal(a, b)


def _quadratic_run(capturable: bool, backend: str = "eager", **kwargs) -> tuple[torch.Tensor, list[float]]:
    """25 epochs of 3 steps on a float64 quadratic: the weights and the rate history."""
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.randn(32, dtype=torch.float64))
    opt = BB([theta], lr=1.0, steps_per_epoch=3, backend=backend, capturable=capturable, **kwargs)
    for _ in range(75):
        opt.zero_grad()
        loss = (theta.square() * torch.linspace(0.1, 3.0, 32, dtype=torch.float64)).sum()
        loss.backward()
        opt.step(loss=loss)
    return theta.detach().clone(), opt.lr_history


def test_capturable_rates_match_at_every_epoch_bound() -> None:
    """The paper's mode: τ/(k+2) is one float64 division with the epoch counted on the host or on the device: float64
    weights and the rate history agree over 25 epochs whose rates sit on the bounds, at epochs where τ · (1/(k+2))
    would round differently (τ = 0.1 at k = 3, 5, 8, 12, 18; τ = 0.3 at k = 5, 11, 12, 17, 19, 24). The default
    control has no epoch-dependent bounds: its epoch-dependent factor is the end phase's (the next test)."""
    taus = dict(safeguard=False, tau0=0.1, tau_min=0.1, tau_max=0.3)
    theta, history = _quadratic_run(False, **taus)
    captured_theta, captured_history = _quadratic_run(True, **taus)
    assert captured_history == history and torch.equal(captured_theta, theta)
    rounding_apart = {0.1 / (k + 2) for k in (3, 5, 8, 12, 18)} | {0.3 / (k + 2) for k in (5, 11, 12, 17, 19, 24)}
    assert sum(rate in rounding_apart for rate in history) >= 3


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_capturable_end_phase_matches_the_host_counted_one(backend: str) -> None:
    """The default control's epoch-dependent factor is the end phase's cosine over the second half of the planned
    epochs: with the epoch counted on the host or on the device, float64 weights and the rate history agree bit for
    bit over a 25-epoch plan (the module docstring's promise), through every annealed epoch."""
    epochs = 25
    theta, history = _quadratic_run(False, backend, epochs=epochs, tau_min=0.1, tau_max=0.3)
    captured_theta, captured_history = _quadratic_run(True, backend, epochs=epochs, tau_min=0.1, tau_max=0.3)
    assert len(history) == epochs and history[-1] < 0.05 * history[epochs // 2 - 1]  # the run went through the end
    assert captured_history == history and torch.equal(captured_theta, theta)


def _ranks_capturable_and_not(rank: int, world: int, init_file: str, results: str, backend: str) -> None:
    """Each rank trains one DDP model with and one without capturable (η0 = 5: rollbacks) and records both."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        runs = {}
        for capturable in (False, True):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            opt = BB(model.parameters(), lr=5.0, steps_per_epoch=4, backend=backend, capturable=capturable)
            for step in range(20):
                x, y = _batch(10 * step + rank)
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(ddp(x), y)
                loss.backward()
                opt.step(loss=loss)
            weights = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
            runs[str(capturable)] = {"lr": opt.lr_history, "rolled_back": opt.rolled_back_epochs, "weights": weights}
        with open(os.path.join(results, f"rank{rank}.json"), "w") as file:
            json.dump(runs, file)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_capturable_under_torch_distributed_decides_as_the_host_counted(tmp_path, backend: str) -> None:
    """Two gloo ranks: the capturable step all-reduces the loss sums at every step (flag-gated use) and decides
    exactly as the host-counted one, rollbacks included, on both ranks. On Triton the decision runs as torch ops
    (the loss sums are all-reduced inside it) under the Triton clock's launches."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = (2, str(tmp_path / "init"), str(tmp_path), backend)
    mp.spawn(_ranks_capturable_and_not, args=args, nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for runs in ranks:
        assert runs["True"] == runs["False"]
        assert runs["True"]["rolled_back"] and len(runs["True"]["lr"]) == 5
    assert ranks[0]["True"]["lr"] == ranks[1]["True"]["lr"]


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_a_scheduler_scales_the_capturable_rate_as_the_default_one(backend: str) -> None:
    """With capturable=True each group's "lr" is the rate tensor, which an lr_scheduler fills in place: the steps
    apply the value written and the period end takes it into the multiplier, so StepLR compounds over BB's own rate
    as without capturable (the rates agree to rounding: the default applies base·(w/base), capturable w itself), and
    a checkpoint saved right after a write keeps it."""
    runs = {}
    for capturable in (False, True):
        model = _model()
        opt = _build(model, capturable, True, backend, 0.3)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        applied = []
        for step in range(3 * STEPS + 1):
            applied.append(float(opt.lr_tensor))
            _step(model, opt, step)
            scheduler.step()
        runs[capturable] = applied, opt.state_dict()["bb"], scheduler.get_last_lr()[0], opt.lr_history
    (rates, saved, last, history), (captured_rates, captured_saved, captured_last, captured_history) = runs.values()
    assert captured_rates == pytest.approx(rates, rel=1e-12) and captured_last == pytest.approx(last, rel=1e-12)
    assert captured_history == pytest.approx(history, rel=1e-12)
    assert captured_saved["lr_multiplier"] == pytest.approx(saved["lr_multiplier"], rel=1e-12)
    assert saved["lr_multiplier"] == pytest.approx(0.5**8, rel=1e-12)  # 16 scheduler steps of a halving every 2
    assert len(set(rates)) > 8  # BB's epoch ends and the scheduler's halvings both moved the rate


def test_a_capturable_rate_written_as_no_rate_is_undone_at_the_step_end() -> None:
    """A value that is not a finite number >= 0 filled into the capturable rate tensor cannot be refused on the
    host without a sync: the period end undoes it, and the rate is BB's again."""
    model = _model()
    opt = _build(model, True, True, "eager", 0.3)
    _step(model, opt, 0)
    before = float(opt.lr_tensor)
    opt.param_groups[0]["lr"].fill_(-1.0)
    _step(model, opt, 1)  # this step applies it; its end undoes it
    assert float(opt.lr_tensor) == before and opt.state_dict()["bb"]["lr_multiplier"] == 1.0
