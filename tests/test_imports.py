"""The import graph of sculpt has no cycle, and ``import sculpt`` stays light.

The graph is read from the source with `ast`, so it holds every import of a sculpt module
wherever it is written: at module level, and inside functions, methods, classes and
``if TYPE_CHECKING:`` blocks. An edge into a package means running its ``__init__``; the
``__init__`` importing its own submodules is an ordinary edge.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from collections import deque
from pathlib import Path

import pytest

import sculpt

# module -> {imported module: (file, line) of its first import there}
Graph = dict[str, dict[str, tuple[Path, int]]]

# Modules that `import sculpt` must leave out of sys.modules.
HEAVY = ("sculpt.train", "diffusers", "matplotlib")


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the package in folder ``root``, by dotted name (a package by its ``__init__.py``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((root.name, *parts))] = path
    return modules


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(base):
        raise ValueError(f"{module}: relative import beyond the top-level package (level {level})")
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imported_modules(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(module, line) of every import of a module in ``known`` in the source of ``module``.

    ``import a.b`` imports ``a.b``; ``from a import x`` imports ``a.x`` where that is a
    module (a submodule named from its package), else ``a``.
    """
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name in known]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            source = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in known:
                    found.append((submodule, node.lineno))
                elif source in known:
                    found.append((source, node.lineno))
    return found


def import_graph(root: Path) -> Graph:
    """The directed graph of imports between the modules of the package in folder ``root``."""
    modules = module_files(root)
    graph: Graph = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for target, line in imported_modules(module, path, set(modules)):
            if target != module:
                edges.setdefault(target, (path, line))
    return graph


def _components(graph: Graph) -> list[list[str]]:
    """Strongly connected components of ``graph`` (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def find_cycles(graph: Graph) -> list[list[str]]:
    """One shortest cycle [a, b, ..., a] per strongly connected component that has one, sorted."""
    cycles = []
    for component in _components(graph):
        if len(component) < 2:
            continue  # self-imports are not edges, so a single module is no cycle
        members, start = set(component), component[0]
        parent: dict[str, str] = {}
        queue = deque([start])
        while start not in parent:  # breadth-first from start until an edge leads back to it
            node = queue.popleft()
            for target in sorted(graph[node]):
                if target in members and target not in parent:
                    parent[target] = node
                    queue.append(target)
        chain, node = [start], parent[start]
        while node != start:
            chain.append(node)
            node = parent[node]
        cycles.append([start, *reversed(chain)])
    return sorted(cycles)


def describe(cycle: list[str], graph: Graph, root: Path) -> str:
    """``a -> b (a.py:12) -> a (b.py:40)``: the chain, with where each import is written."""
    steps = [cycle[0]]
    for source, target in zip(cycle[:-1], cycle[1:], strict=True):
        path, line = graph[source][target]
        steps.append(f"{target} ({path.relative_to(root.parent)}:{line})")
    return " -> ".join(steps)


# ----------------------------------------------------------------------------- sculpt


def test_sculpt_has_no_import_cycle() -> None:
    root = Path(sculpt.__file__).parent
    graph = import_graph(root)
    assert "sculpt.metrics.features" in graph and graph["sculpt"], "the walker found no sculpt modules"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in sculpt:\n" + "\n".join(describe(cycle, graph, root) for cycle in cycles)


def test_import_sculpt_stays_light() -> None:
    code = f"import sys, sculpt; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == [], f"`import sculpt` imports {result.stdout.split()}"


# ----------------------------------------------------------------------------- the walker


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return root / "pkg"


ACYCLIC = {
    "pkg/__init__.py": """
        from __future__ import annotations
        from . import a
        from .sub import helper
        __version__ = "1"
    """,
    "pkg/a.py": """
        import os
        import pkg.sub.c
        from . import b
        from .b import f
    """,
    "pkg/b.py": """
        def f():
            from pkg.sub.d import g
            return g
    """,
    "pkg/sub/__init__.py": """
        from .c import helper
    """,
    "pkg/sub/c.py": """
        from .. import b
        from ..b import f as helper
        class C:
            def method(self):
                from .d import g
    """,
    "pkg/sub/d.py": """
        def g():
            pass
    """,
}


def test_walker_resolves_every_import_form(tmp_path: Path) -> None:
    root = _write_package(tmp_path, ACYCLIC)
    graph = import_graph(root)
    edges = {source: sorted(targets) for source, targets in graph.items()}
    assert edges == {
        "pkg": ["pkg.a", "pkg.sub"],
        "pkg.a": ["pkg.b", "pkg.sub.c"],
        "pkg.b": ["pkg.sub.d"],
        "pkg.sub": ["pkg.sub.c"],
        "pkg.sub.c": ["pkg.b", "pkg.sub.d"],
        "pkg.sub.d": [],
    }
    assert graph["pkg.sub.c"]["pkg.sub.d"] == (root / "sub" / "c.py", 6)
    assert find_cycles(graph) == []


def test_walker_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import f\n",
        "pkg/b.py": "def f():\n    from .a import g\n",
    }
    root = _write_package(tmp_path, files)
    graph = import_graph(root)
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert describe(find_cycles(graph)[0], graph, root) == "pkg.a -> pkg.b (pkg/a.py:1) -> pkg.a (pkg/b.py:2)"


def test_walker_finds_a_cycle_through_a_method_deep_in_a_package(tmp_path: Path) -> None:
    root = _write_package(tmp_path, {**ACYCLIC, "pkg/sub/d.py": "class D:\n    def g(self):\n        import pkg.a\n"})
    graph = import_graph(root)
    # pkg.a -> pkg.b -> pkg.sub.d -> pkg.a, and pkg.a -> pkg.sub.c -> pkg.sub.d -> pkg.a.
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.d", "pkg.a"]]
    assert ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.sub.d"] in _components(graph)


@pytest.mark.parametrize(
    ("files", "cycle"),
    [
        # A submodule importing a name from its package while the package imports it back.
        ({"pkg/__init__.py": "from .a import x\n", "pkg/a.py": "from pkg import y\n"}, ["pkg", "pkg.a", "pkg"]),
        # Naming a submodule from its package is an edge to the submodule only: no cycle.
        ({"pkg/__init__.py": "from .a import x\n", "pkg/a.py": "from . import b\n", "pkg/b.py": ""}, None),
        # ``import a.b`` is an edge to ``a.b``, not to the package ``a``.
        ({"pkg/__init__.py": "from . import a\n", "pkg/a.py": "def f():\n    import pkg.b\n", "pkg/b.py": ""}, None),
    ],
)
def test_walker_edges_into_packages(tmp_path: Path, files: dict[str, str], cycle: list[str] | None) -> None:
    graph = import_graph(_write_package(tmp_path, files))
    assert find_cycles(graph) == ([cycle] if cycle else [])
