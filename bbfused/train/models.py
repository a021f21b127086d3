"""The networks the training command builds: the paper's shallow MLP and LeNet, and torchvision models by name.

torch and torchvision are imported by the functions that build: the command line reads the names and the
shallow networks' bounds without loading them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# Shallow networks, built here, and the bounds (tau_min, tau_max) the paper trains them with; deep networks get
# BB's own defaults.
SHALLOW_MODELS = ("mlp", "lenet")
SHALLOW_TAUS = (1 / 3, 3.0)


def torchvision_model_names() -> list[str]:
    """The classification models torchvision builds by name (resnet50, resnet18, vgg11, ...)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_names() -> list[str]:
    """Every name ``build_model`` accepts."""
    return [*SHALLOW_MODELS, *torchvision_model_names()]


def is_shallow(name: str) -> bool:
    """Whether the paper counts the model as shallow (its tau range 1/3..3) rather than deep (0.1..10)."""
    return name in SHALLOW_MODELS


def _lecun_init(model: nn.Module) -> None:
    """LeCun normal initialisation (weights ~ N(0, 1/fan_in), zero biases), as the paper does for MLP and LeNet."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            nn.init.normal_(module.weight, 0.0, 1.0 / math.sqrt(fan_in))
            nn.init.zeros_(module.bias)


def mlp(in_features: int = 784, num_classes: int = 10, hidden: int = 1024, dropout: float = 0.2) -> nn.Sequential:
    """The paper's MLP: in_features-1024-1024-num_classes with ReLU, and dropout after each hidden layer as in
    the authors' demo. Takes images of any shape (N, C, H, W) with C*H*W = in_features; returns logits (N, classes).
    1,863,690 parameters for MNIST."""
    from torch import nn

    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )
    _lecun_init(model)
    return model


def lenet(in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Sequential:
    """LeNet-5 with ReLU (conv 6@5x5, pool, conv 16@5x5, pool, fc 120, 84, classes): 62,006 parameters on
    3x32x32 CIFAR images as in the paper. Images smaller than 32 (MNIST's 28) are zero-padded to 32 by the
    first convolution, as in LeCun et al. (1998); larger ones give a wider first fully connected layer."""
    padding = max(0, (32 - image_size + 1) // 2)
    side = ((image_size + 2 * padding - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(
            f"lenet needs images of at least 12x12 pixels, got {image_size}x{image_size}; use larger images "
            f"(--image-size 12 or more)"
        )
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=padding),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side * side, 120),
        nn.ReLU(inplace=True),
        nn.Linear(120, 84),
        nn.ReLU(inplace=True),
        nn.Linear(84, num_classes),
    )
    _lecun_init(model)
    return model


def build_model(name: str, num_classes: int, in_channels: int, image_size: int, dropout: float = 0.2) -> nn.Module:
    """The model ``name`` (one of :func:`model_names`) for images of shape (in_channels, image_size, image_size).

    ``dropout`` applies to the MLP only. torchvision models are built untrained (weights=None) and need
    3-channel images."""
    import torchvision

    if name == "mlp":
        return mlp(in_channels * image_size * image_size, num_classes, dropout=dropout)
    if name == "lenet":
        return lenet(in_channels, num_classes, image_size)
    if name not in torchvision_model_names():
        raise ValueError(f"unknown model {name!r}; choose mlp, lenet or a torchvision model such as resnet50")
    if in_channels != 3:
        raise ValueError(
            f"torchvision model {name!r} expects 3-channel images but the data has {in_channels} channel(s); "
            f"use --model mlp or --model lenet for MNIST"
        )
    # GoogLeNet and Inception v3 train with auxiliary classifiers whose extra outputs the loss does not take.
    extra = {"aux_logits": False, "init_weights": True} if name in AUX_LOGIT_MODELS else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **extra)
    check_takes_images(model, name, in_channels, image_size, num_classes)
    return model


AUX_LOGIT_MODELS = ("googlenet", "inception_v3")


def check_takes_images(model: nn.Module, name: str, in_channels: int, image_size: int, num_classes: int) -> None:
    """Raise ValueError unless ``model`` maps two images of the data's shape to (2, num_classes) logits: a model
    that needs another image size fails here, before anything is trained or written, not at the first batch."""
    import torch

    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(2, in_channels, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"torchvision model {name!r} cannot take {image_size}x{image_size} images ({reason}); pass the "
            f"--image-size it was designed for (224 for most, 299 for inception_v3) or choose another model"
        ) from None
    finally:
        model.train(training)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2, num_classes):
        found = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"torchvision model {name!r} gives {found} for a batch of 2 images, not (2, {num_classes}) logits; "
            f"choose another model"
        )
