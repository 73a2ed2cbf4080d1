"""The layers of the source, read from its own imports (function-level ones included): each package
imports only the packages below it, no two modules import each other through any chain, and only
``shards/`` knows the tar bytes."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What each package may import besides itself (README, "Layout").
ALLOWED = {
    "common": set(),
    "shards": {"common"},
    "batches": {"common", "shards"},
    "models": {"common", "shards"},
    "convert": {"common", "shards", "batches", "models"},  # batches and models for --check-teacher
    "train": {"common", "shards", "batches", "models"},
    "relabel": {"common", "shards", "batches", "models", "convert"},
    "demo": {"common", "shards", "batches", "models", "convert", "train", "relabel"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in ALLOWED:
        for path in sorted((ROOT / package).glob("*.py")):
            name = f"fkd_shards.{package}" if path.stem == "__init__" else f"fkd_shards.{package}.{path.stem}"
            found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project's modules that ``name`` imports, at any depth of its code."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            # `from pkg import module` names a module; `from module import name` the module itself
            targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {t for t in targets if t in modules and t != name}


GRAPH = {name: _imports(name, path, _modules()) for name, path in _modules().items()}


def test_every_package_imports_only_the_layers_below_it():
    wrong = [f"{a} -> {b}" for a, deps in GRAPH.items() for b in deps
             if b.split(".")[1] != a.split(".")[1] and b.split(".")[1] not in ALLOWED[a.split(".")[1]]]
    assert not wrong, wrong
    assert GRAPH["fkd_shards.relabel.pipeline"] and GRAPH["fkd_shards.train.loop"]  # the graph was read


def test_no_module_imports_itself_through_a_chain():
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(GRAPH[start])
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(GRAPH[m])
        return False

    cycles = sorted(f"{a} <-> {b}" for a, deps in GRAPH.items() for b in deps if reaches(b, a))
    assert not cycles, cycles


def test_only_shards_parses_tar_bytes():
    users = sorted(a for a, deps in GRAPH.items() if "fkd_shards.shards.tar" in deps and a.split(".")[1] != "shards")
    assert not users, users
