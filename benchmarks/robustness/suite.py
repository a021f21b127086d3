"""The robustness suite: if a user had not used BB, what would they have run, and how far is BB's default from it?

Each run trains one model on one data set (a *setting*) with one optimizer (a *method*) from one initial rate η0
and seed, in a plain loop as a new user would write it (``opt.step(loss=loss)`` for BB, ``opt.track_buffers(model)``
so a rolled-back epoch also restores BatchNorm statistics; defaults otherwise), and saves one JSON file: the test
score, every epoch's mean training loss, time and rate, and for BB its rates and rolled-back epochs. Runs already
saved are not trained again, so the references are recorded once and the suite resumes where it stopped.

    python benchmarks/robustness/suite.py --methods references --jobs 1   # the references (once)
    python benchmarks/robustness/suite.py --methods bb --settings dev     # BB's default on the dev settings
    python benchmarks/robustness/suite.py --variant mom --bb-kwargs '{"momentum": 0.9}'   # runs of "bb[mom]"
    python benchmarks/robustness/suite.py --quick --out /tmp/r            # a smoke test on tiny settings

Methods. ``bb``: BB's default (``epochs=`` the setting's epochs when BB takes it); ``bb-paper``: the paper's BB
(``safeguard=False``); ``bb[NAME]``: BB's default with the constructor arguments of ``--bb-kwargs``. The
references: ``sgdm`` / ``adam`` torch SGD (momentum 0.9) and Adam at a constant rate η0; ``sgdm-cosine`` /
``adamw-cosine`` the same with cosine annealing to 0 over the run (stepped per epoch; AdamW at torch's default
decoupled weight decay 0.01, not the setting's); ``prodigy`` / ``dadapt-sgd`` (momentum 0.9) with η0 as their initial
estimate d0 and lr 1; ``schedulefree-sgd`` (momentum 0.9) with lr η0; and ``prodigy-default``,
``dadapt-sgd-default``, ``schedulefree-sgd-default`` at their documented defaults (d0 = 1e-6 and lr 1; lr 1), run once
per seed (η0 "default"). Every method gets the setting's weight decay (but AdamW, above) and, where the setting clips
gradients, the same clipping.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import inspect
import json
import math
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Union

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing: use the checkout's package

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bbfused import BB  # noqa: E402
from bbfused.train.data import MNIST_MEAN, MNIST_STD, load_mnist, subset_indices  # noqa: E402
from bbfused.train.models import lenet, mlp  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
RUNS = RESULTS / "robustness_runs"
LRS = (1e-3, 1e-2, 0.1, 1.0, 10.0)
SEEDS = (0, 1)
# η0 of a method run at its documented defaults: it takes no initial rate.
DEFAULT_LR = "default"
LR = Union[float, str]  # an η0, or DEFAULT_LR

BB_METHODS = ("bb", "bb-paper")
SWEPT_REFERENCES = ("sgdm", "adam", "sgdm-cosine", "adamw-cosine", "prodigy", "dadapt-sgd", "schedulefree-sgd")
DEFAULT_REFERENCES = ("prodigy-default", "dadapt-sgd-default", "schedulefree-sgd-default")
# What a user would otherwise have run: the best of these, tuned, is what BB is measured against.
REFERENCES = (*SWEPT_REFERENCES, *DEFAULT_REFERENCES)
PEERS = REFERENCES
METHODS = (*BB_METHODS, *REFERENCES)
METHOD_GROUPS = {"all": METHODS, "references": REFERENCES, "defaults": DEFAULT_REFERENCES}
# torch.optim.AdamW's own default: a user switching to AdamW keeps it rather than the SGD settings' L2 of 5e-4.
ADAMW_WEIGHT_DECAY = 0.01
# Schedule-Free's README: recompute BatchNorm statistics at the averaged weights on up to 50 training batches.
SCHEDULEFREE_BN_BATCHES = 50
# A variant's name goes into file names between underscores: letters, digits, dots and dashes only.
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,39}")
# BB arguments the suite sets from the run itself; a variant may not replace them.
SUITE_BB_ARGUMENTS = ("params", "lr", "steps_per_epoch")
# What a run's final score must beat to count as trained: 11.35 % is MNIST's largest class (chance).
COLLAPSE_ACCURACY = 0.5


@dataclass(frozen=True)
class Setting:
    """One model on one data set: ``train_limit`` training samples (None: all), batches of ``batch_size``.

    ``task`` "classify" scores the test accuracy (%); "regress" the explained variance 100 (1 - MSE / Var) (%) of
    the test targets. ``label_noise``: the fraction of training labels replaced by a uniformly random class (the
    test labels stay clean). ``clip_grad_norm``: every method's gradients are clipped to this norm before each step.
    ``holdout``: the settings a default policy is not tuned on.
    """

    name: str
    model: str
    data: str
    batch_size: int
    epochs: int
    weight_decay: float
    train_limit: int | None
    description: str
    task: str = "classify"
    label_noise: float = 0.0
    clip_grad_norm: float | None = None
    holdout: bool = False

    def steps_per_epoch(self, quick: bool = False) -> int:
        """Full batches per epoch (a last partial batch is dropped)."""
        return train_size(self, quick) // batch_size(self, quick)


SETTINGS = {
    s.name: s
    for s in (
        Setting("mlp", "mlp", "mnist", 128, 5, 5e-4, 10_000, "the paper's MLP 784-1024-1024-10 (dropout 0.2)"),
        Setting("lenet", "lenet", "mnist", 128, 6, 5e-4, 10_000, "LeNet-5 with ReLU"),
        Setting(
            "bn-cnn", "bn_cnn", "mnist", 256, 6, 5e-4, 20_000,
            "conv8-BN-pool, conv16-BN-pool, fc128, fc10: few steps an epoch",
        ),
        Setting("mlp-batch32", "small_mlp", "mnist", 32, 4, 0.0, 20_000, "MLP 784-512-10, batch 32", holdout=True),
        Setting("digits", "digits_mlp", "digits", 32, 20, 0.0, None, "MLP 64-256-10 on scikit-learn's digits"),
        Setting("resnet18", "resnet18", "mnist", 64, 6, 5e-4, 4_000, "torchvision ResNet-18 (BatchNorm)"),
        # The new settings: small data and a long horizon, noisy labels, a large batch, no BatchNorm, a recurrent
        # net with clipping, a regression loss. Sizes keep a run under ~40 s on one thread.
        Setting(
            "small-long", "gap_cnn", "mnist", 64, 25, 5e-4, 1_216,
            "conv16-BN-pool, conv32-BN-pool, conv64-BN, global average pool, fc10: small data, long horizon",
        ),
        Setting(
            "label-noise", "gap_cnn", "mnist", 128, 12, 5e-4, 2_432,
            "the small-long CNN with 30 % of the training labels replaced by random classes",
            label_noise=0.3, holdout=True,
        ),
        Setting(
            "large-batch", "gap_cnn", "mnist", 512, 8, 5e-4, 6_144,
            "the small-long CNN with batches of 512: 12 steps an epoch",
        ),
        Setting(
            "tiny-vit", "tiny_vit", "mnist", 256, 10, 5e-4, 4_864,
            "ViT: 7x7 patches, width 64, 2 pre-LayerNorm blocks of 4 heads, no BatchNorm",
        ),
        Setting(
            "gru-rows", "gru_rows", "mnist", 128, 8, 0.0, 4_992,
            "GRU (hidden 64) reading the 28 image rows, gradients clipped to norm 1",
            clip_grad_norm=1.0, holdout=True,
        ),
        Setting(
            "autoencoder", "autoencoder", "mnist", 128, 30, 0.0, 5_376,
            "MLP autoencoder 784-256-32-256-784, MSE on pixels in [0, 1]", task="regress",
        ),
        # Holdout settings no constant of the default policy was chosen on: a deep net without normalisation, a CNN
        # without BatchNorm on tiny images.
        Setting(
            "deep-tanh", "deep_tanh", "mnist", 64, 6, 0.0, 6_016,
            "MLP 784-256-256-256-256-256-10 with tanh, no normalisation", holdout=True,
        ),
        Setting(
            "digits-cnn", "digits_cnn", "digits", 16, 15, 5e-4, None,
            "conv16-ReLU, conv32-ReLU-pool, fc10 on the digits' 8x8 images, no BatchNorm", holdout=True,
        ),
        # Holdout settings no constant of the default policy, nor of the preconditioned prototype
        # (benchmarks/results/2026-12-05_cpu_preconditioned_prototype.md), was chosen on.
        Setting(
            "logistic", "logistic", "mnist", 50, 10, 0.0, 5_000,
            "logistic regression 784-10: a convex problem", holdout=True,
        ),
        Setting(
            "ln-mlp-digits", "ln_mlp", "digits", 8, 8, 0.0, None,
            "MLP 64-128-128-10 with LayerNorm and GELU on the digits, batches of 8", holdout=True,
        ),
        # Holdout settings chosen before the preconditioned mode (BB(preconditioner="adam")) ran on them: a token
        # mixer without attention, an LSTM without clipping, a second regression.
        Setting(
            "mixer", "mixer", "mnist", 128, 8, 5e-4, 3_072,
            "MLP-Mixer: 7x7 patches, width 64, 2 pre-LayerNorm blocks (token and channel MLPs), no BatchNorm",
            holdout=True,
        ),
        Setting(
            "lstm-digits", "lstm_rows", "digits", 32, 15, 0.0, None,
            "LSTM (hidden 32) reading the digits' 8 rows, no clipping", holdout=True,
        ),
        Setting(
            "digits-ae", "digits_autoencoder", "digits", 32, 25, 0.0, None,
            "MLP autoencoder 64-128-8-128-64 on the digits, MSE on pixels in [0, 1]", task="regress", holdout=True,
        ),
        # Holdout settings chosen before the preconditioned control's first-epoch rise rule ran on them: a deep net
        # without normalisation of another activation and depth, a BatchNorm CNN with 10 steps an epoch, noisy
        # labels on another data set.
        Setting(
            "deep-relu-digits", "deep_relu_digits", "digits", 16, 12, 0.0, None,
            "MLP 64-(128 ReLU)x6-10 on the digits, no normalisation", holdout=True,
        ),
        Setting(
            "deep-gelu", "deep_gelu", "mnist", 128, 8, 0.0, 5_120,
            "MLP 784-(256 GELU)x4-10, no normalisation", holdout=True,
        ),
        Setting(
            "bn-digits-large", "digits_bn_cnn", "digits", 128, 20, 5e-4, None,
            "conv16-BN-ReLU, conv32-BN-ReLU-pool, fc10 on the digits, batches of 128: 10 steps an epoch",
            holdout=True,
        ),
        Setting(
            "noisy-digits", "digits_mlp", "digits", 32, 20, 0.0, None,
            "the digits MLP with 20 % of the training labels replaced by random classes", label_noise=0.2,
            holdout=True,
        ),
        # Holdout settings chosen before the rise rule's exemption for a loss still on its start ran on them:
        # networks that sit on the initial loss for a while, where a rate too large kills them without a rise of
        # the loss.
        Setting(
            "deep-relu-mnist", "deep_relu_mnist", "mnist", 64, 6, 0.0, 4_096,
            "MLP 784-(128 ReLU)x8-10, no normalisation", holdout=True,
        ),
        Setting(
            "deep-cnn-digits", "deep_cnn_digits", "digits", 32, 15, 5e-4, None,
            "five conv16-ReLU layers, pool, fc10 on the digits, no normalisation", holdout=True,
        ),
        # Holdout settings chosen before a rule that reads which gradient values are exactly zero (ReLU units that
        # died) ran on them: a wider deep ReLU net, and an autoencoder with a deeper, narrow ReLU bottleneck.
        Setting(
            "deep-relu-wide", "deep_relu_wide", "digits", 32, 12, 0.0, None,
            "MLP 64-(256 ReLU)x8-10 on the digits, no normalisation", holdout=True,
        ),
        Setting(
            "narrow-ae-mnist", "narrow_autoencoder", "mnist", 128, 15, 0.0, 4_096,
            "MLP autoencoder 784-256-64-8-64-256-784 with ReLU, MSE on pixels", task="regress", holdout=True,
        ),
        # Holdout settings chosen before the dead-unit rule's final version ran on them (and before its loss condition
        # was tried): a deep ReLU net of another depth and batch on MNIST, and a three-layer ReLU net with noisy
        # labels, where many units may stop without harm.
        Setting(
            "deep-relu-mnist-b32", "deep_relu_mnist_6", "mnist", 32, 8, 0.0, 2_048,
            "MLP 784-(128 ReLU)x6-10, batches of 32, no normalisation", holdout=True,
        ),
        Setting(
            "noisy-relu-digits", "relu_mlp_digits_3", "digits", 32, 15, 0.0, None,
            "MLP 64-(128 ReLU)x3-10 with 30 % of the training labels replaced by random classes", label_noise=0.3,
            holdout=True,
        ),
        # Holdout settings chosen, and their references recorded, before any BB method ran on them: normalisation
        # other than BatchNorm (GroupNorm in a CNN, LayerNorm in a residual MLP) and a wide MLP with dropout.
        Setting(
            "gn-cnn", "gn_cnn", "mnist", 64, 10, 5e-4, 2_432,
            "conv16-GN-ReLU-pool, conv32-GN-ReLU-pool, conv64-GN-ReLU, global average pool, fc10 (GroupNorm, 4 groups)",
            holdout=True,
        ),
        Setting(
            "resmlp-ln", "residual_ln_mlp", "mnist", 64, 8, 0.0, 4_096,
            "MLP 784-128, three residual pre-LayerNorm blocks 128-256-128 (GELU), LayerNorm, fc10", holdout=True,
        ),
        Setting(
            "dropout-digits", "wide_dropout_digits", "digits", 16, 15, 5e-4, None,
            "MLP 64-512-512-10 with ReLU and dropout 0.3 on the digits, batches of 16", holdout=True,
        ),
        # Holdout settings with hundreds of steps an epoch, as an ImageNet epoch has thousands (the others have 10-170,
        # where the estimate's momentum bias is largest), chosen and their references recorded before any BB method
        # ran on them.
        Setting(
            "long-digits", "digits_mlp", "digits", 4, 8, 0.0, None,
            "the digits MLP with batches of 4: 336 steps an epoch", holdout=True,
        ),
        Setting(
            "long-bn-cnn", "gap_cnn", "mnist", 32, 4, 5e-4, 12_288,
            "the small-long CNN (BatchNorm) with batches of 32: 384 steps an epoch", holdout=True,
        ),
        Setting(
            "long-gn-cnn", "gn_cnn", "mnist", 32, 4, 5e-4, 12_288,
            "the GroupNorm CNN with batches of 32: 384 steps an epoch", holdout=True,
        ),
        # Holdout settings chosen, and their references recorded, before any BB method ran on them, to judge rules for
        # the first epoch's search: CNNs whose normalisation is not BatchNorm, or which have none, at 38-42 steps an
        # epoch.
        Setting(
            "ln-cnn", "ln_cnn", "mnist", 64, 10, 5e-4, 2_432,
            "the GroupNorm CNN with one group a layer (LayerNorm over channels and positions)", holdout=True,
        ),
        Setting(
            "gn-digits-cnn", "gn_digits_cnn", "digits", 32, 15, 5e-4, None,
            "conv16-GN-ReLU, conv32-GN-ReLU-pool, fc10 on the digits (GroupNorm, 4 groups)", holdout=True,
        ),
        Setting(
            "res-cnn", "residual_cnn", "mnist", 64, 10, 5e-4, 2_432,
            "conv16-ReLU-pool, two residual blocks conv16-ReLU-conv16, pool, global average pool, fc10; no "
            "normalisation", holdout=True,
        ),
    )
}  # fmt: skip
OLD_SETTINGS = ("mlp", "lenet", "bn-cnn", "mlp-batch32", "digits", "resnet18")
SETTING_GROUPS = {
    "all": tuple(SETTINGS),
    "dev": tuple(name for name, s in SETTINGS.items() if not s.holdout),
    "holdout": tuple(name for name, s in SETTINGS.items() if s.holdout),
    "old": OLD_SETTINGS,
    "new": tuple(name for name in SETTINGS if name not in OLD_SETTINGS),
}
# --quick: every setting's model on a few hundred samples for two epochs (a smoke test of the harness).
QUICK_LIMIT, QUICK_EPOCHS = 512, 2


def train_size(setting: Setting, quick: bool = False) -> int:
    if quick:
        return QUICK_LIMIT
    if setting.train_limit is not None:
        return setting.train_limit
    return 1347 if setting.data == "digits" else 60_000


def batch_size(setting: Setting, quick: bool = False) -> int:
    # --quick: at least two steps an epoch, also for the large-batch setting.
    return min(setting.batch_size, QUICK_LIMIT // 2) if quick else setting.batch_size


# ----------------------------------------------------------------------------------------------- models
def bn_cnn() -> nn.Sequential:
    """A small BatchNorm CNN: conv8-BN-ReLU-pool, conv16-BN-ReLU-pool, fc128, fc10."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip


