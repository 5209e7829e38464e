"""The import structure: arrows between modules run one way, down the layers (docs/design.md §10).

Imports are read from the source with ``ast`` (every import statement, the ones inside
functions included: a function-level import hides a circle, it does not remove it).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "mtrec_dist"


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_names(path: Path, root: Path) -> list[tuple[str, str, int, bool]]:
    """``(name, its module, line, at top level)`` of each imported name in ``path``: for
    ``from m import x`` the name is ``m.x`` (a submodule, or else an attribute of ``m``);
    relative imports are resolved against the module's package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(n) for n in tree.body}
    pkg = module_name(path, root).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, a.name, node.lineno, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            out += [(f"{base}.{a.name}", base, node.lineno, id(node) in top) for a in node.names]
    return out


def import_graph(folder: Path, root: Path) -> dict[str, set[str]]:
    """Module -> the modules of ``folder`` it imports (``from pkg import mod`` included)."""
    mods = {module_name(p, root): p for p in sorted(folder.glob("*.py"))}
    graph: dict[str, set[str]] = {}
    for m, p in mods.items():
        targets = (n if n in mods else base for n, base, _, _ in imported_names(p, root))
        graph[m] = {t for t in targets if t in mods and t != m}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or [] when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (c := visit(n)):
                return c
        state[m] = 2
        path.pop()
        return []

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return []


def test_find_cycle_sees_a_function_level_circle(tmp_path):
    """The checker itself: a circle closed by an import inside a function (as predict →
    ensemble → predict was) is found; the same modules without it are acyclic."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("from . import c\n\ndef f():\n    return c\n")
    (pkg / "c.py").write_text("def g():\n    from pkg import a\n    return a\n")
    graph = import_graph(pkg, tmp_path)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("def g():\n    return 1\n")
    assert find_cycle(import_graph(pkg, tmp_path)) == []


def test_eval_imports_have_no_cycle():
    """Inside ``mtrec_dist/eval`` the arrows run one way: predict/evaluate → driver → pool,
    ensemble → engine (no predict → ensemble → driver → predict circle)."""
    graph = import_graph(ROOT / PACKAGE / "eval", ROOT)
    assert find_cycle(graph) == []
    ev = f"{PACKAGE}.eval"
    assert f"{ev}.driver" in graph[f"{ev}.predict"] and f"{ev}.driver" in graph[f"{ev}.evaluate"]
    assert {f"{ev}.pool", f"{ev}.ensemble"} <= graph[f"{ev}.driver"]
    for low in ("pool", "ensemble", "engine"):
        assert not {f"{ev}.driver", f"{ev}.predict", f"{ev}.evaluate"} & graph[f"{ev}.{low}"]


def test_eval_driver_path_imports_the_package_at_the_top():
    """The evaluator's path states its dependencies in its first lines: no import of a
    ``mtrec_dist`` module inside a function (Ray, a heavy optional dependency, may be lazy)."""
    late = []
    for name in ("driver", "pool", "predict", "evaluate", "ensemble"):
        path = ROOT / PACKAGE / "eval" / f"{name}.py"
        late += [
            f"{path.relative_to(ROOT)}:{line} {mod}"
            for _, mod, line, top in imported_names(path, ROOT)
            if not top and (mod == PACKAGE or mod.startswith(PACKAGE + "."))
        ]
    assert late == []


# The package's layers, top to bottom (docs/design.md §10): a module imports only from its own
# layer or the layers below it. ``launch/`` sits above ``cli``; ``__init__`` imports nothing.
LAYERS = (
    ("cli",),
    ("demo", "quality"),
    ("train",),
    ("eval",),
    ("models",),
    ("data",),
    ("config", "hub"),
    ("metrics", "tasks", "utils"),
)
RANK = {room: len(LAYERS) - i for i, rooms in enumerate(LAYERS) for room in rooms}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == PACKAGE and len(parts) > 1 else None


def _runtime_imports(path: Path) -> list[tuple[str, str, int]]:
    """``imported_names`` minus those under ``if TYPE_CHECKING:`` (annotations only: no arrow
    at run time; models/base.py names NewsEncoder that way)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        n.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for stmt in node.body
        for n in ast.walk(stmt)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    return [(n, b, line) for n, b, line, _ in imported_names(path, ROOT) if line not in typing_only]


def package_graph() -> dict[str, set[str]]:
    mods = {module_name(p, ROOT): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for m, p in mods.items():
        targets = (n if n in mods else base for n, base, _ in _runtime_imports(p))
        graph[m] = {t for t in targets if t in mods and t != m}
    return graph


def test_every_module_has_a_layer():
    rooms = {_room(m) for m in package_graph()} - {None}
    assert rooms == set(RANK), rooms ^ set(RANK)


def test_imports_point_down_the_layers():
    """No upward arrow anywhere in the package (function-level imports included): e.g. the
    metrics sit below data (the synthetic ceiling) and eval, the quality harness above train."""
    up = [
        f"{m} -> {t}"
        for m, targets in package_graph().items()
        for t in sorted(targets)
        if _room(m) and _room(t) and RANK[_room(t)] > RANK[_room(m)]
    ]
    assert up == []


def test_the_package_has_no_import_cycle():
    assert find_cycle(package_graph()) == []


def test_the_layer_check_sees_an_upward_arrow(tmp_path, monkeypatch):
    """The checker itself: data importing eval is reported; under TYPE_CHECKING it is not."""
    pkg = tmp_path / PACKAGE
    (pkg / "data").mkdir(parents=True)
    (pkg / "eval").mkdir()
    for f in ("__init__.py", "data/__init__.py", "eval/__init__.py", "eval/metrics2.py"):
        (pkg / f).write_text("")
    (pkg / "data/syn.py").write_text(f"def f():\n    from {PACKAGE}.eval import metrics2\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert package_graph()[f"{PACKAGE}.data.syn"] == {f"{PACKAGE}.eval.metrics2"}
    (pkg / "data/syn.py").write_text(
        f"from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from {PACKAGE}.eval import metrics2\n"
    )
    assert package_graph()[f"{PACKAGE}.data.syn"] == set()
