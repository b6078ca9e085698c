"""The package's dependencies point one way (DESIGN.md, "Layout"): no import cycles, imports inside functions
included, and no module imports a layer above its own. Parsed from the sources, so it sees every import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"tests", "benchmarks", "build", "dist"}

# Layers from the bottom up; a module may import its own layer and those below it. The engine tools
# (evaluation, benchmark, training) sit on the runtime; the root package `nemo3` is the facade over them all.
LAYERS = [
    ("nemo3.export", "nemo3.plugins"),
    ("nemo3.quant",),
    ("nemo3.engines.network",),
    ("nemo3.engines.executors",),
    ("nemo3.engines.runtime",),
    ("nemo3.engines",),  # evaluation/, benchmark, training
    ("nemo3.triton_repo",),
    ("nemo3.pipeline",),
    ("nemo3.cli",),
]


def package_modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP or any(p.startswith(".") for p in rel.parts) or "builtin" in rel.parts:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(["nemo3", *parts])] = path
    return modules


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every nemo3 module `module` imports, anywhere in its body."""
    found = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            names = [f"{stem}.{a.name}" for a in node.names] + [stem]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def layer_of(module: str) -> int | None:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    return None if best is None else best[0]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_parser_sees_imports_inside_functions(graph):
    # engines/runtime/factory.py imports at module level; cli/generate.py only inside its command function
    assert "nemo3.engines.runtime.factory" in graph["nemo3.cli.generate"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_no_module_imports_a_layer_above_its_own(graph):
    upward = [f"{m} -> {t}" for m, targets in sorted(graph.items()) for t in sorted(targets)
              if layer_of(m) is not None and layer_of(t) is not None and layer_of(t) > layer_of(m)]
    assert upward == []


def test_the_network_never_imports_the_runtime(graph):
    network = [m for m in graph if m.startswith("nemo3.engines.network")]
    assert network, "no network modules found"
    assert [f"{m} -> {t}" for m in network for t in graph[m]
            if t.startswith(("nemo3.engines.runtime", "nemo3.engines.executors"))] == []