def gap_cnn(width: int = 16) -> nn.Sequential:
    """A BatchNorm CNN with global average pooling (no large fully connected layer): 23,818 parameters."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.BatchNorm2d(4 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10),
    )  # fmt: skip


class TinyViT(nn.Module):
    """A vision transformer without BatchNorm: 7x7 patches (16 tokens and a class token), learned positions,
    ``depth`` pre-LayerNorm encoder blocks (GELU, no dropout), a final LayerNorm and a linear head."""

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, patch: int = 7, image: int = 28) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, width, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.position = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, width))
        # A ModuleList rather than nn.TransformerEncoder: the latter warns about nested tensors with norm_first.
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 2 * width, 0.0, "gelu", batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(images).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], 1) + self.position
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens[:, 0]))


class GRURows(nn.Module):
    """A one-layer GRU that reads an image's rows as a sequence; a linear head on its last hidden state."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.rnn = nn.GRU(28, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, last = self.rnn(images.reshape(len(images), 28, 28))
        return self.head(last[-1])


class MixerBlock(nn.Module):
    """One MLP-Mixer block: a pre-LayerNorm token-mixing MLP, then a pre-LayerNorm channel MLP, both residual."""

    def __init__(self, tokens: int, width: int, token_hidden: int, channel_hidden: int) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(width)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens))
        self.channel_norm = nn.LayerNorm(width)
        self.channel_mlp = nn.Sequential(nn.Linear(width, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.channel_norm(x))


class Mixer(nn.Module):
    """An MLP-Mixer (Tolstikhin et al.) on 7x7 patches: no attention, no BatchNorm; mean-pooled tokens, a head."""

    def __init__(self, width: int = 64, depth: int = 2, patch: int = 7, image: int = 28) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.embed = nn.Conv2d(1, width, patch, stride=patch)
        self.blocks = nn.Sequential(*(MixerBlock(tokens, width, 32, 2 * width) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.blocks(self.embed(images).flatten(2).transpose(1, 2))
        return self.head(self.norm(tokens).mean(1))


class LSTMRows(nn.Module):
    """A one-layer LSTM that reads the flat 8x8 digits as 8 rows; a linear head on its last hidden state."""

    def __init__(self, hidden: int = 32, rows: int = 8) -> None:
        super().__init__()
        self.rows = rows
        self.rnn = nn.LSTM(rows, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, (last, _) = self.rnn(images.reshape(len(images), self.rows, -1))
        return self.head(last[-1])


def digits_autoencoder() -> nn.Sequential:
    """An MLP autoencoder 64-128-8-128-64 with ReLU for the 8x8 digits; a linear output."""
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8), nn.ReLU(), nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 64),
    )  # fmt: skip


def narrow_autoencoder() -> nn.Sequential:
    """An MLP autoencoder 784-256-64-8-64-256-784 with ReLU: a deeper encoder into an 8-unit bottleneck."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 8), nn.ReLU(),
        nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 784),
    )  # fmt: skip


def plain_mlp(inputs: int, width: int, depth: int, activation: Callable[[], nn.Module]) -> nn.Sequential:
    """An MLP of ``depth`` hidden layers without normalisation: gradients shrink or grow with depth."""
    layers: list[nn.Module] = [nn.Flatten()]
    for index in range(depth):
        layers += [nn.Linear(inputs if index == 0 else width, width), activation()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def deep_tanh(width: int = 256, depth: int = 5) -> nn.Sequential:
    """An MLP of ``depth`` tanh layers on MNIST without normalisation."""
    return plain_mlp(784, width, depth, nn.Tanh)


def ln_mlp(width: int = 128) -> nn.Sequential:
    """An MLP with LayerNorm and GELU on the flat 8x8 digits."""
    return nn.Sequential(
        nn.Linear(64, width), nn.LayerNorm(width), nn.GELU(),
        nn.Linear(width, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, 10),
    )  # fmt: skip


def digits_cnn() -> nn.Sequential:
    """A CNN without BatchNorm on the 8x8 digits (given flat, as the digits MLP takes them)."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip


def normed_digits_cnn(norm: Callable[[int], nn.Module]) -> nn.Sequential:
    """The digits CNN with ``norm(channels)`` after each convolution."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), norm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), norm(32), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip


def digits_bn_cnn() -> nn.Sequential:
    """The digits CNN with BatchNorm after each convolution."""
    return normed_digits_cnn(nn.BatchNorm2d)


def deep_cnn_digits(width: int = 16, depth: int = 5) -> nn.Sequential:
    """A CNN of ``depth`` 3x3 ReLU convolutions without normalisation on the 8x8 digits."""
    layers: list[nn.Module] = [nn.Unflatten(1, (1, 8, 8))]
    for index in range(depth):
        layers += [nn.Conv2d(1 if index == 0 else width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2), nn.Flatten(), nn.Linear(width * 4 * 4, 10))


def gn_cnn(width: int = 16, groups: int = 4) -> nn.Sequential:
    """:func:`gap_cnn` with GroupNorm in place of BatchNorm: no batch statistics, no running buffers."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.GroupNorm(groups, width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(groups, 2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.GroupNorm(groups, 4 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10),
    )  # fmt: skip


