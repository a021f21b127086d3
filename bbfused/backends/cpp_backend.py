"""The cpp backend: the fused C++ CPU kernels of csrc/bb_ops.cpp, as the custom ops ``torch.ops.bbfused.*``.

The ops library comes from an ahead-of-time build (``BBFUSED_BUILD_CPP=1 pip install --no-build-isolation .``)
when one matching this torch loads; otherwise it is compiled on first use with ninja (a few seconds) and cached
in ``$TORCH_EXTENSIONS_DIR`` or ``$XDG_CACHE_HOME/bbfused`` (default ``~/.cache/bbfused``), one folder per torch
version. Either happens at most once per process; concurrent processes share one build through torch's file lock.
"""

from __future__ import annotations

import importlib.machinery
import logging
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import torch

from ..average_window import EMA_UPDATE, EmaMode, check_ema_mode, point_coefficient
from .base import (
    BackendUnavailableError,
    check_second_moment_arguments,
    finite_nonzero,
    write_share,
    zero_momentum_if_rolled_back,
)

# Shared with setup.py's ahead-of-time build. Portable: no -march=native (see csrc/bb_ops.cpp on vectors).
# -fno-math-errno lets GCC vectorize the preconditioned step's square root (setting errno would make each one a
# possible call); it changes no result: sqrt stays correctly rounded, and nothing is reassociated.
CXX_FLAGS = ("-O3", "-fopenmp", "-fno-math-errno")
LD_FLAGS = ("-fopenmp",)
PREBUILT_NAME = "_cpp_ops"  # bbfused/_cpp_ops*.so from setup.py
_JIT_NAME = "bbfused_cpp_ops"
_SOURCE = "bb_ops.cpp"
_MESSAGE_TAIL = 2000  # characters of compiler output kept in a build-failure reason

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_NOT_TRIED = object()
_load_lock = threading.Lock()
_load_outcome: object = _NOT_TRIED  # None once the ops are loaded, else the reason they cannot be


def source_path() -> Path | None:
    """csrc/bb_ops.cpp: inside the installed package (copied by setup.py) or in the source checkout."""
    for candidate in (_PACKAGE_DIR / "csrc" / _SOURCE, _PACKAGE_DIR.parent / "csrc" / _SOURCE):
        if candidate.is_file():
            return candidate
    return None


def build_directory() -> Path:
    """Where the JIT build lives: one folder per build of the kernels, named by a hash of everything the compile
    depends on: the source's contents, the flags, torch's version and install location (its headers and
    libraries are on the compiler's command line), Python's headers, the compiler and its version. So an
    upgrade never loads a stale build, and every checkout or copy of the same source finds the same build:
    ninja rebuilds whenever its command line changes, and it once held the checkout's path to the source."""
    import hashlib
    import subprocess
    import sysconfig

    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path(cache) / "bbfused"
    compiler = os.environ.get("CXX", "c++")
    try:
        compiler_version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        compiler_version = "unknown"  # no compiler: the build reports that itself
    source = source_path()
    key = hashlib.sha256(source.read_bytes() if source is not None else b"")
    for part in (*CXX_FLAGS, "|", *LD_FLAGS, torch.__version__, torch.__file__, sysconfig.get_paths()["include"]):
        key.update(f"\0{part}".encode())
    key.update(f"\0{compiler}\0{compiler_version}".encode())
    tag = f"torch{torch.__version__}_py{sys.version_info[0]}{sys.version_info[1]}_{key.hexdigest()[:16]}"
    return Path(root) / re.sub(r"[^A-Za-z0-9_.]", "_", tag)


