"""A prototype for BB's default, not in the optimizer: BB's gradient average is the momentum buffer. The default's
momentum is in EMA form (m ← m + (1 − μ)(d − m)), so m is itself an average of the gradients, with factor 1 − μ = 0.1
where BB's own average has β = 4/T and restarts at every epoch end. If the estimate works from m, the step need not
keep a separate average: 20 bytes an fp32 element (read θ, grad, m; write θ, m), torch's fused SGD with momentum's
count, in place of 28. The prototype keeps both buffers and copies m over the average before each epoch-end pass, so
the estimate sees exactly what a shared buffer would hold. Runs are saved as the suite saves them, as method
``bb[shared-ema]``:

    python benchmarks/results/shared_ema_runs/shared_ema.py OUT_DIR SETTINGS SEEDS LRS
    python benchmarks/results/shared_ema_runs/shared_ema.py table   # beside the default, and the checks

Results: ../2026-12-05_cpu_shared_ema.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prototypes import prototype_main  # noqa: E402

from bbfused import buffer_set  # noqa: E402
from bbfused.control import safeguard  # noqa: E402

measure_as_shipped = buffer_set.BufferSet.measure


def measure(self, clock, partials=False):
    """The shipped pass, with every buffer's average replaced by its momentum buffer first."""
    for buffer in self.buffers:
        if buffer.momentum is not None:
            buffer.ema.copy_(buffer.momentum)
    return measure_as_shipped(self, clock, partials)


def install() -> None:
    """Patch the prototype into BB's default (the decision as torch ops: the Triton kernel is turned off)."""
    buffer_set.BufferSet.measure = measure
    safeguard.SafeguardControl._decision_kernels = lambda self, buffers: None


METHOD = "bb[shared-ema]"

if __name__ == "__main__":
    prototype_main(sys.argv, METHOD, Path(__file__).resolve().parent / "runs", install)
