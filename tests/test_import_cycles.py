"""No import cycles among dooly's modules, lazy imports inside functions included.

A lazy import hides a cycle from Python at start-up but not from a reader: the two modules still
need each other, and one of them usually holds a function that belongs elsewhere. So every
import statement counts, wherever it sits (module level, inside functions, under TYPE_CHECKING),
and importing `dooly.a.b` counts as importing its packages `dooly.a` and `dooly` too.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "dooly"
ROOT = Path(__file__).resolve().parents[1]
# No cycles are left (the fit ones were split apart for issue #23; calibration_commands now takes
# with_model_groups from dooly.sim.options instead of dooly.sim.commands): the test asserts this
# exact list, so any new cycle fails it.
KNOWN_CYCLES: list[list[str]] = []


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (packages by __init__)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _with_parents(name: str, modules: dict[str, Path]) -> set[str]:
    """The module an import names and the packages above it, as far as they are ours."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Dotted names one import statement may load: `from x import y` loads x.y when y is a module."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        anchor = module.split(".")
        anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
        base = ".".join([*anchor, node.module] if node.module else anchor)
    else:
        base = node.module or ""
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its source."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _imported(node, name, is_package):
                    graph[name] |= _with_parents(target, modules)
        graph[name].discard(name)
        # A module's own packages run before it does; they are not its dependencies.
        graph[name] -= _with_parents(name, modules)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_import_cycles():
    modules = module_files()
    assert len(modules) > 50, "the package was not found"
    assert cycles(import_graph(modules)) == KNOWN_CYCLES


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("from . import c\n")
    (package / "sub" / "c.py").write_text("from .a import f\n")
    (package / "d.py").write_text("import pkg.sub.a\n")
    graph = import_graph(module_files(tmp_path, "pkg"))
    assert graph["pkg.d"] == {"pkg.sub", "pkg.sub.a"}
    assert cycles(graph) == [["pkg.sub.a", "pkg.sub.b", "pkg.sub.c"]]
