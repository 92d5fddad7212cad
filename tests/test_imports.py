"""The package's import graph has no cycle: no two modules import each other, directly or through others.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import``, at module level or
inside a function (a lazy import is still a dependency), relative ones resolved against the importing module.
Imports under ``if __name__ == "__main__":`` are left out: that code runs only when the file is executed as a
script, as the module ``__main__`` and not as itself (``python -m sparse_tutorial.train`` hands over to
``run.py`` that way).
"""
import ast
import importlib
import pkgutil
from pathlib import Path

import sparse_tutorial

PACKAGE = "sparse_tutorial"
PACKAGE_DIR = Path(sparse_tutorial.__file__).parent


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module below ``root`` (a package's name maps to its ``__init__.py``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, except those under a ``__main__`` guard."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not _is_main_guard(child))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that module ``name`` (file ``path``) imports."""
    found = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:                       # relative: count up from the module's own package
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(here[:len(here) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import sub` names the submodule when there is one, else something defined in pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules and "." in target:   # `import a.b.c` of a name inside a.b
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                found.add(target)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    modules = package_modules(root, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of the graph, or None (depth-first search, three colours)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_package_has_no_import_cycle():
    graph = import_graph(PACKAGE_DIR, PACKAGE)
    assert len(graph) > 20 and graph[f"{PACKAGE}.model"]          # the graph really was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_do_not_import_the_model_or_the_machinery():
    graph = import_graph(PACKAGE_DIR, PACKAGE)
    allowed = {f"{PACKAGE}._checks"}
    for name, deps in graph.items():
        if name.startswith(f"{PACKAGE}.layers"):
            outside = {d for d in deps if not d.startswith(f"{PACKAGE}.layers")} - allowed
            assert not outside, f"{name} imports {sorted(outside)}"


def test_the_checker_finds_lazy_relative_cycles_and_skips_main_guards(tmp_path):
    """The checker itself can fail: a cycle through a function-level, two-dots relative import is found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("from .sub.c import f\n")
    (pkg / "sub" / "c.py").write_text("def f():\n    from ..a import x\n    return x\n")
    (pkg / "d.py").write_text("if __name__ == '__main__':\n    from .e import main\n")
    (pkg / "e.py").write_text("from .d import something\n")
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.sub.c"] == {"pkg.a"} and graph["pkg.d"] == set() and graph["pkg.e"] == {"pkg.d"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(sparse_tutorial.__path__, f"{PACKAGE}.")
             if not m.name.endswith("__main__")]                 # __main__ runs the command
    assert len(names) > 20
    for name in names:
        importlib.import_module(name)
