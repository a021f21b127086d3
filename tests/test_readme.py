"""The README's Python snippets run as written (the integrations' snippets: tests/test_integrations.py)."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _snippets() -> dict[str, str]:
    return dict(re.findall(r"<!-- snippet: (\w+) -->\n```python\n(.*?)```", README.read_text(), re.S))


def test_every_python_block_of_the_readme_is_a_tested_snippet() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    # The API block is a signature, not code to run.
    runnable = [block for block in blocks if not block.startswith("BB(params")]
    assert sorted(runnable) == sorted(_snippets().values()) and "example" in _snippets()


def test_readme_example_runs_as_written_and_learns() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(_snippets()["example"], "README:example", "exec"), {"__name__": "readme"})
    finally:
        torch.set_num_threads(threads)
    lines = printed.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 0", "epoch 1", "epoch 2"]
    accuracy = float(lines[-1].rsplit(" ", 1)[1].rstrip("%"))
    assert accuracy > 90.0
