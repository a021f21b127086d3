"""The single-program kernels (the safeguard's decision, the device clock's loss and period end, the dead-unit test's
gradient share) compile for a GPU
(sm_90, no GPU needed: Triton compiles to PTX on the CPU), and their PTX has no fused multiply-add, so a GPU gives
the bits the interpreter gives and the torch ops give. The interpreter checks their values (test_safeguard_kernel,
test_capture); this checks what the interpreter cannot: that the compiler takes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO_ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import inspect, json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bbfused import clock_kernels as ck
from bbfused.backends import triton_backend as tb
from bbfused.control import safeguard_kernel as sk

target = GPUTarget("cuda", 90, 32)
FLAGS = {"searching_ptr", "has_snapshot_ptr", "loss_rollback_ptr", "diverged_ptr", "gate_ptr", "epoch_gate_ptr",
         "rolled_back_ptr", "rolled_history_ptr", "before_end_ptr", "enabled_ptr", "slot_ptr"}
INTS = {"epoch_ptr", "step_ptr"}
LOSSES = {"loss_ptr", "last_ptr", "grad_ptr", "skip_ptr"}  # float32 tensors (a loss, a gradient, found_inf)
INTS |= {"partials_ptr"}  # the gradient share's per-program counts


def signature(kernel, constexprs):
    types = {}
    for name, parameter in inspect.signature(kernel.fn).parameters.items():
        if name in constexprs:
            types[name] = "constexpr"
        elif name.endswith("_ptr"):
            types[name] = "*i1" if name in FLAGS else "*i64" if name in INTS else "*fp32" if name in LOSSES else "*fp64"
        elif "float64" in str(parameter.annotation):
            types[name] = "fp64"
        else:
            types[name] = "i32"
    return types


kernels = {
    "decide (device clock)": (sk._decide_kernel, {"DEVICE_CLOCK": True, "HAS_SHARES": True, "BLOCK": sk.REDUCE_BLOCK}),
    "decide (host clock)": (sk._decide_kernel, {"DEVICE_CLOCK": False, "HAS_SHARES": True, "BLOCK": sk.REDUCE_BLOCK}),
    "decide (no shares)": (sk._decide_kernel, {"DEVICE_CLOCK": True, "HAS_SHARES": False, "BLOCK": sk.REDUCE_BLOCK}),
    "apply": (sk._apply_kernel, {"HAS_SHARES": True}),
    "gradient share (device clock)": (tb._nonzero_share_kernel, {"ADD": True, "HAS_ENABLED": True, "HAS_SLOT": True,
                                      "HAS_SKIP": True, "USE_INT64": False, "BLOCK": tb.BLOCK_SIZE}),
    "gradient share (host clock)": (tb._nonzero_share_kernel, {"ADD": False, "HAS_ENABLED": False, "HAS_SLOT": False,
                                    "HAS_SKIP": False, "USE_INT64": False, "BLOCK": tb.BLOCK_SIZE}),
    "gradient share partials": (tb._nonzero_partials_kernel, {"HAS_ENABLED": True, "HAS_SLOT": True, "HAS_SKIP": True,
                                "USE_INT64": False, "BLOCK": tb.BLOCK_SIZE}),
    "gradient share finish": (tb._nonzero_share_finish_kernel, {"ADD": True, "HAS_ENABLED": True, "HAS_SLOT": True,
                              "HAS_SKIP": True, "BLOCK": tb.EPOCH_PROGRAMS}),
    "add_loss": (ck._add_loss_kernel, {}),
    "finish_period": (ck._finish_kernel, {"HAS_ROLLED_BACK": True}),
    "finish_period (paper)": (ck._finish_kernel, {"HAS_ROLLED_BACK": False}),
}
report = {}
for name, (kernel, constexprs) in kernels.items():
    source = ASTSource(kernel, signature(kernel, constexprs), constexprs=constexprs)
    ptx = triton.compile(source, target=target, options=ck.SCALAR_OPTIONS).asm["ptx"]
    report[name] = {"lines": len(ptx.splitlines()), "fma": len(re.findall(r"\bfma\.", ptx)),
                    "f64_divisions": len(re.findall(r"\bdiv\.rn\.f64", ptx))}
print(json.dumps(report))
"""


def test_scalar_kernels_compile_for_sm90_without_fused_multiply_add() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert set(report) == {"decide (device clock)", "decide (host clock)", "decide (no shares)", "apply", "add_loss",
                           "finish_period", "finish_period (paper)", "gradient share (device clock)",
                           "gradient share (host clock)", "gradient share partials",
                           "gradient share finish"}  # fmt: skip
    for name, figures in report.items():
        assert figures["lines"] > 20 and figures["fma"] == 0, (name, figures)
    # The mean loss and the BB estimate are IEEE float64 divisions, rounded to nearest as torch's.
    assert report["decide (host clock)"]["f64_divisions"] >= 2, report
