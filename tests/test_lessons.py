"""Tests for refnorm/lessons.py and for the lessons themselves.

- The student copy blanks every solution, and a blanked exercise's check cell fails with a
  message naming the exercise.
- Every lesson's checks hold for other seeds: each lesson's code cells run in this process
  (no kernel start), with its ``parameters`` cell replaced by ``SEED = s``; cells tagged
  ``slow`` (training runs whose asserts are documented for seeds 0-7) are skipped, and so the
  cells after them must not need them. About 20 s per seed on 2 cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from refnorm import lessons

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "lessons").glob("*.ipynb"))


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _run(cells: list[dict], *, seed: int | None = None, stop_after=None) -> dict:
    """Execute the code cells in one namespace; return it. ``stop_after(i, cell)`` ends early."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__main__"}
    cwd = Path.cwd()
    os.chdir(ROOT / "lessons")
    try:
        for i, cell in enumerate(cells):
            if cell["cell_type"] != "code":
                continue
            tags = lessons.tags(cell)
            source = "".join(cell["source"])
            if seed is not None and "parameters" in tags:
                source = f"SEED = {seed}"
            if seed is not None and "slow" in tags:
                continue
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(source, f"cell {i}", "exec"), namespace)
            if stop_after is not None and stop_after(i, cell):
                break
    finally:
        os.chdir(cwd)
        import matplotlib.pyplot as plt

        plt.close("all")
    return namespace


# -- blanking -----------------------------------------------------------------------------------

SOLVED = '''# Exercise 9.1: write double
def double(x):
    # BEGIN SOLUTION
    y = 2 * x
    return y
    # END SOLUTION'''


def test_blank_solution_keeps_the_function_and_raises_with_the_task():
    blank = lessons.blank_solution(SOLVED)
    assert "2 * x" not in blank and "BEGIN SOLUTION" not in blank
    namespace: dict = {}
    exec(blank, namespace)
    with pytest.raises(NotImplementedError, match="exercise 9.1: write double"):
        namespace["double"](3)
    with pytest.raises(AssertionError, match="exercise 9.1 is not done yet"):
        lessons.attempt("9.1", namespace["double"], 3)


def test_a_task_wrapped_over_comment_lines_is_one_task():
    wrapped = SOLVED.replace("# Exercise 9.1: write double",
                             "# Exercise 9.1: write double,\n#   the function that doubles x")
    assert lessons.exercise_title(wrapped) == ("9.1", "write double, the function that doubles x")
    namespace: dict = {}
    exec(lessons.blank_solution(wrapped), namespace)
    with pytest.raises(NotImplementedError,
                       match="exercise 9.1: write double, the function that doubles x"):
        namespace["double"](3)
    # a comment that is not indented past its '#' is not part of the task
    assert lessons.exercise_title("# Exercise 9.1: a task\n# a note\n#   more")[1] == "a task"


@pytest.mark.parametrize("bad, message", [
    ("def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION", "must start with"),
    ("# Exercise 9.2: f\ndef f():\n    # BEGIN SOLUTION\n    return 1", "unclosed"),
    ("# Exercise 9.3: f\ndef f():\n    return 1", "found 0 block"),
    ("# Exercise 9.4: f\n# END SOLUTION", "without"),
])
def test_blank_solution_refuses_malformed_cells(bad, message):
    with pytest.raises(lessons.LessonFormatError, match=message):
        lessons.blank_solution(bad)


def test_check_close_passes_and_fails_loudly(capsys):
    lessons.check_close("9.5", "a, b", [1.0, 2.0], [1.0, 2.0], tol=1e-12, reason="equal")
    assert "exercise 9.5 passed" in capsys.readouterr().out
    with pytest.raises(AssertionError, match=r"exercise 9.5 failed: rel_err\(a, b\) = 5.00e-01"):
        lessons.check_close("9.5", "a, b", [1.0, 1.0], [1.0, 2.0], tol=1e-12, reason="equal")
    with pytest.raises(AssertionError, match="shape"):
        lessons.check_close("9.5", "a, b", [1.0], [1.0, 2.0], tol=1e-12, reason="equal")


def test_check_grad_catches_a_wrong_backward():
    def f(x):
        return x ** 2

    lessons.check_grad("9.6", f, lambda dy, x: {"x": 2 * x * dy}, {"x": np.array([1.0, -2.0, 3.0])})
    with pytest.raises(AssertionError, match="exercise 9.6 failed: finite-difference error of dx"):
        lessons.check_grad("9.6", f, lambda dy, x: {"x": x * dy}, {"x": np.array([1.0, -2.0, 3.0])})


# -- the lessons and their student copies --------------------------------------------------------


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_has_graded_exercises_and_a_seed(path):
    cells = _cells(path)
    code = [c for c in cells if c["cell_type"] == "code"]
    assert sum("parameters" in lessons.tags(c) for c in code) == 1, "one SEED cell"
    solutions = [i for i, c in enumerate(code) if "solution" in lessons.tags(c)]
    for i in solutions:  # a check cell follows each solution (other code may come between)
        assert any("check" in lessons.tags(c) for c in code[i + 1:]), f"no check after {i}"


def _ids(path: Path) -> list[str]:
    return [lessons.exercise_title("".join(c["source"]))[0] for c in _cells(path)
            if "solution" in lessons.tags(c)]


@pytest.mark.parametrize("number", sorted({p.stem[:2] for p in LESSONS}))
def test_every_lesson_has_two_exercises_with_unique_ids(number):
    # A lesson may be split over notebooks (05 and 05b): count over its parts.
    parts = [p for p in LESSONS if p.stem[:2] == number]
    ids = [i for p in parts for i in _ids(p)]
    assert len(ids) >= 2, f"lesson {number}: exercises {ids}"
    assert len(set(ids)) == len(ids), f"lesson {number}: repeated exercise ids {ids}"
    for p in parts:  # ids follow the notebook's name: 05b's exercises are 05b.1, 05b.2...
        prefix = p.stem.split("_", 1)[0]
        assert all(i.split(".")[0] == prefix for i in _ids(p)), (p.name, _ids(p))


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_opens_with_goals_assumptions_and_time(path):
    first = "".join(_cells(path)[0]["source"])
    assert first.startswith("# Lesson "), first[:40]
    for word in ("Goals", "Assumes", "Takes", "minutes"):
        assert word in first, f"{path.name}: the opening cell does not say '{word}'"


def test_student_copy_blanks_every_solution(tmp_path):
    assert lessons.main(["--student", str(tmp_path)]) == 0
    for path in LESSONS:
        original, student = _cells(path), _cells(tmp_path / path.name)
        assert len(original) == len(student)
        for a, b in zip(original, student, strict=True):
            if "solution" in lessons.tags(a):
                assert "BEGIN SOLUTION" in "".join(a["source"])
                assert "BEGIN SOLUTION" not in b["source"]
                assert "raise NotImplementedError" in b["source"]
            if b["cell_type"] == "code":
                assert b["outputs"] == []
    assert lessons.main(["--student", str(ROOT / "lessons")]) == 2  # never over the lessons


def test_a_blanked_exercise_fails_its_check_with_its_name(tmp_path):
    lessons.write_student_copies(tmp_path)
    cells = _cells(tmp_path / "02_group_norm.ipynb")
    first_check = next(i for i, c in enumerate(cells) if "check" in lessons.tags(c))
    with pytest.raises(AssertionError, match=r"exercise 02\.1 is not done yet.*Exercise 02\.1"):
        _run(cells[: first_check + 1])


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_checks_hold_for_other_seeds(path, seed):
    _run(_cells(path), seed=seed)
