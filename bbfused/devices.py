"""Moving the optimizer's small tensors (rates, flags, sums) between devices without needless syncs."""

from __future__ import annotations

import torch


def on(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """``tensor`` on ``device`` (GradScaler keeps its tensors on one device, the rate control on the master); None
    stays None."""
    if tensor is None or tensor.device == device:
        return tensor
    # Asynchronous only towards a GPU: a non-blocking copy to the CPU could be read before it has landed.
    return tensor.to(device, non_blocking=device.type == "cuda")