class ResidualBlock(nn.Module):
    """x + MLP(LayerNorm(x)): a transformer's feed-forward half without attention."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def residual_ln_mlp(width: int = 128, depth: int = 3) -> nn.Sequential:
    """An MLP of ``depth`` residual pre-LayerNorm blocks on the flat MNIST images."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, width), *(ResidualBlock(width, 2 * width) for _ in range(depth)),
        nn.LayerNorm(width), nn.Linear(width, 10),
    )  # fmt: skip


def wide_dropout_digits(width: int = 512, dropout: float = 0.3) -> nn.Sequential:
    """A wide two-layer ReLU MLP with dropout on the flat 8x8 digits."""
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(width, 10),
    )  # fmt: skip


def gn_digits_cnn(groups: int = 4) -> nn.Sequential:
    """The digits CNN with GroupNorm after each convolution."""
    return normed_digits_cnn(lambda channels: nn.GroupNorm(groups, channels))


class ResidualConvBlock(nn.Module):
    """ReLU(x + conv(ReLU(conv(x)))): a residual block without normalisation."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


def residual_cnn(width: int = 16) -> nn.Sequential:
    """A small residual CNN without normalisation on MNIST."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), ResidualConvBlock(width),
        ResidualConvBlock(width), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )  # fmt: skip


