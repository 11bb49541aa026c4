"""The README's promises name the tests that keep them: every named test exists.

The README cites tests as ``(`tests/x/test_y.py`: `test_a`, `test_b`; `tests/z.py`: ...)``;
each cited test function must be defined in the file cited before it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cited_tests() -> list[tuple[str, str]]:
    text = " ".join(ROOT.joinpath("README.md").read_text().split())
    cited = []
    for match in re.finditer(r"`(tests/[\w/]+\.py)`: ((?:`test_\w+`(?:, | and |,? ?)?)+)", text):
        for name in re.findall(r"`(test_\w+)`", match.group(2)):
            cited.append((match.group(1), name))
    return cited


def test_the_readme_cites_tests():
    assert len(cited_tests()) >= 20


def test_every_cited_test_exists():
    missing = []
    for path, name in cited_tests():
        tree = ast.parse(ROOT.joinpath(path).read_text())
        defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        if name not in defined:
            missing.append(f"{path}::{name}")
    assert not missing, f"the README cites tests that do not exist: {missing}"
