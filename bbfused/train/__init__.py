"""``python -m bbfused.train`` (``bbfused-train``): train a classifier with BB or one of the paper's baselines.

Defaults: the paper's MLP on the MNIST files shipped with bbfused. ``--data PATH`` trains on an ImageNet-style
folder (ResNet-50 by default), ``--data synthetic`` on random device batches (pure training throughput).
Launched by ``torchrun --nproc_per_node N`` it trains with DDP; ``--batch-size`` is per process.

One concern per module: :mod:`.options` (the command line; :mod:`.bb_source` reads BB's defaults for it),
:mod:`.building` (data, model, optimizer), :mod:`.checkpoints` (checkpoints and the resume), :mod:`.loop` (the
epochs), :mod:`.report` (what is printed), :mod:`.outputs` (the output folder, log, figure), :mod:`.lock` (one
run per output folder), :mod:`.process_group` (torchrun), :mod:`.signals` (SIGTERM as Ctrl-C), :mod:`.data`
and :mod:`.models`, :mod:`.errors` (the inputs' errors), :mod:`.entry` (exit codes and failures). The pieces are
importable, so experiments can drive training from Python::

    training = prepare(parse_args(["--model", "lenet", "--optimizer", "adam", "--epochs", "5"]))
    try:
        history = training.fit()          # or training.run_epoch(epoch) for epoch in ...
    finally:
        training.close()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .entry import main, run
from .errors import OutputError, UsageError

if TYPE_CHECKING:
    from .building import build_data, build_optimizer, gpu_size_hint, parameter_groups, prepare
    from .loop import Training, evaluate, learning_rate, train_one_epoch
    from .options import OPTIMIZERS, build_parser, parse_args, resolve_args
    from .report import format_record

# The rest is imported on first use: ``bbfused-train --help`` and a mistyped option never load torch.
_LAZY = {
    "building": ("build_data", "build_optimizer", "gpu_size_hint", "parameter_groups", "prepare"),
    "loop": ("Training", "evaluate", "learning_rate", "train_one_epoch"),
    "options": ("OPTIMIZERS", "build_parser", "parse_args", "resolve_args"),
    "report": ("format_record",),
}
_MODULE_OF = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "OPTIMIZERS",
    "OutputError",
    "Training",
    "UsageError",
    "build_data",
    "build_optimizer",
    "build_parser",
    "evaluate",
    "format_record",
    "gpu_size_hint",
    "learning_rate",
    "main",
    "parameter_groups",
    "parse_args",
    "prepare",
    "resolve_args",
    "run",
    "train_one_epoch",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
