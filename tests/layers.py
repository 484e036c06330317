"""The project's import structure, read with `ast` from the source (nothing is imported).

`python tests/layers.py` prints which package imports which (with counts); the layering test
checks every import against LAYERS, lazy imports inside functions included.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("engine", "policies", "scenarios")

# package -> the packages it may import besides itself. Wiring (`engine`'s own modules) sits
# above the role packages it connects; sweeps run experiments, so they sit above the wiring.
CORE = "engine.core"
LAYERS: dict[str, set[str]] = {
    CORE: set(),
    "policies": {CORE},
    "scenarios": {CORE, "policies"},
    "engine.records": {CORE},
    "engine.compute": {CORE, "policies", "scenarios"},
    "engine.backends": {CORE, "policies", "scenarios", "engine.compute"},
    "engine.loops": {CORE, "policies", "scenarios", "engine.compute", "engine.backends",
                     "engine.records"},
    "engine.protocols": {CORE, "policies", "scenarios", "engine.compute", "engine.backends",
                         "engine.loops", "engine.records"},
    "engine": {CORE, "policies", "scenarios", "engine.compute", "engine.backends",
               "engine.loops", "engine.records", "engine.protocols"},
    "engine.sweeps": {CORE, "engine.records", "engine.backends", "engine"},
    # the simulation as gymnasium environments: it steps the engine's own round loop
    "engine.envs": {CORE, "policies", "engine.compute", "engine.backends", "engine.loops",
                    "engine.records", "engine"},
    # offline: reads Parquet; ranks systems with the pure rank aggregators of policies/ranks.py
    "engine.analysis": {CORE, "engine.records", "policies"},
}


def group(module: str) -> str | None:
    """The layer a module belongs to: a role package of engine, engine's wiring, policies or
    scenarios (None for anything outside the project)."""
    parts = module.split(".")
    if parts[0] not in SOURCES:
        return None
    if parts[0] == "engine" and len(parts) > 1 and (ROOT / "engine" / parts[1]).is_dir():
        return f"engine.{parts[1]}"
    return parts[0]


def imports(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every absolute import in a file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.module, node.lineno)]
            if node.module in ("engine", "policies", "scenarios"):  # from engine import x
                out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return out


def modules() -> list[tuple[str, Path]]:
    found = []
    for source in SOURCES:
        for path in sorted((ROOT / source).rglob("*.py")):
            found.append((".".join(path.relative_to(ROOT).with_suffix("").parts), path))
    return found


def edges() -> Counter:
    """(importing layer, imported layer) -> number of import statements."""
    count: Counter = Counter()
    for module, path in modules():
        source = group(module)
        for target, _ in imports(path):
            layer = group(target)
            if layer and layer != source:
                count[source, layer] += 1
    return count


def violations() -> list[str]:
    out = []
    for module, path in modules():
        source = group(module)
        for target, line in imports(path):
            layer = group(target)
            if layer and layer != source and layer not in LAYERS[source]:
                out.append(f"{path.relative_to(ROOT)}:{line}: {source} imports {target}")
    return out


if __name__ == "__main__":
    for (source, target), n in sorted(edges().items()):
        print(f"{source:16s} -> {target:16s} {n:3d}")
    sys.exit(1 if violations() else 0)
