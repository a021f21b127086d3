"""BB under torch.compile: its steps run eagerly, as a graph break, with a reason that names the fix."""

from __future__ import annotations

from collections.abc import Callable

import torch

_EAGER_REASON = (
    "bbfused.BB steps run eagerly: they are fused kernels already, and their epoch counting is host-side state a "
    "compiled graph would freeze. Compile the model (or the forward and backward) and call opt.step() and "
    "opt.zero_grad() outside a fullgraph=True region"
)


def eager_under_compile(method: Callable) -> Callable:
    """Keep ``method`` out of torch.compile's graphs: a compiled training step calls it eagerly (a graph break),
    and fullgraph=True fails with :data:`_EAGER_REASON`."""
    try:
        return torch.compiler.disable(method, reason=_EAGER_REASON)
    except TypeError:  # a torch whose disable() takes no reason
        return torch.compiler.disable(method)
