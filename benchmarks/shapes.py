"""Parameter shapes of the benchmarked models: ResNet-50, ResNet-18, the paper's MLP, one large flat tensor.

Only shapes are kept (no weights): the optimizer's cost depends on the number of tensors and their sizes.
The ResNets come from torchvision built on the meta device, so nothing is allocated or initialised.
"""

from __future__ import annotations

import torch
import torchvision

Shapes = list[tuple[int, ...]]

# The paper's MNIST network, 784-1024-1024-10: (weight, bias) per linear layer, torch.nn.Linear layout.
MLP_LAYERS = (784, 1024, 1024, 10)


def torchvision_shapes(name: str) -> Shapes:
    """The shapes of ``torchvision.models.<name>(weights=None).parameters()``, in model order."""
    with torch.device("meta"):
        model = getattr(torchvision.models, name)(weights=None)
    return [tuple(p.shape) for p in model.parameters()]


def mlp_shapes() -> Shapes:
    """784-1024-1024-10: 6 tensors, 1,863,690 values."""
    shapes: Shapes = []
    for fan_in, fan_out in zip(MLP_LAYERS[:-1], MLP_LAYERS[1:]):
        shapes += [(fan_out, fan_in), (fan_out,)]
    return shapes


def flat_shapes(log2_numel: int) -> Shapes:
    """One 1-D tensor of 2**log2_numel values."""
    return [(2**log2_numel,)]


def parameter_set(name: str, flat_log2: int = 27) -> Shapes:
    """The shapes of parameter set ``name`` ("resnet50", "resnet18", "mlp" or "flat")."""
    if name in ("resnet50", "resnet18"):
        return torchvision_shapes(name)
    if name == "mlp":
        return mlp_shapes()
    if name == "flat":
        return flat_shapes(flat_log2)
    raise ValueError(f"unknown parameter set {name!r}; choose one of {', '.join(PARAMETER_SETS)}")


PARAMETER_SETS = ("resnet50", "resnet18", "mlp", "flat")
