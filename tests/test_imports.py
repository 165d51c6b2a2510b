"""The package's shape, read statically: the trust boundary is a folder boundary, no import circles,
no module over 400 lines (issue 31).

Every ``.py`` under ``fedslm/``, ``clients/`` and ``server/`` is parsed with :mod:`ast` (nothing is
imported, so the test is fast and sees imports that only run inside a function). An import names the
most specific module that exists in the tree: ``from fedslm.node import secagg`` is an edge to
``fedslm.node.secagg``, ``from fedslm.config import Config`` one to ``fedslm.config`` (its
``__init__``); the parent packages an import also runs are not edges of their own (a package's
``__init__`` re-exporting its submodules would otherwise count as a circle with each of them).

* **Boundary rules** count every import, at module level, inside a function or a class, or under
  ``if TYPE_CHECKING:``: a dependency across the boundary is one wherever it is written.
  The node's side (``fedslm.node``, ``clients``) never imports the coordinator's (``fedslm.coordinator``,
  ``server``) and the other way round; the coordinator's side never imports ``fedslm.data`` (an
  institution's data code: labels reach the coordinator in the run config or a public task description);
  ``fedslm.config`` never imports ``fedslm.wire`` (the protocol reads the run config, so the other way
  round is a circle, even through a function-level import).
* **Circles** count module-level imports only (also inside ``try``/``if`` and class bodies at module
  level, which run at import), not those inside functions (they run after every module has loaded)
  nor those under ``if TYPE_CHECKING:`` or ``if __name__ == "__main__":`` (they never run on import):
  a circle is a strongly connected set of two or more modules of ``fedslm``, or a module importing itself.

Violations that remain in files other work is still changing are listed in ``KNOWN`` (importer,
imported); each must still be a violation, so the list can only shrink: whoever fixes one removes it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedslm", "clients", "server")
MAX_LINES = 400

NODE_SIDE = ("fedslm.node", "clients")
COORDINATOR_SIDE = ("fedslm.coordinator", "server")
DATA = ("fedslm.data",)
CONFIG = ("fedslm.config",)
WIRE = ("fedslm.wire",)

# (importer, imported): violations left for the lead to fix after the merge (issue 31, item 3).
KNOWN_BOUNDARY: set[tuple[str, str]] = set()
KNOWN_CIRCLES: set[tuple[str, str]] = set()
# path: lines today (a ceiling of that + 50 until the module is split under MAX_LINES; issue 31).
KNOWN_LONG = {
}


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    path: str
    line: int
    module_level: bool  # runs when the importer is imported (not in a function, not under TYPE_CHECKING)

    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported}"


def _sources() -> dict[str, Path]:
    """{module name: file} for every module of the tree."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_main_guard(test: ast.expr) -> bool:
    """``if __name__ == "__main__":``: runs when the file is a script, never when it is imported."""
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and len(test.comparators) == 1 and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


def _imports(tree: ast.Module):
    """(import node, runs at module import) for every import statement of a module."""
    def walk(node: ast.AST, runs: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, runs
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, False)
            elif isinstance(child, ast.If) and (_is_type_checking(child.test) or _is_main_guard(child.test)):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), runs)
            else:
                yield from walk(child, runs)
    yield from walk(tree, True)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a module of the tree (None: outside it)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def import_graph() -> list[Edge]:
    modules = _sources()
    edges = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node, runs in _imports(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from a.b import c``: the submodule a.b.c when there is one, else a.b itself.
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for name in dict.fromkeys(names):
                target = _resolve(name, modules)
                if target is not None:
                    edges.append(Edge(module, target, str(path.relative_to(ROOT)), node.lineno, runs))
    return edges


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def boundary_violations(edges: list[Edge]) -> list[tuple[Edge, str]]:
    rules = [(NODE_SIDE, COORDINATOR_SIDE, "the node's side imports the coordinator's"),
             (COORDINATOR_SIDE, NODE_SIDE, "the coordinator's side imports the node's"),
             (COORDINATOR_SIDE, DATA, "the coordinator's side imports an institution's data code"),
             (CONFIG, WIRE, "the config imports the protocol (the wire reads the config, never the other way round)")]
    return [(e, why) for e in edges for src, dst, why in rules if _within(e.importer, src) and _within(e.imported, dst)]


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative): the circles are those of two or more modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
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
    return out


def circle_edges(edges: list[Edge], ignore: frozenset[tuple[str, str]] = frozenset()) -> list[Edge]:
    """The module-level imports of fedslm that lie on a circle (with the ``ignore`` pairs left out of the graph)."""
    inside = [e for e in edges if e.module_level and (e.importer, e.imported) not in ignore
              and _within(e.importer, ("fedslm",)) and _within(e.imported, ("fedslm",))]
    graph: dict[str, set[str]] = {}
    for e in inside:
        graph.setdefault(e.importer, set()).add(e.imported)
        graph.setdefault(e.imported, set())
    where = {m: i for i, c in enumerate(_components(graph)) for m in c if len(c) > 1}
    return [e for e in inside
            if e.importer == e.imported or (e.importer in where and where[e.importer] == where.get(e.imported))]


