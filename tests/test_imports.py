"""The import graph of workers/, monitor/ and cli/ has no circle, and the wire contract stays light.

Read with `ast`, not by importing: every import counts, including those under `if TYPE_CHECKING:` and inside
functions, since a circle that only a type checker follows still ties the two modules together.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workers", "monitor", "cli", "gateway")
MAX_CYCLES_SHOWN = 20


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(f): f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))}


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name` refers to: itself if it is one, else its longest known parent package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `module` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES and (target := _known(alias.name, modules)):
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                if node.level - 1 > len(base) - 1:
                    continue  # beyond the top-level package: not ours
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
                if source.split(".")[0] not in PACKAGES:
                    continue
            for alias in node.names:
                # `from . import x` imports the module x when there is one, else a name from the package
                target = f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else _known(source, modules)
                if target:
                    found.add(target)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(m, path, modules) for m, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively; components in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(sorted(component))
    return sorted(out)


def cycles(graph: dict[str, set[str]], limit: int = MAX_CYCLES_SHOWN) -> list[list[str]]:
    """Simple cycles, each starting at its smallest module (so each is listed once), at most `limit`."""
    found: list[list[str]] = []

    def walk(path: list[str], members: set[str]) -> None:
        start = path[0]
        for nxt in sorted(graph[path[-1]] & members):
            if len(found) >= limit:
                return
            if nxt == start:
                found.append([*path, start])
            elif nxt > start and nxt not in path:
                walk([*path, nxt], members)

    for component in strongly_connected(graph):
        if len(component) > 1:
            for start in component:
                walk([start], set(component))
    return found


def test_the_graph_sees_every_package():
    graph = import_graph()
    assert {"workers.protocol", "monitor.registry", "cli.client"} <= graph.keys()
    assert "workers.protocol" in graph["monitor.registry"] and "workers.protocol" in graph["cli.client"]


def test_no_import_circle_across_workers_monitor_and_cli():
    found = cycles(import_graph())
    assert not found, "import circles (TYPE_CHECKING and function-level imports included):\n" + "\n".join(
        "  " + " -> ".join(c) for c in found)


def test_the_wire_contract_imports_only_stdlib_and_pydantic():
    path = ROOT / "workers" / "protocol.py"
    project = imports_of("workers.protocol", path, project_modules())
    assert not project, f"workers/protocol.py imports project modules: {sorted(project)}"
    third_party = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        for name in names:
            top = name.split(".")[0]
            if top != "__future__" and top not in sys.stdlib_module_names:
                third_party.add(top)
    assert third_party <= {"pydantic"}, f"workers/protocol.py must stay light; it imports {sorted(third_party)}"
