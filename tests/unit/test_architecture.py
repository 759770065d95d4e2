"""The package's shape, checked: layers, no import cycle, short functions.

docs/architecture.md draws the layers; this test keeps the code honest to it.
Every ``import apflab...`` in tooling/apflab (module level or inside a
function) is an edge of the graph.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "tooling" / "apflab"

#: the base: knows nothing of the rest
BASE = {"apflab", "errors", "paths", "process", "retry", "undo"}
#: package → layer; a module may import its own package or a lower layer only
LAYERS = {
    "base": 0,
    "analysis": 1,
    "host": 1,
    "kernel": 1,
    "report": 2,
    "vm": 2,
    "images": 3,
    "lab": 4,
    "run": 5,
    "regress": 6,
    "suite": 6,
    "cli": 7,
    "__main__": 8,
}
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PKG.rglob("*.py"))}


def imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The apflab modules a module imports (``from apflab.x import y`` counts
    ``apflab.x.y`` when that is a module, else ``apflab.x``)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("apflab")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("apflab"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                out.add(full if full in known else node.module)
    return out


def package(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) == 1 or parts[1] in BASE:
        return "base"
    return parts[1]


def test_top_level_holds_only_the_base() -> None:
    top = {p.stem for p in PKG.glob("*.py")} - {"__init__", "__main__"}
    assert top <= BASE, f"loose modules at the top of the package: {sorted(top - BASE)}"


def test_layers_and_no_cycles() -> None:
    trees = modules()
    known = set(trees)
    graph = {m: imports(t, known) - {m} for m, t in trees.items()}
    wrong = []
    for mod, deps in graph.items():
        pkg = package(mod)
        assert pkg in LAYERS, f"{mod}: package {pkg!r} has no layer in this test"
        for dep in deps:
            dpkg = package(dep)
            if pkg == "analysis" and dpkg == "base" and dep != "apflab.errors":
                wrong.append(f"{mod} -> {dep} (analysis imports nothing but errors)")
            elif dpkg != pkg and LAYERS[dpkg] >= LAYERS[pkg]:
                wrong.append(f"{mod} ({pkg}) -> {dep} ({dpkg})")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))
    # a cycle inside one package: depth-first search for a back edge
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, m, d]))
            if d in graph and state.get(d) is None:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_functions_are_short_and_need_no_complexity_waiver() -> None:
    long = []
    waivers = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name}: {n} lines")
        for i, line in enumerate(text.splitlines(), 1):
            if re.search(r"noqa:.*\b(PLR0912|PLR0915|C901)\b", line):
                waivers.append(f"{path.relative_to(PKG)}:{i}")
    assert not long, "functions over 80 lines:\n" + "\n".join(long)
    assert not waivers, "complexity waivers: " + ", ".join(waivers)


def test_no_shell_strings() -> None:
    """Every command is an argv list: no shell, anywhere (ruff's S602/S605 say the same)."""
    shells = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|subprocess\.getoutput\(")
    found = [
        f"{path.relative_to(PKG)}:{i}"
        for path in sorted(PKG.rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if shells.search(line) and not line.lstrip().startswith("#")
    ]
    assert not found, f"shell strings: {found}"
