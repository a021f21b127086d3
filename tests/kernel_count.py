"""Counting what a step would launch on a GPU, on the CPU: Triton launches (through a patched launcher) plus the
torch ops outside them that run a kernel (views, allocations and metadata ops launch nothing)."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

from torch.utils._python_dispatch import TorchDispatchMode

# Ops that launch no device kernel: allocation without a fill, aliasing, metadata.
NO_KERNEL = {"empty", "empty_like", "empty_strided", "detach", "alias", "lift_fresh", "view", "_unsafe_view",
             "reshape", "as_strided", "slice", "select", "expand", "unsqueeze", "squeeze", "t", "permute",
             "set_", "_local_scalar_dense", "is_nonzero", "item", "result_type", "_record_function_enter_new",
             "_record_function_exit"}  # fmt: skip


class KernelCount:
    """Kernels launched inside ``active()``: ``triton`` (kernel name → launches) and ``torch`` (op → calls)."""

    def __init__(self) -> None:
        self.triton: collections.Counter[str] = collections.Counter()
        self.torch: collections.Counter[str] = collections.Counter()
        self.host_reads = 0  # reads of a tensor's value on the host (a sync on a GPU)
        self._inside = 0

    @property
    def total(self) -> int:
        return sum(self.triton.values()) + sum(self.torch.values())

    def __str__(self) -> str:
        return f"{self.total} kernels: triton {dict(self.triton)}, torch {dict(self.torch)}"

    @contextlib.contextmanager
    def active(self) -> Iterator[KernelCount]:
        from triton.runtime.interpreter import InterpretedFunction

        counter = self
        original = InterpretedFunction.run

        def run(self, *args, **kwargs):
            counter.triton[getattr(self.fn, "__name__", repr(self.fn))] += 1
            counter._inside += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counter._inside -= 1

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if not counter._inside:
                    if name in ("_local_scalar_dense", "is_nonzero", "item"):
                        counter.host_reads += 1
                    elif name not in NO_KERNEL and not func.is_view:
                        counter.torch[name] += 1
                return func(*args, **(kwargs or {}))

        InterpretedFunction.run = run
        try:
            with Ops():
                yield self
        finally:
            InterpretedFunction.run = original
