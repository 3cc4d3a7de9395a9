"""The package is layered: no import cycle between modules, and no layer imports a
layer above it.  Read from the source (ast), function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tidings

ROOT = Path(tidings.__file__).resolve().parent

#: Lower numbers are lower layers; a module may import its own layer or lower ones.
LAYER = {
    "tidings.log": 0, "tidings.config": 0,
    "tidings.wire": 1,
    "tidings.auth": 2, "tidings.routing": 2, "tidings.store": 2,
    "tidings.cluster": 3, "tidings.service": 3, "tidings.webhooks": 3,
    "tidings.server": 4,
    "tidings.client": 5, "tidings.cli": 5, "tidings.__main__": 6,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tidings"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tidings"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name}
            for name, path in modules.items()}


def layer_of(module: str) -> int | None:
    for prefix in sorted(LAYER, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYER[prefix]
    return None


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    edges = graph()
    assert "tidings.wire.protocol" in edges["tidings.server.hub"]


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_the_cycle_check_can_fail():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


@pytest.mark.parametrize("module", sorted(graph()))
def test_imports_only_its_layer_or_lower(module):
    mine = layer_of(module)
    if module == "tidings":
        return
    assert mine is not None, f"{module} has no layer in tests/test_layers.py"
    upward = [m for m in graph()[module] if m != "tidings" and (layer_of(m) or 0) > mine]
    assert upward == [], f"{module} (layer {mine}) imports higher layers: {upward}"


def test_no_module_over_600_lines():
    long = {module_name(p): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