def autoencoder() -> nn.Sequential:
    """An MLP autoencoder 784-256-32-256-784 with ReLU; a linear output (the pixels' reconstruction)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 32), nn.ReLU(),
        nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 784),
    )  # fmt: skip


def build_model(name: str) -> nn.Module:
    import torchvision

    builders: dict[str, Callable[[], nn.Module]] = {
        "mlp": mlp,
        "lenet": lenet,
        "bn_cnn": bn_cnn,
        "small_mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10)),
        "digits_mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)),
        "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
        "gap_cnn": gap_cnn,
        "tiny_vit": TinyViT,
        "gru_rows": GRURows,
        "autoencoder": autoencoder,
        "deep_tanh": deep_tanh,
        "digits_cnn": digits_cnn,
        "logistic": lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10)),
        "ln_mlp": ln_mlp,
        "mixer": Mixer,
        "lstm_rows": LSTMRows,
        "digits_autoencoder": digits_autoencoder,
        "deep_relu_digits": lambda: plain_mlp(64, 128, 6, nn.ReLU),
        "deep_gelu": lambda: plain_mlp(784, 256, 4, nn.GELU),
        "digits_bn_cnn": digits_bn_cnn,
        "deep_relu_mnist": lambda: plain_mlp(784, 128, 8, nn.ReLU),
        "deep_cnn_digits": deep_cnn_digits,
        "deep_relu_wide": lambda: plain_mlp(64, 256, 8, nn.ReLU),
        "narrow_autoencoder": narrow_autoencoder,
        "deep_relu_mnist_6": lambda: plain_mlp(784, 128, 6, nn.ReLU),
        "relu_mlp_digits_3": lambda: plain_mlp(64, 128, 3, nn.ReLU),
        "gn_cnn": gn_cnn,
        "residual_ln_mlp": residual_ln_mlp,
        "wide_dropout_digits": wide_dropout_digits,
        "ln_cnn": lambda: gn_cnn(groups=1),
        "gn_digits_cnn": gn_digits_cnn,
        "residual_cnn": residual_cnn,
    }
    return builders[name]()


# ----------------------------------------------------------------------------------------------- data
Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def load_data(setting: Setting, seed: int, quick: bool) -> Tensors:
    """(train inputs, train targets, test inputs, test targets): float32 inputs; int64 labels, or for a
    regression setting float32 targets. The training subset and its label noise depend on the seed."""
    limit = QUICK_LIMIT if quick else setting.train_limit
    if setting.data == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.int64)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1234))
        split = 1347  # 75 % train, 25 % test, fixed across seeds
        if setting.task == "regress":
            # The autoencoder reconstructs the pixels in [0, 1] from themselves.
            images = images[order]
            train_x, test_x = images[: limit if quick else split], images[split:]
            return train_x, train_x, test_x, test_x
        images, labels = (images[order] - 0.3) / 0.4, labels[order]
        train_x, train_y, test_x, test_y = images[:split], labels[:split], images[split:], labels[split:]
        if quick:
            train_x, train_y = train_x[:limit], train_y[:limit]
        return train_x, add_label_noise(train_y, setting.label_noise, seed), test_x, test_y
    train_x, train_y, test_x, test_y = _mnist()
    chosen = subset_indices(len(train_y), limit, seed)
    if chosen is not None:
        train_x, train_y = train_x[chosen], train_y[chosen]
    if quick:
        test_x, test_y = test_x[:limit], test_y[:limit]
    if setting.task == "regress":
        # The autoencoder reconstructs the pixels in [0, 1] from themselves.
        train_x, test_x = train_x.float() / 255.0, test_x.float() / 255.0
        return train_x, train_x.flatten(1), test_x, test_x.flatten(1)

    def normalise(images: torch.Tensor) -> torch.Tensor:
        images = (images.float() / 255.0 - MNIST_MEAN) / MNIST_STD
        return images.expand(-1, 3, -1, -1).contiguous() if setting.model == "resnet18" else images

    return normalise(train_x), add_label_noise(train_y, setting.label_noise, seed), normalise(test_x), test_y


@functools.lru_cache(maxsize=1)
def _mnist() -> Tensors:
    """MNIST, read and checked once per process (a worker trains many runs); callers never modify it in place."""
    return load_mnist()


def add_label_noise(labels: torch.Tensor, fraction: float, seed: int, classes: int = 10) -> torch.Tensor:
    """``labels`` with each one, with probability ``fraction``, replaced by a uniformly random class (possibly
    its own); the draw depends on the seed only."""
    if fraction <= 0:
        return labels
    generator = torch.Generator().manual_seed(10_000 + seed)  # a stream of its own, apart from the subset's
    replaced = torch.rand(len(labels), generator=generator) < fraction
    random = torch.randint(0, classes, (len(labels),), generator=generator)
    return torch.where(replaced, random, labels)


# ----------------------------------------------------------------------------------------------- methods
def variant_method(name: str) -> str:
    """The method name of BB's variant ``name``: ``bb[name]``."""
    return f"bb[{name}]"


