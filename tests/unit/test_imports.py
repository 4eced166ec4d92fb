"""The package rules, read from the source (every import statement, those inside functions included): no
import cycle between lm's packages, lm.serve never imports lm.train, and nothing in lm imports jobs."""

import ast
from itertools import pairwise
from pathlib import Path

LM = Path(__file__).parents[2] / "lm"


def package_of(module: str) -> str:
    """``lm.train.loop`` → ``lm.train``; ``lm.cli`` → ``lm.cli``."""
    return ".".join(module.split(".")[:2])


def imported_modules(path: Path) -> set[str]:
    """The absolute module names ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] if node.module == "lm" else []
            found |= {node.module, *names}
    return found


def package_graph() -> dict[str, dict[str, str]]:
    """package → {package it imports: one file that does}, between lm's packages."""
    graph: dict[str, dict[str, str]] = {}
    for path in sorted(LM.rglob("*.py")):
        module = ".".join(path.relative_to(LM.parent).with_suffix("").parts)
        source = package_of(module)
        for target in imported_modules(path):
            if target.startswith("lm.") and package_of(target) != source:
                graph.setdefault(source, {}).setdefault(package_of(target), str(path.relative_to(LM.parent)))
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Each cycle once (as the path that closes it), by depth-first search."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph.get(node, {}):
            if nxt in path:
                found.append([*path[path.index(nxt):], nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    return found


def test_the_package_graph_has_no_cycle_and_keeps_its_walls():
    graph = package_graph()
    assert graph["lm.train"] and "lm.storage" in graph["lm.train"]  # the walk did read the imports
    loops = [" -> ".join(f"{a} ({graph[a][b]})" for a, b in pairwise(c)) + f" -> {c[-1]}" for c in cycles(graph)]
    assert loops == [], loops
    assert "lm.train" not in graph.get("lm.serve", {}), graph["lm.serve"]["lm.train"]
    users_of_jobs = [str(p) for p in LM.rglob("*.py") if any(m.split(".")[0] == "jobs" for m in imported_modules(p))]
    assert users_of_jobs == []


def test_the_cycle_check_finds_a_cycle_through_an_import_inside_a_function():
    graph = {"lm.a": {"lm.b": "lm/a.py"}, "lm.b": {"lm.c": "lm/b.py"}, "lm.c": {"lm.a": "lm/c/x.py"}, "lm.d": {}}
    assert cycles(graph) == [["lm.a", "lm.b", "lm.c", "lm.a"]]
    source = ast.parse("def f():\n    from lm.train.local import train_local\n")
    assert any(isinstance(n, ast.ImportFrom) and n.module == "lm.train.local" for n in ast.walk(source))
