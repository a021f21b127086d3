"""What a piece of code launches on a GPU, counted anywhere: Triton launches (JITFunction and the interpreter's run,
patched at class level, so every module's kernels count) and, optionally, the torch ops outside them that run a
kernel (views, allocations, metadata and profiler markers launch nothing), and reads of tensor values on the host.

Used by ``gpu_check.py`` (its launches section) and by the tests that pin the launch counts
(tests/test_launch_counts.py), so both count alike.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator

# Ops that launch no device kernel: allocation without a fill, aliasing, metadata, profiler markers.
NO_KERNEL = {"empty", "empty_like", "empty_strided", "detach", "alias", "lift_fresh", "view", "_unsafe_view",
             "reshape", "as_strided", "slice", "select", "expand", "unsqueeze", "squeeze", "t", "permute", "set_",
             "result_type", "_record_function_enter_new", "_record_function_exit"}  # fmt: skip
HOST_READS = {"_local_scalar_dense", "is_nonzero", "item"}


class LaunchCounter:
    """While ``active()``: ``launches`` (Triton kernel name → launches), ``ops`` (torch op → calls that run a kernel;
    with ``count_ops``) and ``host_reads`` (reads of a tensor's value on the host: a sync on a GPU)."""

    def __init__(self, count_ops: bool = False) -> None:
        self.launches: collections.Counter[str] = collections.Counter()
        self.ops: collections.Counter[str] = collections.Counter()
        self.host_reads = 0
        self.count_ops = count_ops
        self._inside_launch = 0

    @property
    def total(self) -> int:
        """Kernels: Triton launches and torch ops that run one."""
        return sum(self.launches.values()) + sum(self.ops.values())

    def __str__(self) -> str:
        return f"{self.total} kernels: triton {dict(self.launches)}, torch {dict(self.ops)}"

    def clear(self) -> None:
        self.launches.clear()
        self.ops.clear()
        self.host_reads = 0

    @contextlib.contextmanager
    def active(self) -> Iterator[LaunchCounter]:
        from triton.runtime.jit import JITFunction

        classes = [JITFunction]
        with contextlib.suppress(ImportError):
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        saved = [(cls, cls.__dict__["run"]) for cls in classes if "run" in cls.__dict__]
        counter = self

        def patched(original):
            def run(self, *args, **kwargs):
                if not kwargs.get("warmup", False):
                    counter.launches[getattr(self.fn, "__name__", repr(self.fn))] += 1
                counter._inside_launch += 1
                try:
                    return original(self, *args, **kwargs)
                finally:
                    counter._inside_launch -= 1

            return run

        for cls, original in saved:
            cls.run = patched(original)
        try:
            with _op_counter(self) if self.count_ops else contextlib.nullcontext():
                yield self
        finally:
            for cls, original in saved:
                cls.run = original


def _op_counter(counter: LaunchCounter):
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not counter._inside_launch:
                if name in HOST_READS:
                    counter.host_reads += 1
                elif name not in NO_KERNEL and not func.is_view:
                    counter.ops[name] += 1
            return func(*args, **(kwargs or {}))

    return OpCounter()
