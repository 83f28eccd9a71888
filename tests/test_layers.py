"""The import graph of kvtool follows its layers (docs/ARCHITECTURE.md), so it stays true as the code changes.

Every module under ``kvtool/`` is parsed (``ast``; imports inside functions count as much as top-level ones) and
each import of a kvtool module is checked:

- an import may go down the layers or stay on its own floor, never climb (``LAYERS``, bottom first);
- the packages (``kvtool.X``) import each other without cycles (on one floor too: export and models);
- the library never imports the training scripts beside it (``scripts/``).

A failure names the importing file and line, the imported module and the rule it breaks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom floor first. A package is the first component under kvtool (``kvtool.runtime``, ``kvtool.errors``);
# ``kvtool`` itself is its ``__init__`` (the version string).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("kvtool", "kvtool.errors", "kvtool.versions", "kvtool.memory", "kvtool.manifest", "kvtool.quant_ops",
     "kvtool.devices"),
    ("kvtool.runtime",),
    ("kvtool.evals",),
    ("kvtool.export", "kvtool.models"),
    ("kvtool.demo", "kvtool.cli"),
)
FLOOR = {pkg: i for i, floor in enumerate(LAYERS) for pkg in floor}
ORDER = " -> ".join(" / ".join(p.removeprefix("kvtool.") for p in floor) for floor in LAYERS)


def library_sources(root: Path = ROOT) -> dict[str, tuple[str, str]]:
    """``{module name: (path relative to root, source)}`` of every ``.py`` file under ``root/kvtool``."""
    out = {}
    for path in sorted((root / "kvtool").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (str(path.relative_to(root)), path.read_text(encoding="utf-8"))
    return out


def imports_of(name: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import statement in ``source`` (module ``name``), at any depth.
    ``from a import b`` yields ``a.b`` (``b`` may be a submodule; a name defined in ``a`` still lands in ``a``'s
    package); relative imports are resolved against ``name``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def package_of(module: str) -> str | None:
    """``kvtool.X`` for a module of kvtool (``kvtool`` for names defined in kvtool/__init__), None otherwise."""
    parts = module.split(".")
    if parts[0] != "kvtool":
        return None
    if len(parts) == 1 or parts[1].startswith("__"):  # ``from kvtool import __version__``
        return "kvtool"
    return f"kvtool.{parts[1]}"


def check_layers(sources: dict[str, tuple[str, str]], script_modules: frozenset[str] = frozenset()) -> list[str]:
    """Every broken rule of the import graph of ``sources`` (see the module docstring), one message each."""
    problems, edges = [], {}
    for name, (path, source) in sources.items():
        src_pkg = package_of(name)
        if src_pkg not in FLOOR:
            problems.append(f"{path}: package {src_pkg} is on no floor of LAYERS (tests/test_layers.py): add it "
                            "there and to docs/ARCHITECTURE.md")
            continue
        for line, target in imports_of(name, source, path.endswith("__init__.py")):
            if target.split(".")[0] in script_modules:
                problems.append(f"{path}:{line} imports {target}: the library may not import the training scripts "
                                "in scripts/")
            dst_pkg = package_of(target)
            if dst_pkg is None or dst_pkg == src_pkg:
                continue
            if dst_pkg not in FLOOR:
                problems.append(f"{path}:{line} imports {target}: package {dst_pkg} is on no floor of LAYERS")
                continue
            if FLOOR[dst_pkg] > FLOOR[src_pkg]:
                problems.append(f"{path}:{line} imports {target}: {src_pkg} (floor {FLOOR[src_pkg]}) may not import "
                                f"{dst_pkg} (floor {FLOOR[dst_pkg]}); layers, bottom first: {ORDER}")
            edges.setdefault(src_pkg, {}).setdefault(dst_pkg, f"{path}:{line}")
    problems += [f"package cycle {' -> '.join(c)}: " + ", ".join(f"{a} -> {b} at {edges[a][b]}"
                                                               for a, b in zip(c, c[1:], strict=False))
                 for c in _cycles(edges)]
    return problems


def _cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected group of packages that has one (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(_closed_path(v, group, edges))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _closed_path(start: str, group: set[str], edges: dict[str, dict[str, str]]) -> list[str]:
    """A path start -> ... -> start inside ``group`` (breadth-first, so the shortest)."""
    prev, queue = {start: None}, [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(edges.get(v, {})):
            if w == start:
                path = [v]
                while prev[path[-1]] is not None:
                    path.append(prev[path[-1]])
                return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
            if w in group and w not in prev:
                prev[w] = v
                queue.append(w)
    return [start, start]


def _script_modules() -> frozenset[str]:
    return frozenset(p.stem for p in (ROOT / "scripts").glob("*.py"))


def test_kvtool_imports_follow_the_layers():
    sources = library_sources()
    assert len(sources) > 40 and "kvtool.manifest" in sources
    problems = check_layers(sources, _script_modules())
    assert not problems, "\n".join(problems)


# --- the checker itself finds what it is for ----------------------------------------------------------------

def test_checker_names_an_import_that_climbs_even_inside_a_function():
    sources = {"kvtool.runtime.pipeline": ("kvtool/runtime/pipeline.py",
                                           "import numpy\n\ndef f():\n    from kvtool.evals.tasks import TASKS\n"),
               "kvtool.evals.tasks": ("kvtool/evals/tasks.py", "from kvtool.errors import InputError\n")}
    problems = check_layers(sources)
    assert any(p.startswith("kvtool/runtime/pipeline.py:4 imports kvtool.evals.tasks.TASKS: kvtool.runtime "
                            "(floor 1) may not import kvtool.evals (floor 2)") for p in problems), problems


def test_checker_finds_a_cycle_on_one_floor():
    sources = {"kvtool.export.calibration": ("kvtool/export/calibration.py", "import kvtool.models.tiny\n"),
               "kvtool.models.tiny": ("kvtool/models/tiny.py", "x = 1\n\n\ndef g():\n    from kvtool.export import awq\n"),
               "kvtool.cli": ("kvtool/cli.py", "from kvtool.export import export_model\nfrom kvtool import models\n")}
    problems = check_layers(sources)
    assert problems == ["package cycle kvtool.export -> kvtool.models -> kvtool.export: kvtool.export -> "
                        "kvtool.models at kvtool/export/calibration.py:1, kvtool.models -> kvtool.export at "
                        "kvtool/models/tiny.py:5"], problems


def test_checker_resolves_relative_imports_and_forbids_scripts():
    sources = {"kvtool.quant_ops.store": ("kvtool/quant_ops/store.py", "from ..runtime import kv_cache\n"),
               "kvtool.evals.runner": ("kvtool/evals/runner.py", "import train_shapes\n")}
    problems = check_layers(sources, frozenset({"train_shapes"}))
    assert any(p.startswith("kvtool/quant_ops/store.py:1 imports kvtool.runtime.kv_cache: kvtool.quant_ops (floor 0)")
               for p in problems), problems
    assert any(p.startswith("kvtool/evals/runner.py:1 imports train_shapes: the library may not import") for p in problems)


def test_checker_rejects_a_package_on_no_floor():
    problems = check_layers({"kvtool.plugins.x": ("kvtool/plugins/x.py", "")})
    assert problems and "kvtool.plugins is on no floor" in problems[0]
