"""The package layout: no import cycle anywhere in `entk/`.

Every `import` / `from ... import` statement of every module under `entk/` is read with `ast` (at module
level and inside functions alike: a lazy import inside a function is still a dependency, it only hides
a cycle until the function runs). An edge `a -> b` means module `a` names module `b` (for
`from pkg import name`, the submodule `pkg.name` when there is one, else the package `pkg`). Parent
packages a module lives in are not edges: Python runs them first, but they are not what the module
depends on. `entk/__init__.py`'s lazy `_LAZY` table is not an import statement and is not read.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(package: pathlib.Path) -> dict[str, pathlib.Path]:
    return {_module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def import_graph(package: pathlib.Path = ROOT / "entk") -> dict[str, set[str]]:
    """`{module: {modules of the package it imports}}` over every module of `package` (a directory)."""
    modules = _modules(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (_resolve_relative(name, path.name == "__init__.py", node.level, node.module)
                        if node.level else node.module)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import entk.a.b` names entk.a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle `[a, b, ..., a]`, or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_every_kind_of_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.a import f\n",
        "a.py": "import json\nimport pkg.b\n\ndef f():\n    from pkg import c\n",
        "b.py": "from pkg.sub import d\n",
        "c.py": "",
        "sub/__init__.py": "from . import d\nfrom ..c import *\n",
        "sub/d.py": "from .. import c\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    graph = import_graph(package)
    assert graph["pkg"] == {"pkg.a"}
    assert graph["pkg.a"] == {"pkg.b", "pkg.c"}          # module level and inside a function
    assert graph["pkg.b"] == {"pkg.sub.d"}               # `from package import submodule`
    assert graph["pkg.sub"] == {"pkg.sub.d", "pkg.c"}    # relative imports, one and two levels up
    assert graph["pkg.sub.d"] == {"pkg.c"}
    assert find_cycle(graph) is None
    (package / "c.py").write_text("def g():\n    import pkg.a\n")
    cycle = find_cycle(import_graph(package))  # pkg.a -> pkg.b -> pkg.sub.d -> pkg.c -> pkg.a
    assert cycle == ["pkg.a", "pkg.b", "pkg.sub.d", "pkg.c", "pkg.a"]


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_entk():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle in entk/: " + " -> ".join(cycle)
