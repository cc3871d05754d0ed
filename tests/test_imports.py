"""The import graph of `workers` and `producer`: no cycles, and every deferred import says why."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("workers", "producer")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def project_module(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imported(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """The project modules one import statement loads (`from pkg import sub` loads `pkg.sub`)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return {m for m in map(project_module, names) if m and m != module}


def is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def graph() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """Import-time edges (type-only imports left out), and the imports deferred into functions."""
    edges: dict[str, set[str]] = defaultdict(set)
    deferred: list[tuple[str, int, str]] = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()

        def visit(node: ast.AST, in_function: bool, module: str = module, lines: list[str] = lines) -> None:
            for child in ast.iter_child_nodes(node):
                if is_type_checking(child):
                    continue
                if isinstance(child, ast.Import | ast.ImportFrom) and (targets := imported(child, module)):
                    if in_function:
                        deferred.append(
                            (module, child.lineno, "\n".join(lines[child.lineno - 2 : child.lineno]))
                        )
                    else:
                        edges[module] |= targets
                visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

        visit(ast.parse(path.read_text()), False)
    return edges, deferred


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v) :]
            del stack[stack.index(v) :]
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            strong(module)
    return found


def test_the_import_graph_has_no_cycle() -> None:
    edges, _ = graph()
    assert edges["producer.cli"] and edges["workers.tasks"]  # the walk sees real edges
    assert cycles(edges) == []


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_deferred_project_import_says_why() -> None:
    _, deferred = graph()
    # the reason is a comment on the import's line or on the line above it
    unexplained = [f"{m}:{line}: {text.strip()}" for m, line, text in deferred if "#" not in text]
    assert unexplained == []
    assert len(deferred) <= 5, deferred  # deferring is the exception: a new one needs a reason here too


def test_producer_reaches_into_no_private_celery_or_sqlalchemy_name() -> None:
    private = []
    for module, path in MODULES.items():
        if not module.startswith("producer"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                "celery",
                "sqlalchemy",
            ):
                private += [f"{module}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
                private += [
                    f"{module}: {node.module}" for part in node.module.split(".") if part.startswith("_")
                ]
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                owner = ast.unparse(node.value)
                if owner not in ("self", "cls"):
                    private.append(f"{module}:{node.lineno}: {owner}.{node.attr}")
    assert private == []
