"""No import cycles between the modules of ``services``: inside each service package, and across packages.

The graph is read from the source with :mod:`ast`, without importing anything. An edge ``a -> b`` is any
``import`` or ``from ... import`` in module ``a`` that names module ``b`` of the tree (absolute or relative),
wherever it stands, and that includes imports under ``if TYPE_CHECKING:`` and inside functions: such an import
is still a dependency of ``a`` on ``b``, and a cycle of them is one moved import away from failing at start-up
(``from a import x`` while ``a`` is half-initialised). A package whose modules need each other's types breaks the
cycle with a module of its own for the shared type, or with a ``Protocol`` on the side that uses it.

Not edges: the implicit import of the parent packages that every ``from pkg.mod import x`` runs (a package's
``__init__`` re-exports its modules, and that is not a cycle), and a module importing itself by name (as
``services/shared/embedded.py`` does when it runs as ``__main__``). ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg`` itself.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def module_name(path: Path, root: Path) -> str:
    """``services/replay/faults.py`` -> ``services.replay.faults``; a package is named by its ``__init__``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules_under(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` (a dotted name under ``root``) and of its subpackages."""
    base = root.joinpath(*package.split("."))
    return {module_name(path, root): path for path in sorted(base.rglob("*.py"))}


def imports_of(name: str, path: Path, known: Mapping[str, Path]) -> set[str]:
    """The modules of ``known`` that module ``name`` imports (see the module docstring for what counts)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                source = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    found.add(f"{source}.{alias.name}")
                elif source in known:
                    found.add(source)
    found.discard(name)
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same tree it imports."""
    known = modules_under(root, package)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def reachable(graph: Mapping[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def shortest_cycle(graph: Mapping[str, set[str]], start: str) -> list[str]:
    """The shortest path ``start -> ... -> start`` (``start`` must be on a cycle)."""
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node]):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    raise ValueError(f"{start} is on no cycle")


def cycle_groups(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or not (strongly connected components)."""
    reach = {name: reachable(graph, name) for name in graph}
    done: set[str] = set()
    groups = []
    for name in sorted(graph):
        if name in done or name not in reach[name]:
            continue
        group = sorted(other for other in reach[name] if name in reach[other])
        done.update(group)
        groups.append(group)
    return groups


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """One shortest cycle per group of modules that import each other."""
    return [shortest_cycle(graph, group[0]) for group in cycle_groups(graph)]


def describe(graph: Mapping[str, set[str]]) -> str:
    lines = [
        f"  {' -> '.join(shortest_cycle(graph, group[0]))}  (the group: {', '.join(group)})"
        for group in cycle_groups(graph)
    ]
    return "import cycles:\n" + "\n".join(lines)


def service_packages() -> Iterator[str]:
    for init in sorted((REPO / "services").glob("*/__init__.py")):
        yield f"services.{init.parent.name}"


@pytest.mark.parametrize("package", list(service_packages()))
def test_service_package_has_no_import_cycle(package: str) -> None:
    graph = import_graph(REPO, package)
    found = cycles(graph)
    assert not found, describe(graph)


def test_no_import_cycle_across_the_services_tree() -> None:
    graph = import_graph(REPO, "services")
    assert "services.replay.exchange" in graph and "services.shared.kafka" in graph
    found = cycles(graph)
    assert not found, describe(graph)


# ------------------------------------------------------------------------------------- the checker itself


def write(root: Path, files: Mapping[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_a_cycle_through_type_checking_imports_is_found(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "pkg/__init__.py": "from pkg.a import A\n",
            "pkg/a.py": "from pkg.b import B\nclass A: ...\n",
            "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import C\nclass B: ...\n",
            "pkg/c.py": "from . import a\nclass C: ...\n",
            "pkg/d.py": "import pkg.a\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.c"] == {"pkg.a"}, "a relative import of a sibling module"
    assert graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_package_init_self_imports_and_lazy_imports(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            # The package re-exports its modules: the implicit import of the package is not an edge back.
            "pkg/__init__.py": "from pkg.a import A\n",
            "pkg/a.py": "from pkg.b import f\nclass A: ...\nif __name__ == '__main__':\n    from pkg import a\n",
            # A lazy import inside a function still counts, and so does an explicit import of the package.
            "pkg/b.py": "def f() -> None:\n    from pkg import A\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg"}}
    assert cycles(graph) == [["pkg", "pkg.a", "pkg.b", "pkg"]]
