"""The layering stays one-way: no import circles among `src/` modules, and the library never imports the CLI.

Imports are read from the source with `ast`, at module level and inside functions alike, so a lazy
import that closes a circle is caught as surely as a top-level one. Relative imports are resolved
against the importing module's package. See docs/architecture.md for the layers themselves.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "med3dvlm"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _source_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _imported_modules(path: Path, module: str, modules: set[str]) -> set[str]:
    """The src modules `module` imports, relative imports made absolute.

    `from pkg import name` depends on `pkg.name` when that is a module, and on `pkg` itself when
    `name` is something `pkg/__init__.py` defines. The parent packages Python runs on the way to a
    module are not counted: they are not a dependency the importing code chose.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    # The package a relative import counts from: the module itself for a package's __init__.
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            if prefix not in modules:
                continue
            for alias in node.names:
                submodule = f"{prefix}.{alias.name}"
                found.add(submodule if submodule in modules else prefix)
    return found - {module}


def import_graph() -> dict[str, set[str]]:
    """Module -> the src modules it imports, at module level or inside functions."""
    paths = _source_modules()
    return {module: _imported_modules(path, module, set(paths)) for module, path in paths.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
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
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A concrete path a -> b -> ... -> a inside a component, so the failure message names the edges to cut."""
    members = set(component)
    start = component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for nxt in sorted(graph[node] & members):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if nxt not in parent:
                parent[nxt] = node
                frontier.append(nxt)
    return component


def test_the_graph_sees_the_whole_package():
    graph = import_graph()
    assert f"{PACKAGE}.registry" in graph and f"{PACKAGE}.cli" in graph
    # The package __init__ fills the registry by importing the models package.
    assert f"{PACKAGE}.models" in graph[PACKAGE]


def test_no_import_circles():
    graph = import_graph()
    cycles = import_cycles(graph)
    message = "\n".join(" -> ".join(_one_cycle(graph, c)) + f"   ({len(c)} modules)" for c in cycles)
    assert not cycles, f"{len(cycles)} import circle(s) among src modules:\n{message}"


def _in_cli_layer(module: str) -> bool:
    # `python -m med3dvlm` is the command line's second entry point, so it belongs to that layer.
    cli = f"{PACKAGE}.cli"
    return module in (cli, f"{PACKAGE}.__main__") or module.startswith(cli + ".")


def test_library_never_imports_the_cli():
    graph = import_graph()
    offenders = {
        module: sorted(t for t in targets if _in_cli_layer(t))
        for module, targets in graph.items()
        if not _in_cli_layer(module)
    }
    offenders = {m: t for m, t in offenders.items() if t}
    assert not offenders, f"library modules import the CLI: {offenders}"


def test_no_main_blocks_in_library_modules():
    found = []
    for module, path in _source_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.If)
                and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name)
                and node.test.left.id == "__name__"
            ):
                found.append(module)
    assert not found, f"`if __name__ == ...` blocks in library modules: {found}"


def test_cycle_finder_finds_a_planted_circle():
    # Guards the guard: a graph with a known circle must be reported, with a path that closes.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    cycles = import_cycles(graph)
    assert cycles == [["a", "b", "c"]]
    path = _one_cycle(graph, cycles[0])
    assert path[0] == path[-1] == "a" and len(path) == 4