def _prebuilt_library() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = _PACKAGE_DIR / f"{PREBUILT_NAME}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _cpp_extension():
    """torch.utils.cpp_extension, imported on first need without the CUDA_HOME warning it logs on CPU machines."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "No CUDA runtime is found": irrelevant to a CPU-only extension
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _missing_toolchain() -> str | None:
    """What the JIT build lacks (a C++ compiler, ninja, the source), or None."""
    compiler = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension invokes
    if shutil.which(compiler) is None:
        return (
            f"no C++ compiler: {compiler!r} (from $CXX, default c++) is not on PATH; install one "
            f"(e.g. apt install g++) or point CXX at it"
        )
    if not _cpp_extension().is_ninja_available():
        return "ninja is not installed, and the C++ kernels are compiled with it: pip install ninja"
    if source_path() is None:
        return (
            f"the kernel source csrc/{_SOURCE} is missing from the installed package; reinstall bbfused "
            f"from its source tree (pip install .)"
        )
    return None


def _load_ops() -> str | None:
    """Load the ops library (prebuilt, else compiled now); returns why it failed, or None."""
    prebuilt_error = ""
    prebuilt = _prebuilt_library()
    if prebuilt is not None:
        try:
            torch.ops.load_library(str(prebuilt))
            return None
        except OSError as error:  # built against another torch: compile a matching one instead
            prebuilt_error = f" (the prebuilt {prebuilt.name} did not load: {error})"
    missing = _missing_toolchain()
    if missing is not None:
        return missing + prebuilt_error
    cpp_extension = _cpp_extension()
    directory = build_directory()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Compiled from a copy in the build folder, so the command line (and ninja's decision) is the same for
        # every checkout; the folder's name holds the source's hash, so an existing copy is this source.
        source = directory / _SOURCE
        if not source.is_file():
            temporary = directory / f".{_SOURCE}.{os.getpid()}.tmp"
            shutil.copyfile(source_path(), temporary)
            os.replace(temporary, source)
        if not any((directory / f"{_JIT_NAME}{suffix}").is_file() for suffix in (".so", ".pyd")):
            print(
                f"bbfused: compiling the C++ kernels (once per torch build, up to a minute) in {directory} ...",
                file=sys.stderr,
                flush=True,
            )
        cpp_extension.load(
            name=_JIT_NAME,
            sources=[str(source)],
            extra_cflags=list(CXX_FLAGS),
            extra_ldflags=list(LD_FLAGS),
            build_directory=str(directory),
            is_python_module=False,
        )
    except (RuntimeError, OSError, ImportError) as error:
        # torch puts the compiler's output in the message; its end holds the error.
        message = str(error)
        if len(message) > _MESSAGE_TAIL:
            message = "..." + message[-_MESSAGE_TAIL:]
        return f"compiling csrc/{_SOURCE} in {directory} failed: {message}{prebuilt_error}"
    return None


def ensure_loaded() -> str | None:
    """Load the ops once per process (thread-safe); returns the reason they cannot be loaded, or None."""
    global _load_outcome
    with _load_lock:
        if _load_outcome is _NOT_TRIED:
            _load_outcome = _load_ops()
        return _load_outcome  # type: ignore[return-value]


def unavailable_reason(device: torch.device) -> str | None:
    """Why the cpp backend cannot run on ``device`` (not a CPU, no compiler or ninja, a failed build), or None."""
    if device.type != "cpu":
        return f"the C++ kernels run on CPU tensors only, got device {device}; use backend='triton' or 'eager'"
    return ensure_loaded()


class CppBackend:
    """Each call is one pass over the flat slices, in parallel over the CPU cores."""

    name = "cpp"

    def __init__(self) -> None:
        reason = ensure_loaded()
        if reason is not None:
            raise BackendUnavailableError(f"backend='cpp' cannot run: {reason}")

    def step(
        self,
        param: torch.Tensor,
        grad: torch.Tensor,
        ema: torch.Tensor,
        *,
        lr: torch.Tensor,
        weight_decay: float,
        beta: float,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
        nonfinite: torch.Tensor | None = None,
        momentum_buffer: torch.Tensor | None = None,
        momentum: float = 0.0,
        nesterov: bool = False,
        second_moment: torch.Tensor | None = None,
        bias_correction: torch.Tensor | None = None,
        beta2: float = 0.0,
        eps: float = 0.0,
        ema_mode: EmaMode = EMA_UPDATE,
        window_steps: int = 0,
    ) -> None:
        check_second_moment_arguments(second_moment, bias_correction, beta2)
        check_ema_mode(ema_mode, momentum_buffer is not None, second_moment is not None, window_steps)
        if second_moment is None:
            torch.ops.bbfused.cpp_step(
                param, grad, ema, lr, weight_decay, beta, grad_scale, found_inf, nonfinite,
                momentum_buffer, momentum, nesterov, int(ema_mode),  # a CPU tensor's value: no sync
                window_steps, point_coefficient(momentum, nesterov),
            )  # fmt: skip
        else:
            torch.ops.bbfused.cpp_preconditioned_step(
                param, grad, ema, lr, weight_decay, beta, grad_scale, found_inf, nonfinite,
                momentum_buffer, momentum, nesterov, second_moment, bias_correction, beta2, eps,
            )  # fmt: skip

    def epoch_end(
        self,
        param: torch.Tensor,
        ema: torch.Tensor,
        prev_params: torch.Tensor,
        prev_ema: torch.Tensor,
        *,
        enabled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if _skipped(enabled):
            return torch.zeros(2, dtype=torch.float64)
        return torch.ops.bbfused.cpp_epoch_end(param, ema, prev_params, prev_ema)

    def epoch_measure(
        self,
        param: torch.Tensor,
        ema: torch.Tensor,
        prev_params: torch.Tensor,
        prev_ema: torch.Tensor,
        *,
        enabled: torch.Tensor | None = None,
        second_moment: torch.Tensor | None = None,
        bias_correction: torch.Tensor | None = None,
        eps: float = 0.0,
    ) -> torch.Tensor:
        check_second_moment_arguments(second_moment, bias_correction)
        if _skipped(enabled):
            return torch.zeros(4, dtype=torch.float64)
        return torch.ops.bbfused.cpp_epoch_measure(
            param, ema, prev_params, prev_ema, second_moment, bias_correction, eps
        )

    def nonzero_share(
        self,
        grad: torch.Tensor,
        out: torch.Tensor,
        *,
        total: float = 1.0,
        add: bool = False,
        enabled: torch.Tensor | None = None,
        slot: torch.Tensor | None = None,
        skip: torch.Tensor | None = None,
    ) -> None:
        """ATen's ops: read-only reductions its CPU kernels already run on every core, twice a period. The flags
        are CPU tensors: reading them costs no device sync."""
        if (skip is not None and bool(skip.reshape(()) != 0)) or (slot is None and _skipped(enabled)):
            return
        write_share(finite_nonzero(grad), out, add, enabled if slot is not None else None, total, slot)

    def epoch_commit(
        self,
        param: torch.Tensor,
        prev_params: torch.Tensor,
        rolled_back: torch.Tensor,
        *,
        enabled: torch.Tensor | None = None,
        momentum_buffer: torch.Tensor | None = None,
    ) -> None:
        if not _skipped(enabled):
            torch.ops.bbfused.cpp_epoch_commit(param, prev_params, rolled_back)
            zero_momentum_if_rolled_back(momentum_buffer, rolled_back, None)


def _skipped(enabled: torch.Tensor | None) -> bool:
    """A pass turned off by its flag. The kernels run on CPU tensors, so reading the flag costs no device sync."""
    return enabled is not None and not bool(enabled)