def _report(lines: list[str]) -> str:
    return "\n" + "\n".join(sorted(set(lines)))


def test_no_import_crosses_a_folder_boundary():
    """node <-> coordinator, coordinator -> fedslm.data, config -> wire (see the module docstring)."""
    new = [f"{e.where()} ({why})" for e, why in boundary_violations(import_graph())
           if (e.importer, e.imported) not in KNOWN_BOUNDARY]
    assert not new, "imports across the trust boundary:" + _report(new)


def test_no_import_circle_between_modules_of_fedslm():
    new = [e.where() for e in circle_edges(import_graph(), frozenset(KNOWN_CIRCLES))]
    assert not new, "module-level imports on a circle (break it; a function-level import is not a fix " \
                    "for a concept in the wrong module):" + _report(new)


def test_every_known_violation_is_still_one():
    """The KNOWN lists only shrink: an entry whose violation was fixed must be removed from them."""
    edges = import_graph()
    crossing = {(e.importer, e.imported) for e, _ in boundary_violations(edges)}
    circling = {(e.importer, e.imported) for e in circle_edges(edges)}
    stale = sorted(KNOWN_BOUNDARY - crossing) + sorted(KNOWN_CIRCLES - circling)
    assert not stale, f"fixed, remove from KNOWN_BOUNDARY / KNOWN_CIRCLES in {Path(__file__).name}: {stale}"


def _line_counts() -> dict[str, int]:
    return {str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
            for path in _sources().values()}


def test_no_module_is_over_400_lines():
    """Modules split by concept stay readable; a module on KNOWN_LONG may not grow past its count + 50."""
    counts = _line_counts()
    long = [f"{path}: {n} lines (at most {MAX_LINES})" for path, n in counts.items()
            if n > MAX_LINES and path not in KNOWN_LONG]
    grown = [f"{path}: {counts[path]} lines, past its ceiling {KNOWN_LONG[path] + 50} (split it instead)"
             for path in KNOWN_LONG if path in counts and counts[path] > KNOWN_LONG[path] + 50]
    assert not long + grown, "modules over the limit:" + _report(long + grown)


def test_every_known_long_module_is_still_long():
    counts = _line_counts()
    stale = sorted(path for path in KNOWN_LONG if counts.get(path, 0) <= MAX_LINES)
    assert not stale, f"split (or gone), remove from KNOWN_LONG in {Path(__file__).name}: {stale}"


def test_the_walker_sees_what_the_rules_are_about():
    """The rules above pass vacuously if the walker sees nothing: it must find imports at every level
    (module, function, TYPE_CHECKING) and a circle and a crossing in a made-up tree."""
    tree = ast.parse("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\n"
                     "try:\n    import b\nexcept ImportError:\n    pass\ndef f():\n    import c\n"
                     "class K:\n    import d\nif __name__ == '__main__':\n    import e\n")
    seen = {(n.names[0].name if isinstance(n, ast.Import) else n.module, runs) for n, runs in _imports(tree)}
    assert seen == {("os", True), ("typing", True), ("a", False), ("b", True), ("c", False), ("d", True),
                    ("e", False)}
    edges = [Edge("fedslm.x", "fedslm.y", "x.py", 1, True), Edge("fedslm.y", "fedslm.x", "y.py", 2, True),
             Edge("fedslm.y", "fedslm.z", "y.py", 3, True), Edge("fedslm.z", "fedslm.x", "z.py", 4, False)]
    assert {e.line for e in circle_edges(edges)} == {1, 2}  # z -> x runs in a function: no circle through z
    assert circle_edges(edges, frozenset({("fedslm.x", "fedslm.y")})) == []
    crossing = [Edge("fedslm.node.a", "fedslm.coordinator.b", "a.py", 1, False),
                Edge("server.app", "fedslm.data.tasks", "app.py", 1, False),
                Edge("fedslm.coordinator.b", "fedslm.wire.codec", "b.py", 1, True),
                Edge("fedslm.config.load", "fedslm.wire.secagg", "load.py", 1, False),
                Edge("fedslm.wire.secagg", "fedslm.config.secagg", "secagg.py", 1, True)]
    assert [e.path for e, _ in boundary_violations(crossing)] == ["a.py", "app.py", "load.py"]
    edges = import_graph()
    assert any(e.importer == "clients.app" and e.imported == "fedslm.node.app" for e in edges)
    assert any(not e.module_level for e in edges) and any(e.module_level for e in edges)
