"""BB's keyword defaults and the backend names, read from bbfused's source files instead of by importing them.

Importing ``bbfused.optimizer`` loads torch and torch._dynamo (several seconds); the command line needs only a
few literals from it to print ``--help`` and to reject a mistyped option. Anything the reader does not find as a
plain literal falls back to the import, so the values are always the real ones; only the speed depends on the
source's shape (``tests/test_train.py`` checks both).
"""

from __future__ import annotations

import ast
import functools
import inspect
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parents[1]


def _tree(relative: str) -> ast.Module | None:
    try:
        return ast.parse((PACKAGE / relative).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None


@functools.cache
def _source_bb_defaults() -> dict[str, Any]:
    """The defaults of ``BB.__init__`` that are literals in bbfused/optimizer.py (empty when not found)."""
    tree = _tree("optimizer.py")
    classes = [node for node in (tree.body if tree else []) if isinstance(node, ast.ClassDef) and node.name == "BB"]
    methods = [node for node in (classes[0].body if classes else []) if isinstance(node, ast.FunctionDef)]
    init = next((node for node in methods if node.name == "__init__"), None)
    if init is None:
        return {}
    arguments = init.args
    positional = [*arguments.posonlyargs, *arguments.args]
    pairs = list(zip(positional[len(positional) - len(arguments.defaults) :], arguments.defaults))
    pairs += [(arg, default) for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults) if default]
    defaults = {}
    for arg, node in pairs:
        try:
            defaults[arg.arg] = ast.literal_eval(node)
        except ValueError:  # not a literal: left to the import
            pass
    return defaults


def bb_default(name: str) -> Any:
    """The default of ``BB``'s keyword argument ``name``: the one place BB's defaults are written."""
    defaults = _source_bb_defaults()
    if name in defaults:
        return defaults[name]
    from ..optimizer import BB

    return inspect.signature(BB).parameters[name].default


def _literal_names(tree: ast.Module, target: str) -> tuple[str, ...] | None:
    """The value of the module-level tuple ``target``: literals, and ``*NAME`` of an earlier literal dict (its
    keys) or sequence. None when it is anything else."""
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name, value = node.targets[0].id, node.value
            if name == target and isinstance(value, (ast.Tuple, ast.List)):
                items: list[Any] = []
                for element in value.elts:
                    if isinstance(element, ast.Starred) and isinstance(element.value, ast.Name):
                        if element.value.id not in values:
                            return None
                        items.extend(values[element.value.id])
                    elif isinstance(element, ast.Constant):
                        items.append(element.value)
                    else:
                        return None
                return tuple(items)
            try:
                values[name] = ast.literal_eval(value)
            except ValueError:
                pass
    return None


@functools.cache
def backend_names() -> tuple[str, ...]:
    """``bbfused.backends.BACKEND_NAMES``: the values ``--bb-backend`` accepts."""
    tree = _tree("backends/__init__.py")
    names = _literal_names(tree, "BACKEND_NAMES") if tree is not None else None
    if names is not None and all(isinstance(name, str) for name in names):
        return names
    from ..backends import BACKEND_NAMES

    return tuple(BACKEND_NAMES)


def _class_constant(relative: str, class_name: str, attribute: str) -> Any:
    """The value of ``class_name.attribute`` in the module at ``relative``: a literal, a module-level literal
    constant's name, or a tuple of those. None when it is anything else."""
    tree = _tree(relative)
    constants: dict[str, Any] = {}

    def value(node: ast.expr) -> Any:
        return constants[node.id] if isinstance(node, ast.Name) else ast.literal_eval(node)

    for node in tree.body if tree else []:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for statement in node.body:
                targets = getattr(statement, "targets", [])
                if len(targets) == 1 and getattr(targets[0], "id", None) == attribute:
                    try:
                        if isinstance(statement.value, ast.Tuple):
                            return tuple(value(element) for element in statement.value.elts)
                        return value(statement.value)
                    except (KeyError, ValueError):
                        return None
    return None


@functools.cache
def control_taus(safeguard: bool) -> tuple[float | None, float, float]:
    """The rate control's DEFAULT_TAUS (tau0, tau_min, tau_max) for the mode: read from its class in
    bbfused/control/ when the tuple holds literals and module-level numeric constants, else imported."""
    module, name = ("control/safeguard.py", "SafeguardControl") if safeguard else ("control/paper.py", "PaperControl")
    values = _class_constant(module, name, "DEFAULT_TAUS")
    if isinstance(values, tuple) and len(values) == 3:
        return values
    from ..control import control_class

    return control_class(safeguard).DEFAULT_TAUS


@functools.cache
def preconditioned_first_rate() -> float:
    """``PreconditionedControl.FIRST_RATE_LIMIT``: a preconditioned run starts at min(lr, this)."""
    limit = _class_constant("control/preconditioned.py", "PreconditionedControl", "FIRST_RATE_LIMIT")
    if isinstance(limit, float):
        return limit
    from ..control import PreconditionedControl

    return PreconditionedControl.FIRST_RATE_LIMIT


@functools.cache
def preconditioner_names() -> tuple[str, ...]:
    """``bbfused.preconditioner.NAMES`` as ``--bb-preconditioner`` takes them: "none" for None."""
    tree = _tree("preconditioner.py")
    names = _literal_names(tree, "NAMES") if tree is not None else None
    if names is None or not all(name is None or isinstance(name, str) for name in names):
        from ..preconditioner import NAMES

        names = NAMES
    return tuple("none" if name is None else name for name in names)
