"""No import cycle among the modules of virtmig.proto, virtmig.daemon and virtmig.client.

Every import counts, at module level or inside a function (a deferred import hides a cycle, it
does not remove it); only imports under ``if TYPE_CHECKING:`` are not edges.  Modules are found
on disk, so new subpackages are checked without listing them here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import virtmig.client
import virtmig.daemon
import virtmig.proto

PACKAGES = (virtmig.proto, virtmig.client, virtmig.daemon)

Graph = Mapping[str, set[str]]


def module_files() -> dict[str, Path]:
    """Every module of the packages, by import name, from the packages' folders."""
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for root in package.__path__:
            base = Path(root)
            for path in sorted(base.rglob("*.py")):
                parts = list(path.relative_to(base).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                out[".".join([package.__name__, *parts])] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth, except TYPE_CHECKING-only ones."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield from _imports_of(stmt)
            continue
        yield from _imports_of(child)


def _imports_of(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
    else:
        yield from _imports(node)


def _absolute(module: str, is_package: bool, stmt: ast.ImportFrom) -> str:
    if not stmt.level:
        return stmt.module or ""
    base = module.split(".")
    base = base[: len(base) - stmt.level + (1 if is_package else 0)]
    return ".".join(base + ([stmt.module] if stmt.module else []))


def import_graph(files: Mapping[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``files`` it imports (``from p import m`` names module p.m)."""
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for stmt in _imports(tree):
            if isinstance(stmt, ast.Import):
                targets = [alias.name for alias in stmt.names]
            else:
                src = _absolute(name, path.name == "__init__.py", stmt)
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in files else src
                           for a in stmt.names]
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_cycle() -> None:
    graph = import_graph(module_files())
    assert cycles(graph) == []


def test_the_graph_sees_the_packages_and_their_edges() -> None:
    graph = import_graph(module_files())
    assert {"virtmig.proto.params", "virtmig.daemon.server", "virtmig.client.cli"} <= set(graph)
    assert "virtmig.proto.params" in graph["virtmig.proto.compat"]
    # `from virtmig.daemon import jobctl` names the module, not the package.
    assert "virtmig.daemon.jobctl" in graph["virtmig.daemon.main"]


def test_function_level_imports_count_and_type_checking_ones_do_not(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    files = {"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"}
    assert import_graph(files) == {"pkg.a": {"pkg.b"}, "pkg.b": set()}
    (tmp_path / "b.py").write_text("class C:\n    def g(self):\n        import pkg.a\n")
    assert cycles(import_graph(files)) == [["pkg.a", "pkg.b"]]


@pytest.mark.parametrize(("graph", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b"], ["c", "d"]]),
])
def test_cycles_finds_every_cycle(graph: Graph, expected: list[list[str]]) -> None:
    assert cycles(graph) == expected