def variant_of(method: str) -> str | None:
    """The variant name of ``bb[name]``; None for any other method."""
    match = re.fullmatch(r"bb\[(.+)\]", method)
    return match.group(1) if match else None


def is_bb(method: str) -> bool:
    """BB's default, the paper's BB and BB's variants (the methods measured against the references)."""
    return method in BB_METHODS or variant_of(method) is not None


def file_method(method: str) -> str:
    """A method's name as it appears in run file names: ``bb[name]`` as ``bb+name`` (no glob characters)."""
    variant = variant_of(method)
    return f"bb+{variant}" if variant is not None else method


def bb_accepts_epochs() -> bool:
    """Whether this checkout's BB takes the run length (``epochs=``); older ones do not."""
    return "epochs" in inspect.signature(BB).parameters


def check_bb_kwargs(kwargs: dict[str, Any]) -> None:
    """Raise ValueError unless ``kwargs`` are keyword arguments BB takes and the suite does not set itself."""
    parameters = inspect.signature(BB).parameters
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise ValueError(
            f"BB takes no argument {', '.join(unknown)}; it takes {', '.join(p for p in parameters if p != 'params')}"
        )
    fixed = sorted(set(kwargs) & set(SUITE_BB_ARGUMENTS))
    if fixed:
        raise ValueError(f"the suite sets {', '.join(fixed)} itself (η0 is the grid's); a variant cannot")


