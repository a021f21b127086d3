"""Build steps pyproject.toml cannot express; the project metadata lives there.

* The C++ kernel source csrc/*.cpp is copied into the package (bbfused/csrc/), so a non-editable install can
  compile it on first use.
* With BBFUSED_BUILD_CPP=1 the kernels are also compiled now, as bbfused/_cpp_ops*.so, against the torch
  already installed: ``BBFUSED_BUILD_CPP=1 pip install --no-build-isolation .``. Without it this file does not
  import torch, so a plain ``pip install -e .`` works in a fresh virtual environment.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
KERNEL_SOURCES = sorted((ROOT / "csrc").glob("*.cpp"))


class BuildPyWithKernelSources(build_py):
    """build_py that also places csrc/*.cpp in bbfused/csrc/ of the build."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "bbfused" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in KERNEL_SOURCES:
            shutil.copy2(source, target / source.name)


def ahead_of_time_build() -> tuple[list, dict]:
    """The extension module and build command for BBFUSED_BUILD_CPP=1, else nothing."""
    if os.environ.get("BBFUSED_BUILD_CPP") != "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # The compile flags of the JIT build, read from the backend module itself (not the package, whose
    # __init__ needs every dependency installed) so both builds use the same ones.
    spec = importlib.util.spec_from_file_location("cpp_backend", ROOT / "bbfused" / "backends" / "cpp_backend.py")
    cpp_backend = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpp_backend)
    extension = CppExtension(
        name=f"bbfused.{cpp_backend.PREBUILT_NAME}",
        sources=[str(source.relative_to(ROOT)) for source in KERNEL_SOURCES],
        extra_compile_args=list(cpp_backend.CXX_FLAGS),
        extra_link_args=list(cpp_backend.LD_FLAGS),
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = ahead_of_time_build()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithKernelSources, **cmdclass})
