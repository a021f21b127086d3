"""A prototype, not in the optimizer: the Adam-scaled step (``BB(preconditioner="adam")``) with one second moment per
parameter tensor instead of one per element, as NovoGrad (Ginsburg et al., 2019) keeps it: v_t ← β₂ v_t + (1 − β₂)
mean(d_t²) over the tensor's elements. Every element of a tensor then steps by d / √v̂_t: the direction of SGD within
a tensor, with a tensor-wise scale that lets layers whose gradients are small (deep networks without normalisation,
at a small initialisation) move as fast as the others. BB's estimate is taken in the same metric as the Adam mode's.

The prototype runs on the eager backend: its step keeps v per element but writes each tensor's mean into every
element (the mean over a tensor of the element-wise EMA is the EMA of the tensor's mean square), so the measuring pass
and the checkpoints are the Adam mode's unchanged. Runs are saved as the suite saves them, as method ``bb[layer]``:

    python benchmarks/results/layer_scaling_runs/layer_scaling.py OUT_DIR SETTINGS SEEDS LRS
    python benchmarks/results/layer_scaling_runs/layer_scaling.py table     # beside the default and the Adam mode
"""

import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prototypes import adam_grid, load, side_by_side, train_runs  # noqa: E402

from bbfused import BB  # noqa: E402
from bbfused.backends import eager  # noqa: E402

# (first element's address, number of elements) of every parameter of the live optimizer.
SEGMENTS: list[tuple[int, int]] = []
_segment_index: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, int]] = {}
init_as_shipped = BB.__init__
step_as_shipped = eager.EagerBackend.step


@functools.wraps(init_as_shipped)  # keeps BB's signature: the suite reads it (epochs=)
def init(self, params, *args, **kwargs):
    init_as_shipped(self, params, *args, **kwargs)
    SEGMENTS.clear()
    _segment_index.clear()
    for group in self.param_groups:
        for p in group["params"]:
            SEGMENTS.append((p.data_ptr(), p.numel()))


def segments_of(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For a slice of a flat buffer: each element's parameter (padding: one segment of its own), each segment's
    number of elements, and the number of segments."""
    key = (flat.data_ptr(), flat.numel())
    if key not in _segment_index:
        start, size = flat.data_ptr(), flat.element_size()
        index = torch.full((flat.numel(),), -1, dtype=torch.long)
        count = 0
        for ptr, numel in SEGMENTS:
            first = (ptr - start) // size
            if 0 <= first < flat.numel():
                index[first : first + numel] = count
                count += 1
        index[index < 0] = count  # padding between parameters
        count += 1
        sizes = torch.bincount(index, minlength=count).clamp(min=1)
        _segment_index[key] = (index.to(flat.device), sizes.to(flat.device), count)
    return _segment_index[key]


def step(self, param, grad, ema, *, second_moment=None, beta2=0.0, **kwargs):
    """The eager step with v's per-tensor mean: the new v is β₂ v + (1 − β₂) mean_tensor(d²), written to every
    element (a v that is constant over each tensor stays so)."""
    if second_moment is None:
        return step_as_shipped(self, param, grad, ema, **kwargs)
    index, sizes, count = segments_of(param)
    d = grad.to(ema.dtype)
    if kwargs.get("grad_scale") is not None:
        d = d / kwargs["grad_scale"]
    if kwargs.get("weight_decay", 0) != 0:
        d = d + kwargs["weight_decay"] * param.to(ema.dtype)
    square = torch.nan_to_num(d * d, nan=float("inf"))
    mean = torch.zeros(count, dtype=square.dtype, device=square.device).index_add_(0, index, square) / sizes
    # The shipped step computes β₂ v + (1 − β₂) d² and steps by d / √v̂; given the per-tensor EMA as v and β₂ = 1 it
    # steps by the per-tensor scale. A non-finite mean keeps the old v, as the shipped step keeps it for such an
    # element (the step itself then skips the tensor's elements and counts them).
    assert kwargs.get("found_inf") is None, "the prototype does not model GradScaler's skipped steps"
    old = second_moment.clone()
    second_moment.copy_(beta2 * second_moment + (1.0 - beta2) * mean[index])
    result = step_as_shipped(self, param, grad, ema, second_moment=second_moment, beta2=1.0, **kwargs)
    torch.where(torch.isfinite(second_moment), second_moment, old, out=second_moment)
    return result


def install() -> None:
    BB.__init__ = init
    eager.EagerBackend.step = step
    check_as_shipped = eager.check_second_moment_arguments
    # β₂ = 1 is this prototype's way of passing the per-tensor v through the shipped step.
    eager.check_second_moment_arguments = lambda v, c, beta2=0.5: check_as_shipped(v, c, 0.5 if beta2 == 1.0 else beta2)


METHOD = "bb[layer]"
KWARGS = {"preconditioner": "adam", "backend": "eager"}

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    if sys.argv[1:2] == ["table"]:
        references, runs = load([here / "runs"])
        runs.update(adam_grid(here.parent / "preconditioner_intel_runs" / "runs", "bb[adam]", (0, 1)))
        runs.update(adam_grid(here / "runs", METHOD, (0, 1), source=METHOD))
        side_by_side(references, runs, ["bb", "bb[adam]", METHOD])
    else:
        install()
        train_runs(*sys.argv[1:5], METHOD, KWARGS)