def build_optimizer(
    method: str,
    model: nn.Module,
    lr: LR,
    steps_per_epoch: int,
    weight_decay: float,
    epochs: int,
    bb_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None, dict[str, Any]]:
    """The optimizer, its per-epoch scheduler (None without one) and, for BB, the keyword arguments it was built
    with (recorded, so a run shows whether BB got ``epochs=``)."""
    params = list(model.parameters())
    default = lr == DEFAULT_LR
    if default != method.endswith("-default"):
        raise ValueError(f"method {method} takes {'no η0' if method.endswith('-default') else 'a numeric η0'}")
    if is_bb(method):
        kwargs: dict[str, Any] = {"weight_decay": weight_decay, "safeguard": method != "bb-paper"}
        if bb_accepts_epochs():
            kwargs["epochs"] = epochs
        else:
            # An older checkout, or a wrapper of BB.__init__ that hides its signature: say so, the run differs.
            warnings.warn(f"BB's signature has no epochs=: {method} trains without an end phase", stacklevel=2)
        kwargs.update(bb_kwargs or {})
        optimizer = BB(params, lr=lr, steps_per_epoch=steps_per_epoch, **kwargs)
        optimizer.track_buffers(model)
        return optimizer, None, kwargs
    if method in ("sgdm", "sgdm-cosine"):
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    elif method == "adam":
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif method == "adamw-cosine":
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=ADAMW_WEIGHT_DECAY)
    elif method in ("prodigy", "prodigy-default"):
        from prodigyopt import Prodigy

        # Documented usage: lr 1 (the default), d0 left at 1e-6 "rarely needs changing"; the sweep sets d0 = η0.
        extra = {} if default else {"d0": lr}
        optimizer = Prodigy(params, lr=1.0, weight_decay=weight_decay, **extra)
    elif method in ("dadapt-sgd", "dadapt-sgd-default"):
        from dadaptation import DAdaptSGD

        # Momentum 0.9: D-Adaptation is a drop-in replacement for the SGD with momentum the user would have run.
        extra = {} if default else {"d0": lr}
        optimizer = DAdaptSGD(params, lr=1.0, momentum=0.9, weight_decay=weight_decay, **extra)
    elif method in ("schedulefree-sgd", "schedulefree-sgd-default"):
        from schedulefree import SGDScheduleFree

        # Defaults: lr 1, momentum 0.9, no warm-up.
        extra = {} if default else {"lr": lr}
        optimizer = SGDScheduleFree(params, momentum=0.9, weight_decay=weight_decay, **extra)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)} or bb[NAME]")
    scheduler = None
    if method.endswith("-cosine"):
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return optimizer, scheduler, {}


def _set_mode(model: nn.Module, optimizer: torch.optim.Optimizer, train: bool) -> None:
    """Schedule-Free's contract: the optimizer switches between its training and its averaged weights."""
    model.train(train)
    if hasattr(optimizer, "train") and hasattr(optimizer, "eval"):
        optimizer.train() if train else optimizer.eval()


def _is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    return hasattr(optimizer, "train") and hasattr(optimizer, "eval")


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def effective_rate(optimizer: torch.optim.Optimizer) -> float:
    """The first parameter group's step size now: lr, times the estimate d of Prodigy and D-Adaptation."""
    group = optimizer.param_groups[0]
    return float(group["lr"]) * float(group.get("d", 1.0))


# ----------------------------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class Run:
    setting: str
    method: str
    lr: LR
    seed: int

    @property
    def name(self) -> str:
        lr = self.lr if isinstance(self.lr, str) else f"{self.lr:g}"
        return f"{self.setting}_{file_method(self.method)}_lr{lr}_seed{self.seed}"


def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, task: str) -> dict[str, float | None]:
    """The test score (higher is better, in %) and its raw parts: accuracy, or MSE and explained variance."""
    outputs = []
    with torch.no_grad():
        for start in range(0, len(targets), 1000):
            outputs.append(model(inputs[start : start + 1000]))
    output = torch.cat(outputs)
    if task == "classify":
        accuracy = float((output.argmax(1) == targets).float().mean())
        return {"score": 100.0 * accuracy, "test_accuracy": accuracy}
    mse = float(nn.functional.mse_loss(output.double(), targets.double()))
    variance = float(((targets.double() - targets.double().mean(0)) ** 2).mean())
    explained = 1.0 - mse / variance
    # Worse than predicting the mean image scores 0, as a collapsed classifier scores about chance.
    score = max(0.0, 100.0 * explained) if math.isfinite(explained) else 0.0
    return {
        "score": score,
        "test_mse": mse if math.isfinite(mse) else None,
        "test_variance": variance,
        "explained_variance": explained if math.isfinite(explained) else None,
    }


