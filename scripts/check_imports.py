"""List medssl's upward imports and import circles between its packages (exit 1 if there is any).

    python scripts/check_imports.py

The layers, lowest first: the top-level helpers (config, typed_config, errors, registry, machine), then data, planning, models,
methods, engine, evaluation, advise, sam, report (tables, plots, the HTML report, console output), pipeline (what
orchestrates: the experiment grid, the demo, folder-level refine/propagate), and the entry points (cli,
__main__). A module may import its own package and anything below it; an import of a higher layer is
"upward". Imports inside functions count too (they are dependencies all the same). Circles are reported between
modules, from Python's own ``ast``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "medssl"
LAYERS = [["config", "typed_config", "errors", "registry", "machine", "__init__"], ["data"], ["planning"], ["models"], ["methods"],
          ["engine"], ["evaluation"], ["advise"], ["sam"], ["report"], ["pipeline"], ["cli", "__main__"]]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and "TYPE_CHECKING" in ast.unparse(block.test) for stmt in block.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in type_only:  # annotations only: no import at run time
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("medssl")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medssl") and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def layer(module: str) -> int:
    parts = module.split(".")
    return RANK.get(parts[1] if len(parts) > 1 else "__init__", -1)


def main() -> int:
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {m: {i for i in imports(p) if i in modules and i != m} for m, p in modules.items()}
    upward = sorted((m, i) for m, deps in graph.items() for i in deps if layer(i) > layer(m))
    for m, i in upward:
        print(f"upward import: {m} -> {i}")
    circles, seen = [], set()

    def visit(node, stack, on_stack):
        for nxt in sorted(graph[node]):
            if nxt in on_stack:
                cyc = stack[stack.index(nxt):] + [nxt]
                key = frozenset(cyc)
                if key not in seen:
                    seen.add(key)
                    circles.append(cyc)
            elif nxt not in done:
                visit(nxt, stack + [nxt], on_stack | {nxt})
        done.add(node)

    done: set[str] = set()
    for m in sorted(graph):
        if m not in done:
            visit(m, [m], {m})
    for cyc in circles:
        print("import circle: " + " -> ".join(cyc))
    print(f"{len(modules)} modules: {len(upward)} upward import(s), {len(circles)} circle(s)")
    return 1 if upward or circles else 0


if __name__ == "__main__":
    sys.exit(main())
