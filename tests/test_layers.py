"""The layer contract, read from the source (``ast``), function-level imports included.

* ``connectors`` (the bottom layer) imports neither ``difficulty`` nor ``autolabel``;
* ``difficulty`` does not import ``autolabel``;
* no import cycle among the package's modules.

An import of ``a.b.c`` reaches ``a.b.c`` and also runs the ``__init__`` of each package
above it that the importing module is not inside (importing ``connectors.formats.base``
from ``connectors.writeback`` runs ``connectors/formats/__init__.py``).  Imports under
``if TYPE_CHECKING:`` are never run and do not count.  Run by ``make lint``.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("connectors", "difficulty", "autolabel")
FORBIDDEN = {"connectors": ("difficulty", "autolabel"), "difficulty": ("autolabel",)}


def module_files() -> dict[str, Path]:
    """Module name → file, for every module of the three packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of everything ``module`` imports (``from x import y``: x and x.y)."""
    names: set[str] = set()
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it runs on import (see the module docstring)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        reached: set[str] = set()
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target not in files or target == module:
                    continue
                inside = module.startswith(target + ".")
                if i == len(parts) or not inside:
                    reached.add(target)
        graph[module] = reached
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_lower_layers_do_not_import_upper_ones() -> None:
    bad = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if any(
            module.split(".")[0] == low and target.split(".")[0] in high
            for low, high in FORBIDDEN.items()
        )
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_checker_sees_function_level_imports_and_cycles() -> None:
    tree = ast.parse("def f():\n    from connectors.formats import base\n")
    assert "connectors.formats.base" in _imported_names(tree, "connectors.writeback", False)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
