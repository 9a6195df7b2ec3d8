"""The code's shape, as docs/ARCHITECTURE.md describes it: a thin train.py and short functions."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
MAX_TRAIN_PY_LINES = 150


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_function_in_the_package_is_longer_than_80_lines():
    long = [f for path in sorted((ROOT / "crrf_jax").rglob("*.py")) for f in _long_functions(path)]
    assert not long, "functions over 80 lines:\n" + "\n".join(long)


def test_train_py_is_flags_and_main():
    lines = len((ROOT / "train.py").read_text().splitlines())
    assert lines <= MAX_TRAIN_PY_LINES, f"train.py has {lines} lines (at most {MAX_TRAIN_PY_LINES})"
