"""The package's layout rules: no import cycle, one module that names the checkpoint's keys, and the modes as
implementations (``BB`` and the trainer never branch on ``safeguard`` or ``capturable`` after construction)."""

from __future__ import annotations

import ast
from pathlib import Path

from bbfused import checkpoint

PACKAGE = Path(__file__).resolve().parents[1] / "bbfused"


def _modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def _imports(name: str, tree: ast.Module, modules: set[str]) -> set[str]:
    """The package's modules ``name`` imports anywhere in its code (functions included)."""
    package = name if any(m.startswith(name + ".") for m in modules) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}
    # A package's __init__ importing its own submodules is how a package exposes them, not a cycle.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for target in graph[node]:
            if target in path:
                cycles.append(path[path.index(target) :] + [target])
            elif len(path) < 30:
                visit(target, path + [target])

    for start in graph:
        visit(start, [start])
    assert cycles == []


def test_only_the_checkpoint_module_names_checkpoint_keys() -> None:
    keys = {checkpoint.ENTRY, *checkpoint.CONTROL_KEYS, "lr_history", "join_epochs", "step_in_epoch", "tau_min"}
    named = []
    for name, tree in _modules().items():
        if name == "bbfused.checkpoint":
            continue
        for node in ast.walk(tree):
            constants = []
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                constants = [node.slice.value]
            elif isinstance(node, ast.Dict):  # "bb" is also the optimizer's name in the trainer's tables
                constants = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value != checkpoint.ENTRY]
            named += [(name, c) for c in constants if c in keys]
    assert named == []


def test_modes_are_implementations_not_branches() -> None:
    """``safeguard`` and ``capturable`` choose the control and the clock in the constructor; nothing reads them
    after."""
    modules = _modules()
    readers = []
    for name, tree in modules.items():
        if not (name == "bbfused.optimizer" or name.startswith("bbfused.train")):
            continue
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef) or function.name == "__init__":
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Attribute) and node.attr in ("safeguard", "capturable", "_device_epochs"):
                    readers.append((name, function.name, node.attr))
    assert readers == []
