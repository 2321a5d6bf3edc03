"""Print eva_repro's module import graph (every `import` / `from` in each module, including the
ones inside functions), any import cycle and any import that points up the package order:
`python tools/import_graph.py [--check]`.

LAYERS orders the sub-packages (docs/layout.md): a module may import modules of its own package
or of the packages above it, never below. A module that no layer names is an error too, so a new
package is placed on purpose. --check exits 1 on a cycle, an upward import
or an unplaced module (tests/test_imports.py runs it in CI)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "eva_repro"
LAYERS = [  # sub-packages, bottom up: each imports only its own package and those above it
    ["", "utils", "utils.*"],
    ["data", "data.*"],
    ["flow", "flow.*"],
    ["model", "model.*"],
    ["training", "training.*"],
    ["evaluation", "evaluation.*"],
    ["testbed", "testbed.*"],
    ["commands", "demo", "bench", "bench.*", "cli", "__main__"],
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The eva_repro modules `path` imports (a `from pkg import name` counts pkg.name if that is a
    module, else pkg)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {m: imports_of(p, known) - {m} - {m.rsplit(".", 1)[0]} for m, p in sorted(files.items())}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in g:
        if v not in index:
            visit(v)
    return out


def layer_of(module: str, layers: list[list[str]] = LAYERS) -> int | None:
    """The index of the module's layer (`bench.*` places every module of a subpackage)."""
    name = module.removeprefix("eva_repro").removeprefix(".")
    for i, layer in enumerate(layers):
        if name in layer or any(p.endswith(".*") and name.startswith(p[:-1]) for p in layer):
            return i
    return None


def upward_imports(g: dict[str, set[str]], layers: list[list[str]] = LAYERS) -> list[str]:
    """One line per import of a module in a later layer, and per module in no layer."""
    problems = [f"{m}: in no layer of LAYERS" for m in g if layer_of(m, layers) is None]
    for m, deps in g.items():
        here = layer_of(m, layers)
        for dep in sorted(deps):
            there = layer_of(dep, layers)
            if here is not None and there is not None and there > here:
                problems.append(f"{m} imports {dep}, which is further down the pipeline")
    return problems


def main(argv: list[str]) -> int:
    g = graph()
    for m, deps in g.items():
        print(f"{m} -> {', '.join(sorted(deps)) or '-'}")
    found = cycles(g)
    for group in found:
        print("cycle: " + " <-> ".join(group))
    upward = upward_imports(g)
    for line in upward:
        print(line)
    return 1 if (found or upward) and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