@functools.lru_cache(maxsize=1)
def checkout_commit() -> str | None:
    """The commit of this checkout, with "+dirty" when bbfused/ has uncommitted changes (a BB run's provenance)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "bbfused"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train(run: Run, quick: bool = False, bb_kwargs: dict[str, Any] | None = None, jobs: int = 1) -> dict:
    """Train ``run``; returns its record (see the module docstring). ``jobs``: runs at a time, recorded."""
    started = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    setting = SETTINGS[run.setting]
    epochs = QUICK_EPOCHS if quick else setting.epochs
    batch = batch_size(setting, quick)
    torch.manual_seed(run.seed)
    train_x, train_y, test_x, test_y = load_data(setting, run.seed, quick)
    model = build_model(setting.model)
    # Full batches only (a DataLoader with drop_last=True): a last batch of a few images is a noisy full-size
    # step that every method would take differently.
    steps = len(train_y) // batch
    optimizer, scheduler, bb_constructor = build_optimizer(
        run.method, model, run.lr, steps, setting.weight_decay, epochs, bb_kwargs
    )
    generator = torch.Generator().manual_seed(run.seed)
    if setting.task == "classify":
        loss_of = nn.functional.cross_entropy
    else:
        loss_of = nn.functional.mse_loss
    losses, seconds, rates, clipped = [], [], [], []
    for _ in range(epochs):
        start = time.perf_counter()
        _set_mode(model, optimizer, True)
        order = torch.randperm(len(train_y), generator=generator)
        total = torch.zeros((), dtype=torch.float64)
        clips = 0
        for step in range(steps):
            index = order[step * batch : (step + 1) * batch]
            loss = loss_of(model(train_x[index]), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            if setting.clip_grad_norm is not None:
                norm = nn.utils.clip_grad_norm_(model.parameters(), setting.clip_grad_norm)
                clips += bool(norm > setting.clip_grad_norm)
            if isinstance(optimizer, BB):
                optimizer.step(loss=loss)
            else:
                optimizer.step()
            total += loss.detach()
        # The step size the epoch ended with (Prodigy's and D-Adaptation's d grows within it); BB has its own.
        rates.append(None if isinstance(optimizer, BB) else effective_rate(optimizer))
        if scheduler is not None:
            scheduler.step()
        losses.append(float(total) / steps)
        seconds.append(time.perf_counter() - start)
        clipped.append(clips / steps)
    _set_mode(model, optimizer, False)
    recompute = _is_schedule_free(optimizer) and _has_batchnorm(model)
    if recompute:
        _recompute_batchnorm(model, train_x, batch, steps, run.seed)
    evaluate_start = time.perf_counter()
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    result = evaluate(model, test_x, test_y, setting.task) if finite else {"score": 0.0}
    if setting.task == "classify":
        result.setdefault("test_accuracy", None)  # None: non-finite weights (the score counts it as 0)
    evaluate_seconds = time.perf_counter() - evaluate_start
    is_bb_optimizer = isinstance(optimizer, BB)
    return {
        "run": asdict(run),
        "quick": quick,
        "epochs": epochs,
        "batch_size": batch,
        "steps_per_epoch": steps,
        "train_size": len(train_y),
        "test_size": len(test_y),
        "task": setting.task,
        **result,
        "finite": finite,
        "train_loss": [loss if math.isfinite(loss) else None for loss in losses],
        "epoch_seconds": seconds,
        "evaluate_seconds": evaluate_seconds,
        "seconds": time.perf_counter() - started,
        "rate_history": None if is_bb_optimizer else [r if math.isfinite(r) else None for r in rates],
        "clipped_fraction": clipped if setting.clip_grad_norm is not None else None,
        "batchnorm_recomputed": recompute,
        "bb_lr_history": optimizer.lr_history if is_bb_optimizer else None,
        "rolled_back_epochs": optimizer.rolled_back_epochs if is_bb_optimizer else None,
        "bb_constructor": bb_constructor or None,
        "variant_kwargs": bb_kwargs if variant_of(run.method) is not None else None,
        "bbfused_commit": checkout_commit(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "jobs": jobs,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
    }


def _recompute_batchnorm(model: nn.Module, train_x: torch.Tensor, batch: int, steps: int, seed: int) -> None:
    """Schedule-Free's README for BatchNorm models: with the optimizer at its averaged weights (eval), run up
    to 50 training batches in train mode so the running statistics belong to those weights, then eval."""
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed + 1))
    model.train()
    with torch.no_grad():
        for step in range(min(SCHEDULEFREE_BN_BATCHES, steps)):
            model(train_x[order[step * batch : (step + 1) * batch]])
    model.eval()


def _train_to_file(run: Run, path: Path, quick: bool, bb_kwargs: dict[str, Any] | None, jobs: int) -> tuple[str, float]:
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = train(run, quick, bb_kwargs, jobs)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=1))
    os.replace(temporary, path)
    return run.name, time.perf_counter() - start


def runs_of(settings: Iterable[str], methods: Iterable[str], lrs: Iterable[float], seeds: Iterable[int]) -> list[Run]:
    """Method by method, so that a sweep stopped early has whole methods. A ``-default`` method takes no η0: one
    run per setting and seed."""
    settings, lrs, seeds = list(settings), list(lrs), list(seeds)
    return [
        Run(s, m, lr, seed)
        for m in methods
        for s in settings
        for seed in seeds
        for lr in ([DEFAULT_LR] if m.endswith("-default") else lrs)
    ]


def run_all(
    runs: list[Run],
    folder: Path,
    jobs: int,
    quick: bool,
    retrain: bool = False,
    bb_kwargs: dict[str, Any] | None = None,
) -> list[dict]:
    """Train every run without a file in ``folder`` (all of them with ``retrain``) on ``jobs`` processes of one
    thread each; returns every run's record. ``bb_kwargs``: the constructor arguments of the ``bb[NAME]`` runs."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [run for run in runs if retrain or not (folder / f"{run.name}.json").exists()]
    print(f"{len(runs) - len(todo)} of {len(runs)} runs already in {folder}; training {len(todo)}", flush=True)
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency of bbfused; a bare checkout may lack it
        tqdm = None
    progress = tqdm(total=len(todo), unit="run", disable=not todo) if tqdm else None

    def done(name: str, seconds: float) -> None:
        message = f"done {name} in {seconds:.0f} s"
        progress.write(message) if progress else print(message, flush=True)
        if progress:
            progress.update()

    def arguments(run: Run) -> tuple:
        kwargs = bb_kwargs if variant_of(run.method) is not None else None
        return run, folder / f"{run.name}.json", quick, kwargs, jobs

    if jobs == 1:
        # One run at a time: in this process, on one thread as a worker would (no worker to start).
        threads = torch.get_num_threads()
        try:
            for run in todo:
                done(*_train_to_file(*arguments(run)))
        finally:
            torch.set_num_threads(threads)
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
            futures = [pool.submit(_train_to_file, *arguments(run)) for run in todo]
            for future in concurrent.futures.as_completed(futures):
                done(*future.result())
    if progress:
        progress.close()
    return [json.loads((folder / f"{run.name}.json").read_text()) for run in runs]


