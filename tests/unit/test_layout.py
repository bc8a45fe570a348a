"""The layout keeps its promises: the pipeline in the folder names, imports pointing down it and
sitting at module top, library errors in library code, small modules."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "mqscale"
SOURCES = sorted(PKG.rglob("*.py"))

# what each part may import from mqscale, in pipeline order: nothing points up the list
MAY_IMPORT = {
    "core": {"core"},
    "data": {"core", "data"},
    "models": {"core", "models"},
    "tokenizer": {"core", "data", "models", "tokenizer"},
    "tokenize": {"core", "data", "models", "tokenizer", "tokenize"},
    "judge": {"core", "data", "models", "judge"},
    "train": {"core", "data", "models", "tokenizer", "judge", "train"},
    "generate": {"core", "data", "models", "tokenizer", "tokenize", "judge", "train", "generate"},
    "evaluate": {"core", "data", "models", "tokenizer", "tokenize", "judge", "train", "generate", "evaluate"},
    "convert": {"core", "models", "tokenizer", "train", "convert"},
}


def part_of(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0] if len(rel) > 1 else "top"


def mqscale_imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mqscale"):
            yield node, node.module
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("mqscale"):
                    yield node, a.name


def test_imports_point_down_the_pipeline():
    wrong = []
    for path in SOURCES:
        part = part_of(path)
        if part == "top" or path.name == "__main__.py":   # entry points sit above every stage
            continue
        for node, mod in mqscale_imports(ast.parse(path.read_text())):
            target = mod.split(".")[1] if mod.count(".") else "top"
            if target not in MAY_IMPORT[part]:
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: {part} imports {mod}")
    assert wrong == []


def test_no_library_module_imports_a_command():
    """Commands import libraries, never one another: nothing imports a stage's ``__main__``
    (the top-level aliases of ``python -m mqscale.<name>`` aside)."""
    wrong = [f"{p.relative_to(ROOT)}: {m}" for p in SOURCES if part_of(p) != "top"
             for _, m in mqscale_imports(ast.parse(p.read_text())) if m.endswith("__main__")]
    assert wrong == []


def test_imports_sit_at_module_top_unless_a_comment_says_why():
    """A local import hides a dependency; the few for optional or heavy packages say which."""
    hidden = []
    for path in SOURCES:
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
                here, above = lines[node.lineno - 1], lines[node.lineno - 2]
                mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if mod.startswith("mqscale") or not ("#" in here or above.strip().startswith(("#", '"""'))):
                    hidden.append(f"{path.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
    assert hidden == []


def test_library_code_raises_library_errors():
    """Only commands (a guarded ``main``) may use the command-line error."""
    offenders = []
    for path in SOURCES:
        text = path.read_text()
        if "UserError" in text and path.name != "cli.py" and "@guarded" not in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_no_module_is_over_500_lines_and_few_sit_loose_at_the_top():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}
    loose = sorted(p.name for p in PKG.glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 8, loose


def _console_scripts() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("[project.scripts]")[1].split("\n[")[0]
    return dict(re.findall(r'^(\S+) = "([^"]+)"', block, flags=re.M))


@pytest.mark.parametrize("name,target", sorted(_console_scripts().items()))
def test_console_scripts_name_a_command(name, target):
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func)), name


@pytest.mark.parametrize("alias,command", [
    ("train_tokenizer", "mqscale.tokenizer.__main__"), ("visualize_masks", "mqscale.tokenizer.visualize"),
    ("sample", "mqscale.generate.sample"), ("export", "mqscale.train.export"), ("plan", "mqscale.train.plan"),
    ("checkpoint", "mqscale.train.verify")])
def test_top_level_aliases_run_the_stage_command(alias, command):
    """``python -m mqscale.<alias>`` keeps working: the alias is the stage's own ``main``."""
    assert importlib.import_module(f"mqscale.{alias}").main is importlib.import_module(command).main


def test_models_and_data_import_no_stage_above_them():
    for path in SOURCES:
        if part_of(path) in ("models", "data"):
            mods = {m for _, m in mqscale_imports(ast.parse(path.read_text()))}
            assert all(m.split(".")[1] in ("core", "models", "data") for m in mods), path


