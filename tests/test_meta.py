"""Checks on the test suite itself: no test passes by asserting nothing.

A test function must check something: an ``assert``, a ``pytest.raises`` / ``pytest.warns``
/ ``pytest.approx`` context, a ``torch.testing.assert_*`` / ``np.testing.assert_*`` call, or
a call of a helper (in the same file or ``tests/``) that itself checks.  A test that only
runs code and ends would pass on any result.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CHECK_CALLS = ("raises", "warns", "assert_close", "assert_allclose", "assert_array_equal", "assert_equal",
               "assert_frame_equal", "fail", "skip")


def _checks_directly(fn: ast.AST) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in CHECK_CALLS or name.startswith("assert_"):
                return True
    return False


def _called_names(fn: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            out.add(node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", ""))
    return out


def functions() -> dict[str, ast.FunctionDef]:
    """Every function defined in tests/ (helpers and tests), by name (a helper's name can
    be shared by files: any definition that checks counts)."""
    found: dict[str, list[ast.FunctionDef]] = {}
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.setdefault(node.name, []).append(node)
    return found


def test_every_test_function_checks_something() -> None:
    defs = functions()
    checking: set[str] = {name for name, fns in defs.items() if any(_checks_directly(f) for f in fns)}
    changed = True
    while changed:  # a helper that calls a checking helper checks too
        changed = False
        for name, fns in defs.items():
            if name not in checking and any(_called_names(f) & checking for f in fns):
                checking.add(name)
                changed = True
    silent = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            targets = node.body if isinstance(node, ast.ClassDef) else [node]
            for fn in targets:
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name.startswith("test_") \
                        and not (_checks_directly(fn) or _called_names(fn) & checking):
                    silent.append(f"{path.name}::{fn.name}")
    assert silent == [], f"tests that assert nothing: {silent}"


def test_the_check_catches_a_test_without_assertions() -> None:
    silent = ast.parse("def test_x():\n    run_something()\n").body[0]
    loud = ast.parse("def test_y():\n    with pytest.raises(ValueError):\n        f()\n").body[0]
    assert not _checks_directly(silent) and _checks_directly(loud)
