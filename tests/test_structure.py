"""The package's structure, drawn from its imports: arrows run one way, front ends → commands →
library, and no bench script patches library internals.

Every ``.py`` under medcurate/, service/ and jobs/ is parsed (not imported) and every import
statement in it counted: module level and inside functions alike, relative ones resolved, since
a lazy import is as much a dependency as an eager one (it only runs later).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from medcurate.commands import COMMANDS

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("medcurate", "service", "jobs")
CLI = "medcurate.cli"
FRONT_END_CLI = "service.cli"  # the ``medcurate`` program: library CLI + serve/submit/jobs
# The modules whose functions the COMMANDS entries run: front ends reach them through
# ``medcurate.commands`` only, so that every front end runs a command the same way.
RUNNER_MODULES = {entry.runner.split(":")[0] for entry in COMMANDS.values()}
# Where the service legitimately reaches past COMMANDS, and why; nothing else may.
SERVICE_ALLOWANCES = {
    # POST /v1/select selects in the request, reading runs through the replica's InputsCache
    # (a job would read the run again on every request), and the selection routes read what
    # select publishes (read_selection, SUMMARY_FILE, SELECTION_FILE, REPORT_FILE).
    ("service.api", "medcurate.select.run"),
    # A selection made over HTTP has its report drawn later, off the request's path, as a Ray
    # task (render_report, has_report).
    ("service.reports", "medcurate.select.run"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {module_name(path): path for package in PACKAGES
           for path in sorted((REPO / package).rglob("*.py"))}


def _resolved(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names: ``from .x import y`` in package ``p``
    is ``p.x``."""
    if not node.level:
        return node.module
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _known(name: str) -> str | None:
    """The deepest module of ours that ``name`` (a module, or a name in a module) is."""
    while name and name not in SOURCES:
        name = name.rpartition(".")[0]
    return name or None


def imported_names(module: str) -> set[str]:
    """Every dotted name a module imports: ``import a.b`` gives ``a.b``; ``from a import b``
    gives ``a.b`` (a module or a name in ``a``)."""
    path = SOURCES[module]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolved(module, path, node)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def imports(module: str) -> set[str]:
    """The modules of ours that ``module`` imports."""
    found = {_known(name) for name in imported_names(module)}
    return {name for name in found if name and name != module}


GRAPH = {module: imports(module) for module in SOURCES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _importers(target, among) -> list[str]:
    """The modules in ``among`` that import a module for which ``target(name)`` holds."""
    return sorted(module for module in among
                  if any(target(name) for name in GRAPH[module]))


def _under(*packages: str):
    return lambda name: any(name == p or name.startswith(p + ".") for p in packages)


def test_the_graph_is_read():
    assert {"medcurate.cli", "medcurate.commands", "service.api", "jobs.run"} <= set(GRAPH)
    assert "medcurate.commands" in GRAPH["jobs.run"]
    assert "medcurate.select.run" in GRAPH["service.api"]  # a function-level import


def loop(component: list[str]) -> str:
    """One cycle through a component's first module, as ``a -> b -> ... -> a``."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(GRAPH[node] & members):
            if nxt == start:
                return " -> ".join([*paths[node], start])
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise AssertionError(f"{component} is not a cycle")


def _described(found: list[list[str]]) -> str:
    return "import cycles: " + "; ".join(loop(component) for component in found)


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, _described(found)


def test_the_library_imports_no_front_end():
    library = [m for m in GRAPH if _under("medcurate")(m)]
    assert _importers(_under("service", "jobs"), library) == []
    assert _importers(lambda name: name == CLI, library) == ["medcurate.__main__"]


def test_only_the_front_end_cli_imports_the_library_cli():
    front_ends = [m for m in GRAPH if _under("service", "jobs")(m)]
    assert _importers(lambda name: name == CLI, front_ends) == [FRONT_END_CLI]


@pytest.mark.parametrize("module", sorted(m for m in SOURCES if _under("service", "jobs")(m)))
def test_front_ends_start_commands_only_through_commands(module):
    runners = {name for name in GRAPH[module] if name in RUNNER_MODULES
               and (module, name) not in SERVICE_ALLOWANCES}
    assert not runners, f"{module} imports runner module(s) {sorted(runners)}; use COMMANDS"


def _patches(tree: ast.Module) -> list[str]:
    """``x.y = ...`` (or ``setattr(x, ...)``) where ``x`` is bound by an import of medcurate."""
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound.update(alias.asname or "medcurate" for alias in node.names
                         if alias.name.split(".")[0] == "medcurate")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "medcurate":
            bound.update(alias.asname or alias.name for alias in node.names)
    targets = []  # (the statement, the object whose attribute it sets)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets += [(node, t.value) for t in node.targets if isinstance(t, ast.Attribute)]
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and isinstance(node.target,
                                                                              ast.Attribute):
            targets.append((node, node.target.value))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id == "setattr" and node.args):
            targets.append((node, node.args[0]))
    patches = []
    for node, owner in targets:
        while isinstance(owner, ast.Attribute):
            owner = owner.value
        if isinstance(owner, ast.Name) and owner.id in bound:
            patches.append(f"line {node.lineno}: {ast.unparse(node)}")
    return patches


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "bench").glob("*.py")))
def test_bench_scripts_patch_no_library_internals(script):
    """A study that needs the library to behave otherwise (cache, reuse) asks it through
    parameters; assigning to a library module's attribute changes it for every caller."""
    path = REPO / "bench" / script
    patched = _patches(ast.parse(path.read_text(), str(path)))
    assert not patched, f"bench/{script} patches the library: {patched}"
