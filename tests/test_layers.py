"""The packages' layering, read from the source: every import (function-level ones too)
goes down the stack or stays in its package, and no modules import each other in a circle.

Bottom to top: tracer (the kernel side, loaded with BCC) -> scoring (the model) -> intake
(events in) -> exporters (metrics and alerts) -> policy (enforcement policy) -> lab (sandbox,
mock, simulations) -> fleet (the fleet transport) -> imdswatch (the CLI and wiring, imported
by nothing).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("tracer", "scoring", "intake", "exporters", "policy", "lab", "fleet", "imdswatch")
# Never imported by a product package.
OUTSIDE = ("tests", "bench", "scripts", "helpers")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).glob("*.py")):
            name = pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"
            out[name] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (resolved to modules)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known and t.split(".")[0] not in OUTSIDE:
                t = t.rpartition(".")[0]
            if t:
                found.add(t)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_every_import_goes_down_the_stack() -> None:
    upward = []
    for mod, deps in graph().items():
        for dep in deps:
            top = dep.split(".")[0]
            if top in OUTSIDE or (top in LAYERS and layer(dep) > layer(mod)):
                upward.append(f"{mod} imports {dep}")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_modules_import_each_other_in_a_circle() -> None:
    g = {m: {d for d in deps if d in modules()} for m, deps in graph().items()}
    cycles = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "probe.py"
    bad.write_text("def f():\n    from imdswatch.cli import main\n    return main\n")
    found = imports("scoring.probe", bad, set(modules()) | {"scoring.probe"})
    assert "imdswatch.cli" in found
    assert layer("imdswatch.cli") > layer("scoring.probe")
