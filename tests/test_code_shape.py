"""The package's code stays in pieces a newcomer can read: any function on one screen.

Every module under python/src/synthflux holds at most MAX_MODULE_LINES lines, and every
function or method (nested ones too) spans at most MAX_FUNCTION_LINES lines, from `def` to its
last line (decorators not counted). A longer one is split, not exempted.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "src" / "synthflux"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def offenders() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(PACKAGE.parents[2])
        if (n := len(text.splitlines())) > MAX_MODULE_LINES:
            found.append(f"{where}:1: module {path.stem}, {n} lines (max {MAX_MODULE_LINES})")
        functions = (node for node in ast.walk(ast.parse(text, str(path)))
                     if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef))  # fmt: skip
        for node in sorted(functions, key=lambda node: node.lineno):
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                found.append(f"{where}:{node.lineno}: {node.name}(), {n} lines "
                             f"(max {MAX_FUNCTION_LINES})")  # fmt: skip
    return found


def test_modules_and_functions_fit_on_a_screen() -> None:
    assert PACKAGE.is_dir(), PACKAGE
    found = offenders()
    assert not found, f"{len(found)} too long (split them):\n" + "\n".join(found)


def test_data_folders_are_named_only_in_layout() -> None:
    """Every path under the data root comes from synthflux.layout: no other module joins a
    stage's folder to a path (`root / "training"`, "model/weights.npz"). Words such as a
    summary's "predictions" are not paths; a container's own paths start with "/"."""
    from synthflux.layout import DataLayout
    from synthflux.pipeline import STAGES

    layout = DataLayout(Path("/data"))
    folders = {st.folder(layout).name for st in STAGES} | {layout.imported.name, layout.model.name}
    folders -= {st.name for st in STAGES}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "layout.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        joined = {id(side) for node in ast.walk(tree) if isinstance(node, ast.BinOp)
                  and isinstance(node.op, ast.Div) for side in (node.left, node.right)}  # fmt: skip
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
                a_path = id(node) in joined or (
                    "/" in text and not text.startswith("/") and " " not in text
                )
                if a_path and set(text.split("/")) & folders:
                    found.append(f"{path.name}:{node.lineno}: {text!r}")
    assert folders >= {"generated", "preprocessed", "training", "predictions", "evaluation"}
    assert not found, "data paths outside layout.py:\n" + "\n".join(found)
