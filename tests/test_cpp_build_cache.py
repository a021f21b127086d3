"""Where the C++ kernels' JIT build lives, and when it is compiled: once per build of the kernels, whichever
checkout asks for it, with one line on stderr only when a compile actually happens. No compiler runs here:
torch's build call is replaced by one that records its arguments."""

from __future__ import annotations

from pathlib import Path

import pytest

from bbfused.backends import cpp_backend

SOURCE = cpp_backend.source_path()


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cpp_backend, "_prebuilt_library", lambda: None)
    return tmp_path / "cache"


def checkout_copy(folder: Path, text: str | None = None) -> Path:
    """The kernel source of another checkout: the same text at another path, unless ``text`` is given."""
    folder.mkdir(parents=True)
    copy = folder / "bb_ops.cpp"
    copy.write_text(SOURCE.read_text() if text is None else text)
    return copy


def test_one_build_folder_per_source_contents_not_per_checkout(cache, monkeypatch, tmp_path):
    """torch rebuilds whenever the build's command line changes, and it held the checkout's path: every
    checkout rebuilt the shared folder. The folder is named by the source's contents (and the build's flags,
    torch, Python and the compiler), not by where the source is."""
    here = cpp_backend.build_directory()
    assert here.parent == cache and here.name.startswith("torch")
    monkeypatch.setattr(cpp_backend, "source_path", lambda: checkout_copy(tmp_path / "other"))
    assert cpp_backend.build_directory() == here
    monkeypatch.setattr(cpp_backend, "source_path", lambda: checkout_copy(tmp_path / "edited", "// edited\n"))
    assert cpp_backend.build_directory() != here
    monkeypatch.setattr(cpp_backend, "source_path", lambda: SOURCE)
    monkeypatch.setattr(cpp_backend, "CXX_FLAGS", ("-O2",))
    assert cpp_backend.build_directory() != here


def test_compiles_from_a_copy_in_the_folder_and_says_so_only_when_compiling(cache, monkeypatch, capsys):
    from torch.utils import cpp_extension

    calls = []

    def load(name, sources, build_directory, **kwargs):
        calls.append(sources)
        (Path(build_directory) / f"{name}.so").write_bytes(b"built")

    monkeypatch.setattr(cpp_extension, "load", load)
    assert cpp_backend._load_ops() is None
    folder = cpp_backend.build_directory()
    assert "compiling the C++ kernels (once per torch build" in capsys.readouterr().err
    assert calls == [[str(folder / "bb_ops.cpp")]]  # the same path for every checkout
    assert (folder / "bb_ops.cpp").read_bytes() == SOURCE.read_bytes()
    assert cpp_backend._load_ops() is None  # a later process: the library is there, ninja has nothing to do
    assert capsys.readouterr().err == "" and len(calls) == 2
