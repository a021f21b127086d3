"""BB inside torch.compile'd training steps (CPU): the eager trajectory, and a clear error under fullgraph=True."""

from __future__ import annotations

import warnings

import pytest
import torch

from bbfused import BB

STEPS = 6  # per epoch; three epochs, so the rule sets two rates


def model_and_optimizer(backend: str) -> tuple[torch.nn.Module, BB]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return model, BB(model.parameters(), lr=0.1, steps_per_epoch=STEPS, backend=backend)


def train(backend: str, compiled: bool) -> tuple[BB, list[torch.Tensor]]:
    model, opt = model_and_optimizer(backend)

    def training_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)
        opt.zero_grad()
        return loss

    step = torch.compile(training_step) if compiled else training_step
    generator = torch.Generator().manual_seed(1)
    for _ in range(3 * STEPS):
        step(torch.randn(5, 8, generator=generator), torch.randint(0, 3, (5,), generator=generator))
    return opt, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", ["eager", "cpp"])
def test_compiled_training_step_follows_the_eager_trajectory(backend: str) -> None:
    torch._dynamo.reset()
    eager, eager_params = train(backend, compiled=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled, compiled_params = train(backend, compiled=True)
    # e.g. "Remove the scheduler": a compiled step must not make BB think its rate was changed.
    assert not [str(w.message) for w in caught if "bbfused" in str(w.message)]
    assert compiled.epoch == eager.epoch == 3 and compiled.step_in_epoch == 0
    assert compiled.lr_history == pytest.approx(eager.lr_history, rel=1e-5)
    assert compiled.lr_history[2] != compiled.lr_history[0]  # the rule ran
    for a, b in zip(compiled_params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fullgraph_step_names_what_to_compile_instead() -> None:
    torch._dynamo.reset()
    model, opt = model_and_optimizer("eager")
    torch.nn.functional.cross_entropy(model(torch.randn(5, 8)), torch.randint(0, 3, (5,))).backward()
    with pytest.raises(Exception, match="Compile the model") as raised:
        torch.compile(opt.step, fullgraph=True)()
    assert "bbfused.BB" in str(raised.value)
    assert opt.step_in_epoch == 0  # nothing ran