def check_variant_files(folder: Path, method: str, kwargs: dict[str, Any]) -> None:
    """Raise ValueError when ``folder`` holds runs of ``method`` made with other constructor arguments: they
    would be kept as if they were this variant's."""
    for path in sorted(folder.glob(f"*_{file_method(method)}_*.json")):
        recorded = json.loads(path.read_text()).get("variant_kwargs")
        if recorded != kwargs:
            raise ValueError(
                f"{path.name} is a run of {method} with --bb-kwargs {json.dumps(recorded)}, not "
                f"{json.dumps(kwargs)}; choose another --variant name, or --retrain to replace its runs"
            )


def _expand(values: str, groups: dict[str, tuple[str, ...]]) -> list[str]:
    """A comma-separated list where a group name stands for its members; each name once, in order."""
    chosen: list[str] = []
    for value in (v.strip() for v in values.split(",")):
        for name in groups.get(value, (value,)):
            if name not in chosen:
                chosen.append(name)
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--settings", default="all", help=f"comma-separated names or groups ({', '.join(SETTING_GROUPS)}; default all)"
    )
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated names or groups ({', '.join(METHOD_GROUPS)}); default all, or bb with --variant",
    )
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS), help="initial rates η0")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--jobs", type=int, default=1, help="processes of one thread each (default 1)")
    parser.add_argument("--variant", default=None, help="run BB's method bb as bb[VARIANT], with --bb-kwargs")
    parser.add_argument("--bb-kwargs", default=None, help="JSON object of BB arguments, e.g. '{\"momentum\": 0.9}'")
    parser.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the harness")
    parser.add_argument("--retrain", action="store_true", help="train the selected runs again even if saved")
    parser.add_argument("--out", type=Path, default=None, help=f"run folder (default {RUNS.relative_to(REPO_ROOT)})")
    parser.add_argument("--report", type=Path, default=None, help="where report.py writes (default: none)")
    args = parser.parse_args(argv)

    bb_kwargs: dict[str, Any] | None = None
    if args.bb_kwargs is not None and args.variant is None:
        parser.error("--bb-kwargs needs --variant NAME: the runs of other arguments need a name of their own")
    if args.variant is not None:
        if not VARIANT_NAME.fullmatch(args.variant):
            parser.error(f"--variant {args.variant!r}: 1-40 letters, digits, dots or dashes, starting alphanumeric")
        try:
            bb_kwargs = json.loads(args.bb_kwargs) if args.bb_kwargs is not None else {}
        except json.JSONDecodeError as error:
            parser.error(f"--bb-kwargs is not JSON: {error}")
        if not isinstance(bb_kwargs, dict):
            parser.error(f"--bb-kwargs must be a JSON object of argument names and values, got {args.bb_kwargs}")
        try:
            check_bb_kwargs(bb_kwargs)
        except ValueError as error:
            parser.error(f"--bb-kwargs: {error}")
    settings = _expand(args.settings, SETTING_GROUPS)
    methods = _expand(args.methods or ("bb" if args.variant else "all"), METHOD_GROUPS)
    for name, chosen, known, groups in (
        ("setting", settings, SETTINGS, SETTING_GROUPS),
        ("method", methods, METHODS, METHOD_GROUPS),
    ):
        unknown = [value for value in chosen if value not in known]
        if unknown:
            parser.error(
                f"unknown {name} {', '.join(unknown)}; choose from {', '.join(known)} or the groups {', '.join(groups)}"
            )
    try:
        lrs = [float(v) for v in args.lrs.split(",")]
        seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError as error:
        parser.error(f"--lrs takes numbers and --seeds integers, comma-separated: {error}")
    bad = [lr for lr in lrs if not (math.isfinite(lr) and lr > 0)]
    if bad:
        parser.error(f"--lrs must be positive and finite, got {', '.join(map(str, bad))}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.variant is not None:
        if "bb" not in methods:
            parser.error("--variant runs the method bb under a new name; include bb in --methods")
        methods = [variant_method(args.variant) if m == "bb" else m for m in methods]
    folder = args.out or RUNS
    if args.variant is not None and not args.retrain:
        try:
            check_variant_files(folder, variant_method(args.variant), bb_kwargs or {})
        except ValueError as error:
            parser.error(str(error))
    run_all(runs_of(settings, methods, lrs, seeds), folder, args.jobs, args.quick, args.retrain, bb_kwargs)
    if args.report is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from report import write_report

        write_report(folder, args.report, args.report.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
