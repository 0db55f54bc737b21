"""The package's import graph, built from the sources, has no cycles.

What counts as an edge ``a -> b`` (``a`` and ``b`` modules of mulayer, ``mulayer.passes`` and
``mulayer.schedules`` included, found through pyproject's package-dir):

- every ``import`` statement in ``a``: module level, inside functions and under
  ``if TYPE_CHECKING`` alike. A lazy import only defers a dependency; a cycle through one is
  still a cycle in the design (it only works because of the order things run in);
- ``from pkg import name`` depends on ``pkg.name`` when that is a module, else on ``pkg``;
- importing ``p.q.b`` also runs the ``__init__`` of every package on the way (``p``, ``p.q``)
  that ``a`` is not inside itself, so ``a`` depends on those too;
- a module importing itself (``if __name__ == "__main__": from mulayer.compiler import isolation``)
  is no edge.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_roots() -> dict[str, Path]:
    """``{package name: folder}`` as pyproject's ``[tool.setuptools.package-dir]`` maps them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = config["tool"]["setuptools"]["package-dir"]
    return {name: ROOT / folder for name, folder in folders.items()}


def module_files() -> dict[str, Path]:
    """``{module name: source file}`` of every module of the package."""
    modules = {}
    for package, folder in package_roots().items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The module names one import statement names (before the known-module filter)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".")
        anchor = anchor if is_package else anchor[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph() -> dict[str, dict[str, int]]:
    """``{importer: {imported: line}}`` over the package's modules (see the module doc)."""
    files = module_files()
    graph: dict[str, dict[str, int]] = {name: {} for name in files}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = _imported(node, module, is_package)
            if isinstance(node, ast.ImportFrom):  # `from pkg import name`: the submodule if any
                base, subs = names[0], [n for n in names[1:] if n in files]
                names = subs if subs and len(subs) == len(names) - 1 else [base, *subs]
            for name in names:
                while name and name not in files:  # `import mulayer.x.Class`-style: the module
                    name = name.rpartition(".")[0]
                if not name:
                    continue
                parts = name.split(".")
                parents = [".".join(parts[:i]) for i in range(1, len(parts))]
                for target in [*parents, name]:
                    inside = module == target or module.startswith(target + ".")
                    if target in files and (target == name or not inside) and target != module:
                        graph[module].setdefault(target, node.lineno)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan; the graph is small enough to recurse
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    cycles = []
    for component in components:
        start, members = min(component), set(component)
        paths = {start: [start]}
        frontier = [start]
        while frontier:  # shortest way from start back to itself inside the component
            node = frontier.pop(0)
            for nxt in sorted(graph[node]):
                if nxt == start:
                    frontier = []
                    cycles.append([*paths[node], start])
                    break
                if nxt in members and nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    frontier.append(nxt)
    return cycles


def describe(cycle: list[str], graph: dict[str, dict[str, int]], files: dict[str, Path]) -> str:
    steps = [
        f"{a} -> {b} ({files[a].relative_to(ROOT)}:{graph[a][b]})"
        for a, b in zip(cycle, cycle[1:], strict=False)
    ]
    return "\n  ".join(steps)


def test_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "mulayer.errors" in graph["mulayer.plan"]
    # imported inside a function
    assert "mulayer.compiler.driver" in graph["mulayer"]
    # a module of mulayer.passes importing across the package-dir mapping
    assert "mulayer.frontend.layers" in graph["mulayer.passes.common"]
    # importing a submodule runs its package's __init__ from outside the package
    assert "mulayer.passes" in graph["mulayer.frontend.onnx_import"]


def test_find_cycles_names_them():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles():
    graph, files = import_graph(), module_files()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        "- " + " -> ".join(c) + "\n  " + describe(c, graph, files) for c in cycles
    )
