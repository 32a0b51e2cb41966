"""No module of murmur/ imports a module that imports it back, directly or through others.

The graph is read from the source with `ast`, so nothing is imported. Every `import` counts, also one
inside a function: a function-level import is the usual way a cycle gets hidden (the build runner and its
display once imported each other that way), and the two modules are still one tangle for whoever reads
them. Imports under `if TYPE_CHECKING:` never run and do not count. The implicit import of a package's
`__init__` when one of its modules is imported does not count either; an explicit import of a package
does. `from package import name` is an edge to `package.name` when that is a module, else to `package`.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "murmur"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of `modules` that `tree` imports, relative imports resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from murmur.x import y`: the module murmur.x.y if there is one, else murmur.x itself.
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return (found & modules) - {module}


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the modules under `root` it imports}."""
    paths = {_module_name(p, root): p for p in root.rglob("*.py")}
    return {name: _imports(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py",
                           set(paths))
            for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_a_module_that_imports_it_back():
    graph = import_graph()
    assert "murmur.build" in graph and "murmur.build_types" in graph["murmur.build"]  # the walk sees imports
    found = cycles(graph)
    assert not found, "import cycles (each group imports itself back):\n" + "\n".join(
        " <-> ".join(group) for group in found)


def test_the_walk_finds_direct_longer_and_function_level_cycles(tmp_path):
    pkg = tmp_path / "murmur"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from murmur import b\n")
    (pkg / "b.py").write_text("def f():\n    from murmur.a import thing\n")  # a -> b -> a, inside a function
    (pkg / "c.py").write_text("import murmur.sub.d\n")
    (pkg / "sub" / "d.py").write_text("from . import e\n")
    (pkg / "sub" / "e.py").write_text("from ..c import x\n")  # c -> d -> e -> c, relative imports
    (pkg / "f.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from murmur import g\n")
    (pkg / "g.py").write_text("from murmur.f import y\n")  # f -> g only when type checking: no cycle
    assert cycles(import_graph(pkg)) == [["murmur.a", "murmur.b"], ["murmur.c", "murmur.sub.d", "murmur.sub.e"]]
