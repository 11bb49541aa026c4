"""Tests for refnorm/lessons/ and for the lessons themselves.

- The graders: a pass prints the measured error, a failure names the known mistake it equals
  or gives the next of the exercise's hints; integers are compared as integers; a blank says
  the exercise is not done yet.
- The student copy: every solution blanked; ``refnorm lessons --student`` keeps a student's
  edited notebook unless ``--force``, and says so when DIR is a file.
- The lessons: every notebook has two graded exercises or more, each in the catalogue with
  its hints and known mistakes; its opening cell states its time, which its length meets.
- Every lesson's checks hold for other seeds, and every known mistake of every exercise is
  named by its check: the code cells run in this process (no kernel start), with the
  ``parameters`` cell replaced by ``SEED = s``. Check cells run in a copy of the namespace,
  so no later cell can need what a check cell defines. Cells tagged ``slow`` (training runs
  whose asserts are documented for several seeds) are skipped, and so the cells after them
  must not need them.
- Every lesson's student copy runs top to bottom and fails exactly at its check cells, each
  with "not done yet" (slow check cells included: a blank fails them at once).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest

from refnorm import lessons
from refnorm.lessons import grading
from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward
from refnorm.weights import weight_norm_backward, weight_norm_forward

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "lessons").glob("*.ipynb"))
_CHECKED = re.compile(  # the exercise ids a check cell grades
    r"""(?:check_outputs|check_gradients|check_integers|attempt)\(\s*["'](\S+?)["']""")


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


@contextlib.contextmanager
def _in_lessons():
    os.environ.setdefault("MPLBACKEND", "Agg")
    cwd = Path.cwd()
    os.chdir(ROOT / "lessons")
    try:
        yield
    finally:
        os.chdir(cwd)
        import matplotlib.pyplot as plt

        plt.close("all")


def _exec(source: str, namespace: dict, name: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(source, name, "exec"), namespace)


def _ids(path: Path) -> list[str]:
    return [lessons.exercise_title(_source(c))[0] for c in _cells(path)
            if "solution" in lessons.tags(c)]


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


# -- the graders --------------------------------------------------------------------------------


def _mean(x, *, mistake=None):
    if mistake == "sum":
        return x.sum(axis=0)
    if mistake == "first":
        return x[0]
    return x.mean(axis=0)


@pytest.fixture
def toy():
    """Exercise 9.9: the mean over axis 0, with two known mistakes."""
    spec = lessons.register(lessons.Exercise(
        id="9.9", function="mean0",
        nudges=("look at the axis", "mean = sum / n"),
        mistakes=(lessons.Mistake("a sum where the mean belongs", "divide by n",
                                  partial(_mean, mistake="sum")),
                  lessons.Mistake("the first row only", "use every row",
                                  partial(_mean, mistake="first")))))
    grading._FAILURES.pop("9.9", None)
    yield spec
    grading._REGISTRY.pop("9.9")


X_TOY = np.arange(12.0).reshape(4, 3) ** 1.5


def _grade_toy(candidate):
    return lessons.check_outputs("9.9", lambda fn: {"mean": fn(X_TOY)}, candidate,
                                 {"mean": X_TOY.mean(axis=0)}, tol=1e-12, reason="rounding")


def test_a_right_answer_passes_with_its_measured_error(toy, capsys):
    _grade_toy(lambda x: x.sum(axis=0) / x.shape[0])
    out = capsys.readouterr().out
    assert out.startswith("exercise 9.9 passed: rel_err(mean) = ") and "(rounding)" in out


@pytest.mark.parametrize("mistake", ["sum", "first"])
def test_a_known_mistake_is_named(toy, mistake):
    wrong = next(m for m in toy.mistakes if m.variant.keywords["mistake"] == mistake)
    # the student's own code for the same mistake, not the catalogue's function
    student = {"sum": lambda x: np.add.reduce(x, axis=0), "first": lambda x: x[0].copy()}
    with pytest.raises(AssertionError, match=f"a known mistake gives: {wrong.name}"):
        _grade_toy(student[mistake])


def test_an_unknown_mistake_gets_graded_hints_never_the_mistakes(toy):
    wrong = lambda x: x.max(axis=0)  # noqa: E731
    with pytest.raises(AssertionError, match=r"Hint 1 of 2 \(fail again.*: look at the axis"):
        _grade_toy(wrong)
    with pytest.raises(AssertionError, match=r"Hint 2 of 2: mean = sum / n"):
        _grade_toy(wrong)
    with pytest.raises(AssertionError, match=r"Hint 2 of 2: mean = sum / n"):
        _grade_toy(wrong)


def test_a_wrong_shape_fails_and_a_blank_is_not_done(toy):
    with pytest.raises(AssertionError, match=r"mean has shape \(1, 3\), expected \(3,\)"):
        _grade_toy(lambda x: x.mean(axis=0, keepdims=True))

    def blank(x):
        raise NotImplementedError("exercise 9.9: the mean")

    with pytest.raises(AssertionError, match="exercise 9.9 is not done yet"):
        _grade_toy(blank)


def test_each_check_of_an_exercise_graded_in_parts_says_which(toy, capsys):
    """An exercise graded by two checks must not read as passed after the first one."""
    right = lambda x: x.sum(axis=0) / x.shape[0]  # noqa: E731
    lessons.check_outputs("9.9", lambda fn: {"mean": fn(X_TOY)}, right,
                          {"mean": X_TOY.mean(axis=0)}, tol=1e-12, reason="rounding",
                          part="1 of 2")
    assert capsys.readouterr().out.startswith("exercise 9.9 (check 1 of 2) passed: ")
    with pytest.raises(AssertionError, match=r"^exercise 9\.9 \(check 2 of 2\) failed: "
                                             r"count = 2, expected 3"):
        lessons.check_integers("9.9", lambda fn: {"count": fn(np.ones((3, 2))).size}, right,
                               {"count": 3}, reason="exact", part="2 of 2")
    with pytest.raises(AssertionError, match=r"^exercise 9\.9 \(check 2 of 2\) failed: "
                                             r"the check could not use"):
        cell = _check_cell("def run(fn):\n    return {'mean': fn(X)[0]}\n")  # None[0]
        cell["X"] = X_TOY
        lessons.check_outputs("9.9", cell["run"], lambda x: None,
                              {"mean": X_TOY.mean(axis=0)}, tol=1e-12, reason="rounding",
                              part="2 of 2")
    lessons.check_gradients("9.9", lambda x: 2.0 * x, lambda b, dy, x: {"x": b(dy)},
                            lambda dy: 2.0 * dy, {"x": X_TOY}, part="2 of 2")
    assert capsys.readouterr().out.startswith("exercise 9.9 (check 2 of 2) passed: dx differs")


def test_every_exercise_graded_by_several_checks_numbers_them():
    """In the lessons, the checks of an exercise graded in parts pass ``part="k of n"``, in
    order, so that no check but the last prints a bare "passed"."""
    call = re.compile(r"""(check_outputs|check_gradients|check_integers)\(\s*["'](\S+?)["']""")
    several = 0
    for path in LESSONS:
        for cell in _cells(path):
            source = _source(cell)
            calls = list(call.finditer(source))
            ids = [m.group(2) for m in calls]
            for exercise_id in set(ids):
                mine = [m for m in calls if m.group(2) == exercise_id]
                if len(mine) < 2:
                    continue
                several += 1
                for k, m in enumerate(mine, start=1):
                    end = mine[k].start() if k < len(mine) else len(source)
                    assert f'part="{k} of {len(mine)}"' in source[m.start():end], (
                        f"{path.name}: check {k} of exercise {exercise_id}")
    assert several >= 6  # 03.1, 04.1, 04.2, 05.1, 06.1, 07.2


def test_integer_answers_are_compared_as_integers(toy, capsys):
    def run(fn):
        return {"count": fn(np.ones((3, 2))).size, "sizes": [2, 3]}

    lessons.check_integers("9.9", run, lambda x: x[0], {"count": 2, "sizes": (2, 3)},
                           reason="exact")
    assert "count = 2, sizes = [2, 3] (exact)" in capsys.readouterr().out
    with pytest.raises(AssertionError, match=r"count = 3, expected 2"):
        lessons.check_integers("9.9", run, lambda x: x[:, 0], {"count": 2, "sizes": (2, 3)},
                               reason="exact")
    with pytest.raises(AssertionError, match="must be an integer"):
        lessons.check_integers("9.9", lambda fn: {"count": 2.5}, None, {"count": 2},
                               reason="exact")
    lessons.check_integers("9.9", lambda fn: {"moved": 12.0}, None, {"moved": 14},
                           reason="a budget", at_most=True)
    assert "moved = 12 <= 14 (a budget)" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="moved = 15, allowed at most 14"):
        lessons.check_integers("9.9", lambda fn: {"moved": 15}, None, {"moved": 14},
                               reason="a budget", at_most=True)


def test_a_right_gradient_reports_its_measured_difference_not_zero(toy, capsys):
    def f(x):
        return x**2

    def vjp(backward, dy, x):
        return {"x": backward(dy, x)}

    measured = lessons.check_gradients("9.9", f, vjp, lambda dy, x: 2 * x * dy,
                                       {"x": np.array([1.0, -2.0, 3.0])})
    assert 0 < measured["x"] < 1e-8  # central differences are never exact
    assert "dx differs from central differences by" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="dx differs from central differences"):
        lessons.check_gradients("9.9", f, vjp, lambda dy, x: x * dy,
                                {"x": np.array([1.0, -2.0, 3.0])})


def test_the_graders_hold_their_stated_tolerances(toy):
    """An answer off by 100 times a grader's tolerance fails (a tolerance loosened 1000-fold
    went unnoticed: the catalogued mistakes are off by 1e-2 or more)."""
    want = np.linspace(1.0, 2.0, 7)
    lessons.check_outputs("9.9", lambda fn: fn(), lambda: want * (1 + 1e-9), want, tol=1e-8,
                          reason="rounding")
    with pytest.raises(AssertionError, match="allowed <= 1e-08"):
        lessons.check_outputs("9.9", lambda fn: fn(), lambda: want * (1 + 1e-6), want,
                              tol=1e-8, reason="rounding")

    def vjp(backward, dy, x):
        return {"x": backward(dy, x)}

    x = {"x": np.array([1.0, -2.0, 3.0])}
    lessons.check_gradients("9.9", lambda x: x**2, vjp, lambda dy, x: 2 * x * dy, x, tol=1e-6)
    with pytest.raises(AssertionError, match="dx differs from central differences"):
        lessons.check_gradients("9.9", lambda x: x**2, vjp,
                                lambda dy, x: 2 * x * dy * (1 + 1e-4), x, tol=1e-6)


def _check_cell(source: str) -> dict:
    """Functions of a check cell, compiled as a cell of its own (as a notebook runs them)."""
    namespace: dict = {"np": np}
    exec(compile(source, "check cell", "exec"), namespace)
    return namespace


def test_a_return_the_check_cannot_use_is_a_sentence_not_a_traceback(toy):
    """None, or a tuple of another length, where the check unpacks two values: the grader
    says the check could not use the return; an error in the student's own code stays
    theirs, with its traceback (their line)."""
    cell = _check_cell("def run(fn):\n    mean, first = fn(X)\n    return {'mean': mean}\n")

    def grade(candidate):
        return lessons.check_outputs("9.9", cell["run"], candidate,
                                     {"mean": X_TOY.mean(axis=0)}, tol=1e-12,
                                     reason="rounding")

    cell["X"] = X_TOY
    grade(lambda x: (x.mean(axis=0), x[0]))
    for returned in (None, (1, 2, 3)):
        with pytest.raises(AssertionError, match=r"exercise 9\.9 failed: the check could not "
                                                 r"use what your function returned \("):
            grade(lambda x, r=returned: r)

    def own_error(x):
        return x.mean(axis=0) + "a"  # the student's own line fails

    with pytest.raises(TypeError):
        grade(own_error)


def test_gradients_may_come_as_lists_and_none_is_named(toy):
    """A right gradient returned as a list passes (it was read through DLPack and crashed);
    a gradient left None is named."""
    def vjp(backward, dy, x):
        return {"x": backward(dy, x)}

    x = {"x": np.array([1.0, -2.0, 3.0])}
    lessons.check_gradients("9.9", lambda x: x**2, vjp, lambda dy, x: list(2 * x * dy), x)
    with pytest.raises(AssertionError, match=r"could not use what your function returned "
                                             r"\(TypeError: dx is None\)"):
        lessons.check_gradients("9.9", lambda x: x**2, vjp, lambda dy, x: None, x)


def test_an_integer_may_come_as_a_0_d_array(toy, capsys):
    lessons.check_integers("9.9", lambda fn: {"n": fn()}, lambda: np.asarray(np.int64(32)),
                           {"n": 32}, reason="exact")
    assert "n = 32 (exact)" in capsys.readouterr().out


def test_a_passed_check_shows_nothing_more_in_a_notebook(toy):
    """A check cell ends with the check's call: its result (the answer's arrays) was shown
    under the verdict, up to 800 lines in lesson 06b. It displays nothing, and stays a dict."""
    formatters = pytest.importorskip("IPython.core.formatters")
    result = _grade_toy(lambda x: x.sum(axis=0) / x.shape[0])
    assert isinstance(result, dict) and set(result) == {"mean"}
    assert formatters.DisplayFormatter().format(result) == ({}, {})


def test_expect_prints_integers_as_integers(capsys):
    lessons.expect("all-reduces", 2, 2, 2, "one per step")
    assert re.search(r"all-reduces\s+=\s+2   expected in \[2, 2\]", capsys.readouterr().out)
    with pytest.raises(AssertionError, match=r"all-reduces = 3 is outside \[2, 2\]"):
        lessons.expect("all-reduces", 3, 2, 2, "one per step")
    with pytest.raises(AssertionError):
        lessons.expect("a NaN", float("nan"), 0, 1, "never inside")


def test_expect_prints_a_flag_as_true_or_false(capsys):
    lessons.expect("converged", True, True, True, "a flag")
    assert re.search(r"converged\s+=\s+True   expected in \[True, True\]",
                     capsys.readouterr().out)


def test_expect_shows_a_range_and_a_failure_with_the_digits_that_tell_them_apart(capsys):
    """Bounds of 1 -+ 1e-4 printed at 2 digits read [1, 1], and a value of 1.0002 failed as
    "= 1.000e+00 is outside [1, 1]"; [0, 1 + 1e-8] hid why 1 + 2e-8 fails."""
    lessons.expect("std ratio", 1.00002, 1 - 1e-4, 1 + 1e-4, "unit variance")
    assert "expected in [0.9999, 1.0001]" in capsys.readouterr().out
    with pytest.raises(AssertionError, match=r"^std ratio = 1\.0002 is outside "
                                             r"\[0\.9999, 1\.0001\] \(unit variance\)$"):
        lessons.expect("std ratio", 1.0002, 1 - 1e-4, 1 + 1e-4, "unit variance")
    with pytest.raises(AssertionError, match=r"^norm = 1\.00000002 is outside "
                                             r"\[0, 1\.00000001\] "):
        lessons.expect("norm", 1 + 2e-8, 0, 1 + 1e-8, "at most 1")
    lessons.expect("error", 1.02e-6, 0, 1e-5, "small")  # 2 digits where they suffice
    assert "expected in [0, 1e-05]" in capsys.readouterr().out


# -- the student copy ---------------------------------------------------------------------------


def test_student_copy_blanks_every_solution(tmp_path):
    assert lessons.main(["--student", str(tmp_path)]) == 0
    for path in LESSONS:
        original, student = _cells(path), _cells(tmp_path / path.name)
        assert len(original) == len(student)
        for a, b in zip(original, student, strict=True):
            if "solution" in lessons.tags(a):
                assert "BEGIN SOLUTION" in _source(a)
                assert "BEGIN SOLUTION" not in b["source"]
                assert "raise NotImplementedError" in b["source"]
            if b["cell_type"] == "code":
                assert b["outputs"] == []
    assert lessons.main(["--student", str(ROOT / "lessons")]) == 2  # never over the lessons


def test_student_copy_keeps_edited_notebooks_unless_forced(tmp_path, capsys):
    assert lessons.main(["--student", str(tmp_path)]) == 0
    assert lessons.main(["--student", str(tmp_path)]) == 0  # unchanged blanks: rewritten
    edited = tmp_path / "02_group_norm.ipynb"
    work = edited.read_text(encoding="utf-8").replace("raise NotImplementedError", "pass  #", 1)
    edited.write_text(work, encoding="utf-8")
    before = {p.name: p.read_text(encoding="utf-8") for p in tmp_path.glob("*.ipynb")}
    capsys.readouterr()
    assert lessons.main(["--student", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"refnorm lessons: error: {edited} differs from the blank student copy "
                   "(your work?): it is kept; pass --force to overwrite it")
    assert {p.name: p.read_text(encoding="utf-8") for p in tmp_path.glob("*.ipynb")} == before
    assert lessons.main(["--student", str(tmp_path), "--force"]) == 0
    assert edited.read_text(encoding="utf-8") != work


def test_a_notebook_that_is_not_utf8_in_dir_is_kept_and_named(tmp_path, capsys):
    """A file in DIR that is not even UTF-8 (saved in another encoding) differs from its
    blank: refused with its name, as any edited notebook, not with a codec error."""
    other = tmp_path / "01_batch_norm.ipynb"
    other.write_bytes(b"\xff\xfe{}")
    assert lessons.main(["--student", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"refnorm lessons: error: {other} differs from the blank student copy (your work?): "
        "it is kept; pass --force to overwrite it")
    assert other.read_bytes() == b"\xff\xfe{}"
    assert lessons.main(["--student", str(tmp_path), "--force"]) == 0
    assert json.loads(other.read_text(encoding="utf-8"))["cells"]


def test_student_copy_into_a_file_says_it_is_a_file(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    assert lessons.main(["--student", str(a_file)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"refnorm lessons: error: {a_file} is a file; --student needs a folder to write the "
        "copies into")
    assert lessons.main(["--student", str(a_file / "below")]) == 2
    assert a_file.read_text() == "not a folder"


def test_a_folder_name_with_a_line_break_is_one_line(tmp_path, capsys):
    a_file = tmp_path / "two\nlines"
    a_file.write_text("not a folder")
    assert lessons.main(["--student", str(a_file)]) == 2
    assert capsys.readouterr().err == (f"refnorm lessons: error: {tmp_path}/two lines is a file; "
                                       "--student needs a folder to write the copies into\n")


def test_lessons_as_a_program_of_its_own_reports_usage_errors_in_one_line(capsys):
    """python -m refnorm.lessons speaks as refnorm lessons: one line, exit 2."""
    with pytest.raises(SystemExit) as exc:
        lessons.main([])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("refnorm lessons: error: the following arguments are "
                                       "required: --student (see refnorm lessons --help)\n")


@pytest.mark.parametrize(("text", "problem"), [
    ('{"cells": 5}', "expected a JSON object whose 'cells' is a list of objects; got 'cells' "
                     "of type int"),
    ("[]", "expected a JSON object whose 'cells' is a list of objects; got a JSON list"),
    ("{}", "expected a JSON object whose 'cells' is a list of objects; got an object without "
           "'cells'"),
    ('{"cells": [3]}', "expected a JSON object whose 'cells' is a list of objects; got a cell "
                       "that is not an object"),
    ("{bad", "it is not JSON (Expecting property name enclosed in double quotes"),
    ('{"cells": [{"cell_type": "code", "metadata": 5}]}',
     "a cell does not have nbformat 4's fields (AttributeError: "),
])
def test_a_source_that_is_not_a_notebook_is_named(text, problem, tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    (source / "x.ipynb").write_text(text, encoding="utf-8")
    assert lessons.main(["--student", str(tmp_path / "d"), "--source", str(source)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"refnorm lessons: error: {source / 'x.ipynb'} is not a notebook: "
                          f"{problem}"), err
    assert err.count("\n") == 1 and not (tmp_path / "d").exists()


def test_a_malformed_solution_cell_names_its_file(tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    cell = {"cell_type": "code", "metadata": {"tags": ["solution"]}, "source": "x = 1\n"}
    (source / "x.ipynb").write_text(json.dumps({"cells": [cell]}), encoding="utf-8")
    assert lessons.main(["--student", str(tmp_path / "d"), "--source", str(source)]) == 2
    assert capsys.readouterr().err.startswith(
        f"refnorm lessons: error: {source / 'x.ipynb'}: a solution cell must start with")


def test_an_empty_student_folder_is_refused(tmp_path, monkeypatch, capsys):
    from refnorm.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["lessons", "--student", ""])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("refnorm lessons: error: argument --student: expected a "
                                       "folder path; got an empty string (see refnorm lessons "
                                       "--help)\n")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        main(["lessons", "--student", " "])
    assert "expected a folder path; got ' ' (see" in capsys.readouterr().err  # not "empty"


def test_a_failed_write_leaves_no_truncated_notebook(tmp_path, monkeypatch, capsys):
    # A full disk fails the write: the notebook is written to a temporary file and renamed
    # into place, so nothing half-written is left for a rerun to take for the student's work.
    from refnorm.lessons import student

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(student.os, "replace", full_disk)
    assert lessons.main(["--student", str(tmp_path)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# -- the lessons' shape -------------------------------------------------------------------------


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_has_graded_exercises_and_a_seed(path):
    cells = _cells(path)
    code = [c for c in cells if c["cell_type"] == "code"]
    assert sum("parameters" in lessons.tags(c) for c in code) == 1, "one SEED cell"
    ids = _ids(path)
    assert len(ids) >= 2, f"{path.name}: exercises {ids}"
    assert len(set(ids)) == len(ids), f"{path.name}: repeated exercise ids {ids}"
    prefix = path.stem.split("_", 1)[0]  # 05b's exercises are 05b.1, 05b.2...
    assert all(i.split(".")[0] == prefix for i in ids), (path.name, ids)
    for i, cell in enumerate(code):  # the first check after a solution grades it
        if "solution" in lessons.tags(cell):
            ex = lessons.exercise_title(_source(cell))[0]
            check = next(c for c in code[i + 1:] if "check" in lessons.tags(c))
            assert ex in _CHECKED.findall(_source(check)), f"{ex}: its check is not next"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_every_exercise_is_catalogued_with_hints_and_known_mistakes(path):
    for cell in _cells(path):
        if "solution" not in lessons.tags(cell):
            continue
        source = _source(cell)
        spec = lessons.exercise(lessons.exercise_title(source)[0])
        assert re.search(rf"^def {spec.function}\(", source, re.M), (spec.id, spec.function)
        assert len(spec.nudges) >= 2, f"{spec.id}: where to look, then the equation"
        assert len(spec.mistakes) >= 2, f"{spec.id}: {len(spec.mistakes)} known mistakes"
        assert len({m.name for m in spec.mistakes}) == len(spec.mistakes)


def test_the_catalogue_holds_only_the_lessons_exercises():
    from refnorm.lessons import exercises  # noqa: F401

    in_lessons = {i for p in LESSONS for i in _ids(p)}
    assert set(grading._REGISTRY) - {"9.9"} == in_lessons


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_opens_with_goals_assumptions_and_time(path):
    first = _source(_cells(path)[0])
    assert first.startswith("# Lesson "), first[:40]
    for word in ("Goals", "Assumes", "Takes", "minutes"):
        assert word in first, f"{path.name}: the opening cell does not say '{word}'"


# Reading pace, measured on the lessons as first written (their stated times were met by it):
# 150 words of prose a minute, 30 lines of code a minute, 8 minutes an exercise. Folded
# solution discussions and answers (<details>) are read after the work and are not counted,
# nor is an optional appendix at the end (from a "## Appendix" heading on), which the
# opening cell must then announce.
WORDS_PER_MINUTE, LINES_PER_MINUTE, MINUTES_PER_EXERCISE = 150, 30, 8


def reading_minutes(path: Path) -> float:
    words = lines = exercises = 0
    for cell in _cells(path):
        source = _source(cell)
        if cell["cell_type"] == "markdown" and source.startswith("## Appendix"):
            assert "appendix" in _source(_cells(path)[0]), f"{path.name}: say so up front"
            break
        if cell["cell_type"] == "markdown":
            words += len(re.sub(r"<details>.*?</details>", "", source, flags=re.S).split())
        elif "solution" in lessons.tags(cell):
            exercises += 1
        else:
            lines += sum(1 for line in source.splitlines() if line.strip())
    return (words / WORDS_PER_MINUTE + lines / LINES_PER_MINUTE
            + exercises * MINUTES_PER_EXERCISE)


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_meets_the_time_it_states(path):
    stated = re.search(r"(?i)\*\*Takes\.?\*\*\.?\s+about\s+(\d+)\s+minutes",
                       _source(_cells(path)[0]))
    assert stated, f"{path.name}: the opening cell says '**Takes** about N minutes'"
    minutes = int(stated.group(1))
    assert 0.6 * minutes <= reading_minutes(path) <= 1.1 * minutes, (
        f"{path.name}: states {minutes} minutes; its length reads in "
        f"{reading_minutes(path):.0f}")


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_speaks_of_the_subject_not_of_how_it_was_made(path):
    text = "\n".join(_source(c) for c in _cells(path)).lower()
    for word in ("extraction", "extracted", "seed text", "seeds/", "2-core", "build machine"):
        assert word not in text, f"{path.name} mentions '{word}'"


# -- running the lessons ------------------------------------------------------------------------


def _checked_exercises(source: str) -> list[str]:
    return list(dict.fromkeys(_CHECKED.findall(source)))


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_checks_hold_and_name_every_known_mistake(path, seed):
    namespace: dict = {"__name__": "__main__"}
    named = 0
    with _in_lessons():
        for i, cell in enumerate(_cells(path)):
            tags = lessons.tags(cell)
            if cell["cell_type"] != "code" or "slow" in tags:
                continue
            source = f"SEED = {seed}" if "parameters" in tags else _source(cell)
            if "check" not in tags:
                _exec(source, namespace, f"cell {i}")
                continue
            for ex in _checked_exercises(source):
                spec = lessons.exercise(ex)
                for mistake in spec.mistakes:
                    trial = dict(namespace)
                    trial[spec.function] = mistake.variant
                    with pytest.raises(AssertionError) as failed:
                        _exec(source, trial, f"cell {i}, {ex} with '{mistake.name}'")
                    assert f"a known mistake gives: {mistake.name}." in str(failed.value), (
                        ex, mistake.name, str(failed.value))
                    named += 1
            _exec(source, dict(namespace), f"cell {i}")  # the solution passes
    assert named >= 2 * len(_ids(path)), f"{path.name}: {named} mistakes named"


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_student_copy_fails_exactly_at_its_checks(path):
    student, blanked = lessons.student_notebook(json.loads(path.read_text(encoding="utf-8")))
    assert blanked == _ids(path)
    namespace: dict = {"__name__": "__main__"}
    failed = []
    with _in_lessons():
        for i, cell in enumerate(student["cells"]):
            tags = lessons.tags(cell)
            if cell["cell_type"] != "code" or ("slow" in tags and "check" not in tags):
                continue
            run_in = dict(namespace) if "check" in tags else namespace
            try:
                _exec(_source(cell), run_in, f"cell {i}")
            except AssertionError as exc:
                assert "check" in tags, f"cell {i} is no check but failed: {exc}"
                assert "is not done yet" in str(exc), f"cell {i}: {exc}"
                failed.append(i)
                continue
            assert "check" not in tags, f"check cell {i} passed in the student copy"
    checks = [i for i, c in enumerate(student["cells"]) if "check" in lessons.tags(c)]
    assert failed == checks


def test_student_copies_get_the_permissions_a_plain_write_gives(tmp_path):
    """Written through a temporary file (mkstemp's are 0600), they are made as open() would."""
    import os

    from refnorm.lessons.student import write_student_copies

    umask = os.umask(0o022)
    try:
        write_student_copies(tmp_path / "copies")
    finally:
        os.umask(umask)
    modes = {p.stat().st_mode & 0o777 for p in (tmp_path / "copies").glob("*.ipynb")}
    assert modes == {0o644}


def test_student_copy_of_an_executed_lesson_has_no_execution_counts(tmp_path):
    from refnorm import lessons

    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": [
        {"cell_type": "code", "execution_count": 3, "metadata": {"tags": ["solution"]},
         "outputs": [{"output_type": "stream", "name": "stdout", "text": "1\n"}],
         "source": "# Exercise 9.1: add\ndef f():\n    # BEGIN SOLUTION\n    return 1\n"
                   "    # END SOLUTION\n"},
        {"cell_type": "code", "execution_count": 4, "metadata": {}, "outputs": [],
         "source": "f()"}]}
    (src / "09_x.ipynb").write_text(json.dumps(nb), encoding="utf-8")
    lessons.write_student_copies(dest, src)
    cells = json.loads((dest / "09_x.ipynb").read_text(encoding="utf-8"))["cells"]
    assert [c["execution_count"] for c in cells] == [None, None]
    assert [c["outputs"] for c in cells] == [[], []]


def test_the_catalogued_mistakes_compute_what_they_name():
    """A mistake is named when a student's answer equals it: one computed otherwise than its
    name says (the larger shards last, eps / s^3) would never meet the student who made it."""
    from refnorm.lessons.exercises import _equivalent_eps, _shard_sizes

    assert _shard_sizes(22, 8, mistake="larger_first") == [3, 3, 3, 3, 3, 3, 2, 2]
    assert _shard_sizes(22, 8, mistake="larger_last") == [2, 2, 3, 3, 3, 3, 3, 3]
    assert _shard_sizes(5, 4, mistake="ceil_then_rest") == [2, 2, 2, -1]
    assert _shard_sizes(22, 8, mistake="remainder_last") == [2] * 7 + [8]
    eps, s = 1e-3, 4.0
    assert _equivalent_eps(eps, s, mistake="over_s") == pytest.approx(eps / s)
    assert _equivalent_eps(eps, s, mistake="times_s2") == pytest.approx(eps * s**2)
    assert _equivalent_eps(eps, s, mistake="unchanged") == eps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_wn_backward_without_eps_in_its_projection_is_off_by_about_1e_6(seed):
    """Exercise 05.1 compares with refnorm's backward as well as with finite differences
    because an answer dropping the projection's factor N / (N + eps) is off by only
    g eps <G, v_hat> v_hat / (N + eps)^2, about 1e-6 of the gradient's scale: the size of
    the finite differences' tolerance. The catalogued mistake is that answer."""
    spec = lessons.exercise("05.1")
    wrong = next(m.variant for m in spec.mistakes if "N/(N + eps)" in m.name)
    rng = np.random.default_rng([seed, 51])  # the check's own inputs, lesson 05
    V = 0.3 * rng.standard_normal((4, 27)) + 0.1
    g = 1.0 + 0.3 * rng.standard_normal(4)
    G = rng.standard_normal(V.shape)
    eps = 1e-5
    right = weight_norm_backward(G, weight_norm_forward(V, g, eps=eps)[1])[0]
    norm = np.linalg.norm(V, axis=1, keepdims=True)
    v_hat = V / norm
    along = np.sum(G * v_hat, axis=1, keepdims=True)
    # d/dV of g V / (N + eps): the projection's factor is N / (N + eps); with 1 instead,
    # dV changes by g/(N + eps) * (N/(N + eps) - 1) <G, v_hat> v_hat
    shift = -g[:, None] * eps * along * v_hat / (norm + eps) ** 2
    dV, _ = wrong(G, V, g, eps)
    np.testing.assert_allclose(dV - right, shift, rtol=1e-6, atol=1e-15)
    assert 1e-7 < lessons.rel_err(dV, right) < 1e-5


def test_the_merge_mistakes_of_lessons_03_and_04_compute_what_they_name():
    """Exercise 03.1's 'divided by K - 1' is the mean of the group variances plus the
    unbiased variance of the group means (lesson 03: "dividing that second term by C - 1");
    exercise 04.1's unweighted spread is M2 summed plus each device's squared offset counted
    once, not n_p times."""
    def variant(ex, name):
        return next(m.variant for m in lessons.exercise(ex).mistakes if m.name == name)

    rng = np.random.default_rng(3)
    mu_in, var_in = rng.standard_normal((4, 3, 1, 1)), rng.uniform(1, 2, (4, 3, 1, 1))
    merge = variant("03.1", "the spread of the group means divided by K - 1")
    for axis in (0, 1):
        mu, var = merge(mu_in, var_in, axis)
        want = var_in.mean(axis=axis) + np.var(mu_in, axis=axis, ddof=1)
        np.testing.assert_allclose(var, np.expand_dims(want, axis), rtol=1e-13)
    counts, means = [3, 0, 5], [rng.standard_normal(2), np.zeros(2), rng.standard_normal(2)]
    m2s = [rng.uniform(1, 2, 2), np.zeros(2), rng.uniform(1, 2, 2)]
    chan = variant("04.1", "the spread of the device means not weighted by their counts")
    n, mean, m2 = chan(counts, means, m2s)
    right_mean = (3 * means[0] + 5 * means[2]) / 8
    assert n == 8
    np.testing.assert_allclose(mean, right_mean, rtol=1e-13)
    np.testing.assert_allclose(
        m2, sum(m2s) + sum((m - right_mean) ** 2 for m in means), rtol=1e-13)


# -- proposed (mutation run 9)


def test_a_nested_begin_is_refused():
    """A second '# BEGIN SOLUTION' before the first block's END is a malformed cell, refused
    by name (it would otherwise leave two raises and part of the solution in the blank)."""
    nested = ("# Exercise 9.5: f\ndef f():\n    # BEGIN SOLUTION\n    x = 1\n"
              "    # BEGIN SOLUTION\n    return x\n    # END SOLUTION")
    with pytest.raises(lessons.LessonFormatError, match="nested"):
        lessons.blank_solution(nested)


def test_a_task_beyond_the_basic_multilingual_plane_is_raised_as_written():
    """A mathematical letter such as U+1D6FE (italic gamma) is one character, not two lone
    surrogates that no terminal can print."""
    task = "scale by \U0001d6fe, not by 2"
    namespace: dict = {}
    exec(lessons.blank_solution(SOLVED.replace("write double", task)), namespace)
    with pytest.raises(NotImplementedError) as raised:
        namespace["double"](3)
    assert str(raised.value) == f"exercise 9.1: {task}"
    str(raised.value).encode("utf-8")  # printable


def test_a_task_with_quotes_and_backslashes_is_raised_as_written():
    """The blank's NotImplementedError carries the task exactly, whatever characters it has
    (quotes, a backslash): the blanked cell stays valid Python."""
    task = 'return "twice" x, as in C:\\temp\\x'
    solved = SOLVED.replace("write double", task)
    namespace: dict = {}
    exec(lessons.blank_solution(solved), namespace)
    with pytest.raises(NotImplementedError) as info:
        namespace["double"](3)
    assert str(info.value) == f"exercise 9.1: {task}"


def _notebook(*cells: dict) -> dict:
    return {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": list(cells)}


_EXERCISE = {"cell_type": "code", "execution_count": None, "metadata": {"tags": ["solution"]},
             "outputs": [], "source": "# Exercise 9.1: one\ndef f():\n    # BEGIN SOLUTION\n"
                                      "    return 1\n    # END SOLUTION\n"}


def test_student_copy_clears_the_outputs_of_every_code_cell(tmp_path):
    """Outputs of an executed lesson are cleared in every code cell, not only in the exercises'
    (a plot or a printed answer after an exercise would give it away)."""
    src = tmp_path / "src"
    src.mkdir()
    shown = {"cell_type": "code", "execution_count": 2, "metadata": {},
             "outputs": [{"output_type": "stream", "name": "stdout", "text": "1\n"}],
             "source": "print(f())"}
    (src / "09_x.ipynb").write_text(json.dumps(_notebook(_EXERCISE, shown)), encoding="utf-8")
    lessons.write_student_copies(tmp_path / "dest", src)
    cells = json.loads((tmp_path / "dest" / "09_x.ipynb").read_text(encoding="utf-8"))["cells"]
    assert [c["outputs"] for c in cells] == [[], []]


def test_a_refused_student_copy_writes_nothing(tmp_path, capsys):
    """When one notebook in DIR holds a student's edits, the command refuses before writing any
    copy: a lesson missing from DIR is not written either."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    for name in ("09_a.ipynb", "09_b.ipynb"):
        (src / name).write_text(json.dumps(_notebook(_EXERCISE)), encoding="utf-8")
    assert lessons.main(["--student", str(dest), "--source", str(src)]) == 0
    (dest / "09_a.ipynb").unlink()
    edited = dest / "09_b.ipynb"
    edited.write_text(edited.read_text(encoding="utf-8").replace("raise", "return 1 #"),
                      encoding="utf-8")
    capsys.readouterr()
    assert lessons.main(["--student", str(dest), "--source", str(src)]) == 2
    assert "09_b.ipynb differs from the blank student copy" in capsys.readouterr().err
    assert sorted(p.name for p in dest.iterdir()) == ["09_b.ipynb"]


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_where_a_copy_goes_is_refused_before_any_copy_is_written(tmp_path, capsys,
                                                                          force):
    """With --force the first lessons were written, then the command stopped at the folder;
    without it, the refusal was a bare IsADirectoryError."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    for name in ("09_a.ipynb", "09_b.ipynb"):
        (src / name).write_text(json.dumps(_notebook(_EXERCISE)), encoding="utf-8")
    (dest / "09_b.ipynb").mkdir(parents=True)
    argv = ["--student", str(dest), "--source", str(src)] + (["--force"] if force else [])
    assert lessons.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"refnorm lessons: error: {dest / '09_b.ipynb'} is a folder, where the student copy "
        "of 09_b.ipynb goes: remove or rename it")
    assert sorted(p.name for p in dest.iterdir()) == ["09_b.ipynb"]  # 09_a not written


def test_student_copy_below_a_file_names_the_file(tmp_path, capsys):
    """DIR under a file (afile/below): the one sentence names the file that stands in the
    way, as for DIR itself a file."""
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    assert lessons.main(["--student", str(a_file / "below")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"refnorm lessons: error: {a_file} is a file; --student needs a folder to write the "
        "copies into")


# -- rel_err, the lessons' relative error -------------------------------------------------------


def test_rel_err_is_relative_to_the_larger_of_the_two_whichever_is_the_answer():
    """max|a - b| / max(max|a|, max|b|): symmetric, so an answer of 1e-3 where refnorm's is
    zero is 100 % off (not 1e-3 off, which a tolerance of 1e-2 would let pass)."""
    answer, zero = np.array([0.0, 1e-3]), np.zeros(2)
    assert lessons.rel_err(answer, zero) == lessons.rel_err(zero, answer) == 1.0
    assert lessons.rel_err(np.array([2.0, -4.0]), np.array([1.0, -2.0])) == 0.5


def test_rel_err_of_a_nan_is_nan_and_differing_shapes_are_refused():
    assert np.isnan(lessons.rel_err(np.array([np.nan, 1.0]), np.ones(2)))
    with pytest.raises(AssertionError, match=r"shapes differ: \(1, 3\) vs \(3,\)"):
        lessons.rel_err(np.ones((1, 3)), np.ones(3))  # no broadcasting


# -- check_outputs ------------------------------------------------------------------------------


def test_an_answer_with_a_nan_fails(toy):
    """A NaN compares false with any tolerance: the check must fail on it, not pass it."""
    with pytest.raises(AssertionError, match=r"rel_err\(mean\) = nan"):
        _grade_toy(lambda x: np.where([True, False, True], x.mean(axis=0), np.nan))


def test_an_answer_with_other_outputs_than_the_checks_is_a_sentence(toy):
    """A candidate returning its outputs by name (as exercise 06.1's gradients are) with one
    missing or one too many: the check names both lists, it neither raises a KeyError nor
    passes."""
    want = {"mean": X_TOY.mean(axis=0), "count": 4.0}

    def grade(candidate):
        return lessons.check_outputs("9.9", lambda fn: fn(X_TOY), candidate, want, tol=1e-12,
                                     reason="rounding")

    with pytest.raises(AssertionError, match=r"the check expected the outputs \['count', "
                                             r"'mean'\]; it got \['mean'\]"):
        grade(lambda x: {"mean": x.mean(axis=0)})
    with pytest.raises(AssertionError, match=r"it got \['count', 'mean', 'sum'\]"):
        grade(lambda x: {"mean": x.mean(axis=0), "count": 4.0, "sum": x.sum(axis=0)})


def test_a_passed_check_returns_the_candidates_outputs_not_refnorms(toy):
    answer = X_TOY.mean(axis=0) * (1 + 1e-13)  # within the tolerance, not refnorm's bits
    assert not np.array_equal(answer, X_TOY.mean(axis=0))
    result = _grade_toy(lambda x: answer)
    assert np.array_equal(result["mean"], answer)


def test_an_error_raised_in_a_partial_stays_the_students(toy):
    """A candidate without code of its own (functools.partial of the student's function):
    nothing tells its errors from the check's, so its TypeError keeps its traceback rather
    than becoming "the check could not use what your function returned"."""
    def mean_plus(x, offset):
        return x.mean(axis=0) + offset  # the student's own line fails for a str offset

    with pytest.raises(TypeError):
        _grade_toy(partial(mean_plus, offset="a"))


def test_an_error_raised_in_code_of_the_students_cell_stays_theirs(toy):
    """A generator the student's function returns runs inside the check (here, list()); an
    error on its line is the student's, with their traceback, not "the check could not use
    what your function returned"."""
    cell: dict = {"np": np}
    exec(compile("def mean0(x):\n    return (col.sum() / 'n' for col in x.T)\n",
                 "the student's cell", "exec"), cell)
    with pytest.raises(TypeError, match="ufunc .divide. not supported"):
        lessons.check_outputs("9.9", lambda fn: {"mean": np.array(list(fn(X_TOY)))},
                              cell["mean0"], {"mean": X_TOY.mean(axis=0)}, tol=1e-12,
                              reason="rounding")


def test_outputs_may_come_as_any_mapping(toy, capsys):
    """A run that hands its outputs back as a read-only mapping is read by name too."""
    lessons.check_outputs("9.9", lambda fn: MappingProxyType({"mean": fn(X_TOY)}),
                          lambda x: x.mean(axis=0), {"mean": X_TOY.mean(axis=0)}, tol=1e-12,
                          reason="rounding")
    assert capsys.readouterr().out.startswith("exercise 9.9 passed: rel_err(mean) = ")


# -- naming a known mistake ---------------------------------------------------------------------


def test_a_float32_answer_is_named_within_float32_rounding(toy):
    """The same wrong sum in another order of float32 additions differs from the catalogue's
    by float32 rounding (about 1e-7 here), far above the float64 matching tolerance: it is
    still that mistake."""
    x = np.random.default_rng(0).standard_normal((1000, 3)).astype(np.float32) + 3.0

    def student(x):  # the sum where the mean belongs, accumulated in float64
        return x.astype(np.float64).sum(axis=0).astype(np.float32)

    assert 1e-9 < lessons.rel_err(student(x), x.sum(axis=0)) < 1e-5
    with pytest.raises(AssertionError,
                       match="a known mistake gives: a sum where the mean belongs"):
        lessons.check_outputs("9.9", lambda fn: {"mean": fn(x)}, student,
                              {"mean": x.mean(axis=0)}, tol=1e-6, reason="float32 rounding")


def _scaled_sum(x, *, by):
    return (x.sum(axis=0) * by).astype(np.float32)


def test_of_two_mistakes_within_the_matching_tolerance_the_nearest_is_named(toy):
    lessons.register(lessons.Exercise(
        id="9.9", function="mean0", nudges=("look at the axis", "mean = sum / n"),
        mistakes=(lessons.Mistake("a sum, a few rounding steps up", "divide by n",
                                  partial(_scaled_sum, by=1 + 4e-6)),
                  lessons.Mistake("a sum where the mean belongs", "divide by n",
                                  partial(_scaled_sum, by=1.0)))))
    x = X_TOY.astype(np.float32)
    with pytest.raises(AssertionError,
                       match="a known mistake gives: a sum where the mean belongs"):
        lessons.check_outputs("9.9", lambda fn: {"mean": fn(x)}, lambda x: x.sum(axis=0),
                              {"mean": x.mean(axis=0)}, tol=1e-6, reason="float32 rounding")


@pytest.mark.parametrize(("dtype", "off"), [(np.float64, 1e-7), (np.float32, 1e-4)])
def test_an_answer_near_a_mistake_but_beyond_its_rounding_gets_a_hint(toy, dtype, off):
    """A sum off by 1e-7 (float64) or 1e-4 (float32) is 100 and 10 times the rounding of
    the same wrong computation (1e-9 and 1e-5): another mistake, so a hint, not the name of
    the sum."""
    x = X_TOY.astype(dtype)
    answer = (x.astype(np.float64).sum(axis=0) * (1 + off)).astype(dtype)
    with pytest.raises(AssertionError, match=r"Hint 1 of 2") as failed:
        lessons.check_outputs("9.9", lambda fn: {"mean": fn(x)}, lambda x: answer,
                              {"mean": x.mean(axis=0)}, tol=1e-6, reason="rounding")
    assert "known mistake" not in str(failed.value)


def test_an_answer_of_nans_is_never_named_as_a_mistake(toy):
    """NaN is no distance: an all-NaN answer equals no catalogued mistake."""
    with pytest.raises(AssertionError, match=r"rel_err\(mean\) = nan.*Hint 1 of 2") as failed:
        _grade_toy(lambda x: np.full(3, np.nan))
    assert "known mistake" not in str(failed.value)


def test_diagnose_of_answers_with_other_names_gives_a_hint(toy):
    """An answer and a mistake's outputs under other names are different answers."""
    advice = lessons.diagnose("9.9", {"mean": np.ones(3)}, lambda v: {"sum": np.ones(3)})
    assert advice.startswith("Hint 1 of 2")


def test_an_exercise_needs_a_hint_and_registering_it_again_replaces_it(toy):
    with pytest.raises(ValueError, match="exercise 9.7 needs at least one nudge"):
        lessons.register(lessons.Exercise(id="9.7", function="f", nudges=()))
    again = lessons.register(lessons.Exercise(id="9.9", function="mean0", nudges=("new",)))
    assert lessons.exercise("9.9") is again


# -- check_integers -----------------------------------------------------------------------------


def test_at_most_allows_the_bound_itself(toy, capsys):
    lessons.check_integers("9.9", lambda fn: {"moved": 14}, None, {"moved": 14},
                           reason="a budget", at_most=True)
    assert "moved = 14 <= 14 (a budget)" in capsys.readouterr().out


@pytest.mark.parametrize(("answer", "wanted"), [(1, "2 integers"), ((1, 1, 1), "2 integers"),
                                                 ((1,), "2 integers")])
def test_at_most_refuses_an_answer_of_another_shape(toy, answer, wanted):
    """<= entry by entry must not broadcast: one integer is not under a budget of two, and
    three integers are not compared with two (numpy would raise)."""
    with pytest.raises(AssertionError, match=rf"sizes = .*, expected {wanted} \(a budget\)"):
        lessons.check_integers("9.9", lambda fn: {"sizes": answer}, None, {"sizes": (2, 3)},
                               reason="a budget", at_most=True)
    with pytest.raises(AssertionError, match=rf"sizes = .*, expected {wanted} \(exact\)"):
        lessons.check_integers("9.9", lambda fn: {"sizes": answer}, None, {"sizes": (2, 3)},
                               reason="exact")


def test_a_bool_is_not_an_integer_answer(toy):
    with pytest.raises(AssertionError, match="all-reduces must be an integer"):
        lessons.check_integers("9.9", lambda fn: {"all-reduces": True}, None,
                               {"all-reduces": 1}, reason="exact")


def test_a_string_is_not_an_integer_answer(toy):
    with pytest.raises(AssertionError, match=r"bytes must be an integer \(or integers\); "
                                             r"got '12'"):
        lessons.check_integers("9.9", lambda fn: {"bytes": "12"}, None, {"bytes": 12},
                               reason="exact")


def _plus(n, *, extra):
    return n + extra


def test_integers_are_named_as_a_mistake_only_when_equal(toy):
    """Integers match a mistake exactly: 10**12 + 2 is not the mistake 10**12 + 1 (a
    relative tolerance of 1e-9 would call them equal), and a non-integral answer is none."""
    lessons.register(lessons.Exercise(
        id="9.9", function="count", nudges=("count them", "n"),
        mistakes=(lessons.Mistake("one too many", "start at 0", partial(_plus, extra=1)),)))
    big = 10**12

    def grade(candidate):
        lessons.check_integers("9.9", lambda fn: {"n": fn(big)}, candidate, {"n": big},
                               reason="exact")

    with pytest.raises(AssertionError, match="a known mistake gives: one too many"):
        grade(lambda n: n + 1)
    for wrong in (lambda n: n + 2, lambda n: n + 0.5):
        with pytest.raises(AssertionError, match="Hint 1 of 2") as failed:
            grade(wrong)
        assert "known mistake" not in str(failed.value)
        grading._FAILURES.pop("9.9", None)


# -- check_gradients ----------------------------------------------------------------------------


def _vjp_x(backward, dy, x):
    return {"x": backward(dy, x)}


X3 = {"x": np.array([1.0, -2.0, 3.0])}


def test_gradients_are_checked_with_a_random_dy_never_all_ones(toy):
    """With dy all ones the gradient of sum(x - mean(x)) vanishes, and a backward that returns
    zeros would pass."""
    def centered(x):
        return x - x.mean()

    x = {"x": np.array([1.0, -2.0, 3.0, 0.5])}
    lessons.check_gradients("9.9", centered, _vjp_x, lambda dy, x: dy - dy.mean(), x)
    with pytest.raises(AssertionError, match="dx differs from central differences"):
        lessons.check_gradients("9.9", centered, _vjp_x, lambda dy, x: np.zeros_like(x), x)


def test_the_seed_draws_the_upstream_gradient(toy):
    seen = []

    def vjp(backward, dy, x):
        seen.append(dy.copy())
        return {"x": backward(dy, x)}

    for seed in (0, 0, 1):
        lessons.check_gradients("9.9", lambda x: x**2, vjp, lambda dy, x: 2 * x * dy, X3,
                                seed=seed)
    assert np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[0], seen[2])


def test_a_backward_that_overwrites_its_inputs_does_not_move_the_point_checked(toy):
    """The candidate gets copies: a right backward that reuses x's buffer for its answer is
    still compared with the central differences at the original x."""
    def backward_in_place(dy, x):
        x *= 2.0 * dy
        return x

    lessons.check_gradients("9.9", lambda x: x**2, _vjp_x, backward_in_place, X3)


def test_gradients_are_checked_in_float64_whatever_the_inputs_dtype(toy):
    """float32 inputs are converted (central differences with a step of 1e-6 mean nothing
    in float32): the backward sees float64 and a right one passes."""
    seen = []

    def backward(dy, x):
        seen.append((x.dtype, dy.dtype))
        return 2 * x * dy

    lessons.check_gradients("9.9", lambda x: x**2, _vjp_x, backward,
                            {"x": X3["x"].astype(np.float32)})
    assert seen == [(np.float64, np.float64)]


def test_the_printed_noise_floor_is_relative_to_the_gradients_scale(toy, capsys):
    """The floor is printed beside a relative error, so it is relative too: for outputs of
    1e8 (absolute noise about 1e-1 at a step of 1e-6) it stays about 1e-8 of a gradient of
    1e8, below the tolerance, not 1e-1."""
    lessons.check_gradients("9.9", lambda x: 1e8 * x**2, _vjp_x,
                            lambda dy, x: 2e8 * x * dy, X3)
    floor = re.search(r"their noise: up to (\S+)\)", capsys.readouterr().out).group(1)
    assert 0 < float(floor) < 1e-6


def test_the_default_gradient_tolerance_is_1e_6(toy):
    """A backward off by 1e-4 of its scale fails at the documented default, 1e-6."""
    with pytest.raises(AssertionError, match="allowed 1e-06"):
        lessons.check_gradients("9.9", lambda x: x**2, _vjp_x,
                                lambda dy, x: 2 * x * dy * (1 + 1e-4), X3)


def test_a_gradient_of_another_shape_or_for_an_unknown_input_is_named(toy):
    with pytest.raises(AssertionError, match=r"dx has shape \(1, 3\), x has \(3,\)"):
        lessons.check_gradients("9.9", lambda x: x**2, _vjp_x,
                                lambda dy, x: (2 * x * dy)[None], X3)

    def vjp_with_z(backward, dy, x):
        return {"x": backward(dy, x), "z": np.zeros(3)}

    with pytest.raises(AssertionError, match=r"gradients for unknown inputs \['z'\]"):
        lessons.check_gradients("9.9", lambda x: x**2, vjp_with_z,
                                lambda dy, x: 2 * x * dy, X3)


# -- the catalogued mistakes compute what they name ---------------------------------------------
# A mistake is named when a student's answer equals it; each is checked here against the
# mistake written the way a student would write it, or against what it leaves right.

RNG = np.random.default_rng(2024)
X_BN = 5.0 * RNG.standard_normal((4, 3, 2, 2)) + 12.0  # (N, C, H, W)
GAMMA, BETA = 1.0 + 0.3 * RNG.standard_normal(3), 0.3 * RNG.standard_normal(3)
DY_BN = RNG.standard_normal(X_BN.shape)


def _mistake(exercise_id, name):
    return next(m.variant for m in lessons.exercise(exercise_id).mistakes if m.name == name)


def test_bn_forward_mistakes_01_1():
    """Ioffe & Szegedy (2015), Alg. 1 and section 3.1: the momentum and eps mistakes change
    only the part they name."""
    rng = np.random.default_rng(2)
    mean0, var0 = 12.0 + rng.standard_normal(3), 25.0 * rng.uniform(0.5, 1.5, 3)
    mu, var = X_BN.mean(axis=(0, 2, 3)), X_BN.var(axis=(0, 2, 3))
    m = X_BN.size // 3
    y, _, rm, rv = _mistake("01.1", "momentum weighting the old value")(
        X_BN, GAMMA, BETA, mean0, var0, True)
    want_y, _ = batch_norm_forward(X_BN, GAMMA, BETA)
    assert lessons.rel_err(y, want_y) < 1e-12  # the forward itself is right
    assert lessons.rel_err(rm, 0.1 * mean0 + 0.9 * mu) < 1e-12
    assert lessons.rel_err(rv, 0.1 * var0 + 0.9 * var * m / (m - 1)) < 1e-12

    _, (_, rstd), _, _ = _mistake("01.1", "eps added to the standard deviation")(
        X_BN, GAMMA, BETA, mean0, var0, True, eps=1e-2)
    assert lessons.rel_err(rstd.ravel(), 1.0 / (np.sqrt(var) + 1e-2)) < 1e-12


def test_bn_backward_mistakes_change_only_what_they_name_01_2_and_01_3():
    """A mistake in dgamma or dbeta leaves dx right, and one in dx leaves dgamma and dbeta
    right (Ioffe & Szegedy 2015, section 3: the gradients of the last node)."""
    _, cache = batch_norm_forward(X_BN, GAMMA, BETA, eps=1e-5)
    dx, dgamma, dbeta = batch_norm_backward(DY_BN, cache)
    for name in ("dgamma without x_hat", "dgamma and dbeta summed over every axis"):
        got_dx, _, _ = _mistake("01.2", name)(DY_BN, X_BN, GAMMA, 1e-5)
        assert lessons.rel_err(got_dx, dx) < 1e-10, name
    for spec_id, args in (("01.2", (DY_BN, X_BN, GAMMA, 1e-5)),
                          ("01.3", (DY_BN, cache.x_hat, cache.rstd, GAMMA))):
        for mistake in lessons.exercise(spec_id).mistakes:
            if "dgamma" in mistake.name:
                continue
            _, got_dgamma, got_dbeta = mistake.variant(*args)
            assert got_dgamma.shape == dgamma.shape == (3,), (spec_id, mistake.name)
            assert lessons.rel_err(got_dgamma, dgamma) < 1e-10, (spec_id, mistake.name)
            assert lessons.rel_err(got_dbeta, dbeta) < 1e-10, (spec_id, mistake.name)


def test_gn_forward_groups_of_every_gth_channel_02_1():
    """Wu & He (2018), Eq. 7: the interleaved mistake puts channels g, g + G, ... in group g."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 2, 2))
    gamma, beta, G, eps = np.ones(6), np.zeros(6), 2, 1e-5
    y, _ = _mistake("02.1", "groups of every G-th channel")(x, gamma, beta, G, eps)
    want = np.empty_like(x)
    for g in range(G):
        part = x[:, g::G]  # channels g, g + G, g + 2G
        mu = part.mean(axis=(1, 2, 3), keepdims=True)
        var = part.var(axis=(1, 2, 3), keepdims=True)
        want[:, g::G] = (part - mu) / np.sqrt(var + eps)
    assert lessons.rel_err(y, want) < 1e-12


def test_merge_moments_with_the_between_part_divided_by_k_minus_1_03_1():
    rng = np.random.default_rng(5)
    mu_in, var_in = rng.standard_normal((2, 4, 1)), rng.uniform(0.5, 2.0, (2, 4, 1))
    mu, var = _mistake("03.1", "the spread of the group means divided by K - 1")(
        mu_in, var_in, 1)
    spread = ((mu_in - mu_in.mean(axis=1, keepdims=True)) ** 2).sum(axis=1, keepdims=True)
    assert lessons.rel_err(var, var_in.mean(axis=1, keepdims=True) + spread / 3) < 1e-12


def test_scope_gradient_with_hw_for_every_scope_03_2():
    """Luo et al. (2019), Eq. 9 with |I_k| = HW whatever the scope (LN's is CHW, BN's NHW)."""
    rng = np.random.default_rng(6)
    h = rng.standard_normal((3, 4, 5))  # (N, C, S)
    dmu, dvar = rng.standard_normal((3, 4, 1)), rng.standard_normal((3, 4, 1))
    variant = _mistake("03.2", "|I_k| = HW for every scope")
    for scope, axes, entries in (("ln", (1, 2), 1), ("bn", (0, 2), 0)):
        mu_k = h.mean(axis=axes, keepdims=True)
        dvar_k = dvar.sum(axis=entries, keepdims=True)
        dmu_k = dmu.sum(axis=entries, keepdims=True)
        want = 0.7 * dvar_k * 2.0 * (h - mu_k) / 5 + 0.2 * dmu_k / 5
        assert lessons.rel_err(variant(h, dmu, dvar, scope, 0.2, 0.7), want) < 1e-12, scope


def test_conv1x1_weight_gradient_of_the_first_image_only_03b_2():
    rng = np.random.default_rng(7)
    dz, x = rng.standard_normal((3, 2, 2, 2)), rng.standard_normal((3, 4, 2, 2))
    got = _mistake("03b.2", "the first image only")(dz, x)
    want = sum(np.outer(dz[0, :, i, j], x[0, :, i, j]) for i in range(2) for j in range(2))
    assert lessons.rel_err(got, want) < 1e-12


def test_sync_dx_with_the_devices_own_count_04_2():
    """The device's own count is the number of values per channel it holds, N_p H W."""
    rng = np.random.default_rng(8)
    class TwoEqualDevices:  # every device holds the same shard: the sums double
        def allreduce_sum(self, arrays):
            return [2.0 * a for a in arrays]

    x_hat, dy = rng.standard_normal((2, 3, 2, 2)), rng.standard_normal((2, 3, 2, 2))
    rstd, n = rng.uniform(0.5, 2.0, 3), 16
    got = _mistake("04.2", "the device's own count where the batch's belongs")(
        TwoEqualDevices(), x_hat, dy, GAMMA, rstd, n)
    g, r = GAMMA.reshape(1, -1, 1, 1), rstd.reshape(1, -1, 1, 1)
    dx_hat = dy * g
    s1 = 2.0 * dx_hat.sum(axis=(0, 2, 3), keepdims=True)
    s2 = 2.0 * (dx_hat * x_hat).sum(axis=(0, 2, 3), keepdims=True)
    own = 2 * 2 * 2  # N_p H W
    assert lessons.rel_err(got, r * (dx_hat - s1 / own - x_hat * s2 / own)) < 1e-12


def test_ws_backward_mistakes_keep_the_mean_removal_05b_1():
    """Qiao et al. (2019), Eq. 8-9: dL/dW = dL/dW_dot - mean(dL/dW_dot) per output channel, so
    every row of dW sums to zero unless the mistake is that removal itself."""
    rng = np.random.default_rng(9)
    W = rng.standard_normal((3, 5))
    W_dot = W - W.mean(axis=1, keepdims=True)
    sigma = np.sqrt((W_dot**2).mean(axis=1, keepdims=True))
    g_hat = rng.standard_normal((3, 5))
    for mistake in lessons.exercise("05b.1").mistakes:
        rows = mistake.variant(g_hat, W_dot / sigma, sigma).sum(axis=1)
        if mistake.variant.keywords["mistake"] == "no_mean":
            assert np.abs(rows).max() > 1e-3
        else:
            assert np.abs(rows).max() < 1e-12, mistake.name


def test_memory_traffic_mistakes_07_1():
    """The reference backward reads 14 and writes 7 full-size arrays (dy, x_hat and dx_hat
    three times each, five temporaries once; dx_hat, the five temporaries and dx): each
    mistake leaves out what it names."""
    def arrays(name):
        reads, writes = _mistake("07.1", name)(1, 1)
        return reads, writes

    assert arrays("the sums and means counted as free") == (14 - 4, 7)
    assert arrays("each input read only once") == (14 - 6, 7)
    assert arrays("the temporaries left out") == (14 - 5, 7 - 5)


def test_lean_bn_backward_with_the_number_of_samples_07_2():
    rng = np.random.default_rng(11)
    x_hat, dy = rng.standard_normal((4, 3, 2, 2)), rng.standard_normal((4, 3, 2, 2))
    rstd = rng.uniform(0.5, 2.0, (1, 3, 1, 1))
    dx, _, _ = _mistake("07.2", "the number of samples where the values per channel belong")(
        dy, x_hat, rstd, GAMMA)
    dbeta = dy.sum(axis=(0, 2, 3), keepdims=True)
    dgamma = (dy * x_hat).sum(axis=(0, 2, 3), keepdims=True)
    m = 4  # N, where N H W = 16 belongs
    want = GAMMA.reshape(1, -1, 1, 1) * rstd * (dy - dbeta / m - x_hat * dgamma / m)
    assert lessons.rel_err(dx, want) < 1e-12


# Each mistake as a student would write it, independently of the catalogue's variant: the
# closed forms below follow from the right backward (Ioffe & Szegedy 2015, section 3) with the
# named term scaled, and from the right forwards with the named constant changed.

_AX = (0, 2, 3)
_RSTD_BN = 1.0 / np.sqrt(X_BN.var(axis=_AX, keepdims=True) + 1e-5)  # (1, C, 1, 1), biased
_X_HAT_BN = (X_BN - X_BN.mean(axis=_AX, keepdims=True)) * _RSTD_BN


def _bn_dx_with_var_term_times(k):
    """The closed-form dx with the term through the variance multiplied by ``k``."""
    dxh = DY_BN * GAMMA.reshape(1, -1, 1, 1)
    var_term = _X_HAT_BN * (dxh * _X_HAT_BN).mean(axis=_AX, keepdims=True)
    dx = _RSTD_BN * (dxh - dxh.mean(axis=_AX, keepdims=True) - k * var_term)
    return dx, (DY_BN * _X_HAT_BN).sum(axis=_AX), DY_BN.sum(axis=_AX)


def _bn_eval_backward_with_batch_statistics():
    rstd = 1.0 / np.sqrt(np.var(X_BN, axis=_AX, keepdims=True) + 1e-5)
    x_hat = (X_BN - np.mean(X_BN, axis=_AX, keepdims=True)) * rstd
    return (DY_BN * GAMMA.reshape(1, -1, 1, 1) * rstd, (DY_BN * x_hat).sum(axis=_AX),
            DY_BN.sum(axis=_AX))


def _gn_forward_unbiased(G=3):
    x = X_BN.reshape(4, 1, 3, 2, 2).repeat(2, axis=1).reshape(4, 6, 2, 2)  # C = 6
    xg = x.reshape(4, G, 6 // G, 2, 2)
    mu = xg.mean(axis=(2, 3, 4), keepdims=True)
    var = ((xg - mu) ** 2).sum(axis=(2, 3, 4), keepdims=True) / (xg[0, 0].size - 1)
    rstd = 1.0 / np.sqrt(var + 1e-5)
    x_hat = ((xg - mu) * rstd).reshape(x.shape)
    return (x, np.ones(6), np.zeros(6), G, 1e-5), (x_hat, (x_hat, rstd))


def _gn_backward_with_in_means(G=3):
    x = X_BN.reshape(4, 1, 3, 2, 2).repeat(2, axis=1).reshape(4, 6, 2, 2)  # C = 6
    xg = x.reshape(4, G, 2, 2, 2)
    rstd = 1.0 / np.sqrt(xg.var(axis=(2, 3, 4), keepdims=True) + 1e-5)  # (N, G, 1, 1, 1)
    x_hat = ((xg - xg.mean(axis=(2, 3, 4), keepdims=True)) * rstd).reshape(x.shape)
    dy = np.concatenate([DY_BN, DY_BN[::-1]], axis=1)
    gamma = np.linspace(0.5, 1.5, 6)
    dxh = dy * gamma.reshape(1, -1, 1, 1)
    r = np.repeat(rstd.reshape(4, G), 6 // G, axis=1).reshape(4, 6, 1, 1)  # per channel
    dx = r * (dxh - dxh.mean(axis=(2, 3), keepdims=True)
              - x_hat * (dxh * x_hat).mean(axis=(2, 3), keepdims=True))
    return (dy, x_hat, rstd, gamma, G), (dx, (dy * x_hat).sum(axis=_AX), dy.sum(axis=_AX))


def _scope_gradient_averaged(scope):
    h = X_BN.reshape(4, 3, 4)  # (N, C, S)
    dmu, dvar = DY_BN[:, :, :1, 0], DY_BN[:, :, 1:, 1]  # (N, C, 1) each
    axes, entries = {"ln": ((1, 2), 1), "bn": ((0, 2), 0)}[scope]
    size = np.prod([h.shape[a] for a in axes])
    want = (0.7 * np.mean(dvar, axis=entries, keepdims=True) * 2 * (
        h - h.mean(axis=axes, keepdims=True)) / size
        + 0.2 * np.mean(dmu, axis=entries, keepdims=True) / size)
    return (h, dmu, dvar, scope, 0.2, 0.7), want


def _softmax_gradient_unweighted():
    w, S = np.array([0.2, 0.5, 0.3]), np.array([1.0, -2.0, 0.5])
    return (w, S), np.array([w[k] * S[k] - w[k] * (S[0] + S[1] + S[2]) for k in range(3)])


def _cross_entropy_gradient_undivided():
    logits, labels = DY_BN[:, :, 0, 0], np.array([0, 2, 1, 2])  # (n, K), (n,)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return (logits, labels, 8), p - np.eye(3)[labels]


def _conv1x1_weight_grad_mean():
    dz, x = DY_BN[:, :2], X_BN  # (N, C_out, H, W), (N, C_in, H, W)
    total = sum(np.outer(dz[n, :, i, j], x[n, :, i, j])
                for n in range(4) for i in range(2) for j in range(2))
    return (dz, x), total / 16


def _chan_merge_without_the_spread():
    counts, means, m2s = [12, 0, 4], [X_BN[0, :, 0, 0], np.zeros(3), X_BN[1, :, 0, 0]], [
        DY_BN[0, :, 0, 0] ** 2, np.zeros(3), DY_BN[1, :, 0, 0] ** 2]
    mean = (12 * means[0] + 4 * means[2]) / 16
    return (counts, means, m2s), (16, mean, m2s[0] + m2s[1] + m2s[2])


def _wn_backward_with_v():
    G, V, g, eps = DY_BN.reshape(4, 12), X_BN.reshape(4, 12), GAMMA[[0, 1, 2, 0]], 1e-5
    norm = np.linalg.norm(V, axis=1, keepdims=True)  # (C_out, 1)
    dV = g[:, None] / (norm + eps) * (G - (G * V).sum(axis=1, keepdims=True) * V)
    return (G, V, g, eps), (dV, (G * V).sum(axis=1) / (norm.ravel() + eps))


def _ws_backward_over_sigma_squared():
    W = X_BN.reshape(4, 12)
    W_dot = W - W.mean(axis=1, keepdims=True)
    sigma = np.sqrt((W_dot**2).mean(axis=1, keepdims=True))
    W_hat, g_hat = W_dot / sigma, DY_BN.reshape(4, 12)
    d = (g_hat - (W_hat * g_hat).mean(axis=1, keepdims=True) * W_hat) / sigma**2
    return (g_hat, W_hat, sigma), d - d.mean(axis=1, keepdims=True)


def _ws_forward_eps_in_root(correction):
    W = X_BN.reshape(4, 12)
    W_dot = W - W.mean(axis=1, keepdims=True)
    var = (W_dot**2).sum(axis=1, keepdims=True) / (12 - correction)
    return (W, 1e-2, correction), W_dot / np.sqrt(var + 1e-2)


def _accumulate_by_count():
    grads = [{"w": DY_BN[0]}, {"w": DY_BN[1]}, {"w": DY_BN[2]}]
    return (grads, [8, 8, 6]), {"w": (DY_BN[0] + DY_BN[1] + DY_BN[2]) / 3}


class _Linear:
    """A one-layer model with the interface exercise 06.1 uses: logits = x W."""

    def __init__(self, W):
        self.params, self.grads = {"W": W}, {}

    def forward(self, x, training):
        self.x = x
        return x @ self.params["W"]

    def backward(self, dlogits):
        self.grads = {"W": self.x.T @ dlogits}

    def named_params(self):
        yield "W", self, "W"


def _update_gradient_per_sample():
    xs, ys, micro = X_BN.reshape(4, 12), np.array([0, 2, 1, 2]), 2
    W = DY_BN.reshape(12, 4)[:, :3]  # (D, K)
    logits = xs @ W
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # each micro-batch's mean-loss gradient, divided once more by the micro-batch's size
    return (_Linear(W), xs, ys, micro), {"W": xs.T @ (p - np.eye(3)[ys]) / micro / micro}


_STUDENTS = {
    ("06.1", "each micro-batch's gradient divided by its size"): _update_gradient_per_sample,
    ("01.2", "the factor 1/2 of the square root's derivative missing"):
        lambda: ((DY_BN, X_BN, GAMMA, 1e-5), _bn_dx_with_var_term_times(2.0)),
    ("01.2", "a sum where the variance node divides by m"):
        lambda: ((DY_BN, X_BN, GAMMA, 1e-5), _bn_dx_with_var_term_times(X_BN.size / 3)),
    ("01.3", "x_hat times mean(dy) in the variance term"):
        lambda: ((DY_BN, _X_HAT_BN, _RSTD_BN, GAMMA), (
            GAMMA.reshape(1, -1, 1, 1) * _RSTD_BN * (
                DY_BN - (1 + _X_HAT_BN) * DY_BN.mean(axis=_AX, keepdims=True)),
            (DY_BN * _X_HAT_BN).sum(axis=_AX), DY_BN.sum(axis=_AX))),
    ("01.4", "the batch's statistics in the backward"):
        lambda: ((DY_BN, X_BN, GAMMA, np.zeros(3), np.ones(3), 1e-5),
                 _bn_eval_backward_with_batch_statistics()),
    ("02.1", "the unbiased variance"): _gn_forward_unbiased,
    ("02.2", "means over one channel's pixels (IN's backward)"): _gn_backward_with_in_means,
    ("03.2", "the gradients of the entries averaged instead of summed"):
        lambda: _scope_gradient_averaged("ln"),
    ("03.3", "an unweighted sum of S"): _softmax_gradient_unweighted,
    ("03b.1", "the summed loss, not divided at all"): _cross_entropy_gradient_undivided,
    ("03b.2", "a mean over images and pixels where the sum belongs"): _conv1x1_weight_grad_mean,
    ("04.1", "the devices' M2 added without the spread of their means"):
        _chan_merge_without_the_spread,
    ("04b.2", "each device's count n_p, not divided by N"): lambda: (([2, 3, 5],), [2, 3, 5]),
    ("05.1", "V where its unit vector belongs in the projection (a missing 1/N^2)"):
        _wn_backward_with_v,
    ("05b.1", "a division by sigma^2 where sigma belongs"): _ws_backward_over_sigma_squared,
    ("05b.2", "eps under the square root"): lambda: _ws_forward_eps_in_root(1),
    ("06.2", "every micro-batch weighted 1/A"): _accumulate_by_count,
    ("06b.2", "s^2, the factor inverted"): lambda: ((3.0,), 9.0),
}


def _flat(out):
    """A mistake's outputs as a list of arrays (tuples and dicts unpacked, in order)."""
    if isinstance(out, dict):
        return [np.asarray(out[k]) for k in sorted(out)]
    if isinstance(out, tuple):
        return [a for part in out for a in _flat(part)]
    return [np.asarray(out, dtype=np.float64)]


@pytest.mark.parametrize(("exercise_id", "name"), list(_STUDENTS), ids=lambda v: v[:24])
def test_a_mistake_equals_the_students_own_code_for_it(exercise_id, name):
    """The catalogue names a mistake only when the student's answer equals its variant to
    float64 rounding: a variant that computes more or less than its name says misses the
    student who made it."""
    args, want = _STUDENTS[exercise_id, name]()
    got = _mistake(exercise_id, name)(*args)
    got, want = _flat(got), _flat(want)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert lessons.rel_err(a, b) < 1e-12, (exercise_id, name)


def test_the_unweighted_spread_of_the_device_means_counts_every_device_04_1():
    """A student who forgets n_p in M2 = sum [M2_p + n_p (mean_p - mean)^2] adds
    (mean_p - mean)^2 for every device, the empty one (mean 0 by the lesson's convention)
    included: that is the mistake the check must name."""
    counts, means = [12, 0, 4], [X_BN[0, :, 0, 0], np.zeros(3), X_BN[1, :, 0, 0]]
    m2s = [DY_BN[0, :, 0, 0] ** 2, np.zeros(3), DY_BN[1, :, 0, 0] ** 2]
    n, mean, m2 = _mistake("04.1", "the spread of the device means not weighted by their "
                                   "counts")(counts, means, m2s)
    want_mean = (12 * means[0] + 4 * means[2]) / 16
    want_m2 = sum(m2_p + (mean_p - want_mean) ** 2
                  for mean_p, m2_p in zip(means, m2s, strict=True))
    assert n == 16 and lessons.rel_err(mean, want_mean) < 1e-12
    assert lessons.rel_err(m2, want_m2) < 1e-12


# -- the student copy and the command line ------------------------------------------------------


def test_a_solution_cell_may_open_with_a_blank_line():
    assert lessons.exercise_title("\n# Exercise 9.1: a task\ndef f():\n    pass") == (
        "9.1", "a task")


def test_student_notebook_leaves_the_solved_notebook_alone():
    nb = _notebook(_EXERCISE)
    before = json.dumps(nb)
    student, blanked = lessons.student_notebook(nb)
    assert blanked == ["9.1"] and "raise NotImplementedError" in student["cells"][0]["source"]
    assert json.dumps(nb) == before  # the caller's solution is still there


def test_the_lessons_folder_named_by_another_path_is_refused_even_with_force(tmp_path,
                                                                             monkeypatch,
                                                                             capsys):
    src = tmp_path / "src"
    src.mkdir()
    solved = json.dumps(_notebook(_EXERCISE))
    (src / "09_x.ipynb").write_text(solved, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert lessons.main(["--student", "src", "--source", str(src), "--force"]) == 2
    assert "the student copy would overwrite the lessons" in capsys.readouterr().err
    assert (src / "09_x.ipynb").read_text(encoding="utf-8") == solved


def test_student_copies_follow_the_umask(tmp_path):
    umask = os.umask(0o002)
    try:
        lessons.write_student_copies(tmp_path / "copies")
    finally:
        os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "copies").glob("*.ipynb")} == {0o664}


def test_the_command_names_each_copy_it_wrote(tmp_path, capsys):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    (src / "09_x.ipynb").write_text(json.dumps(_notebook(_EXERCISE)), encoding="utf-8")
    assert lessons.main(["--student", str(dest), "--source", str(src)]) == 0
    assert capsys.readouterr().out == f"{dest / '09_x.ipynb'}: 1 exercise(s) blanked (9.1)\n"


def test_python_m_refnorm_lessons_exits_with_the_commands_status(tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("not a folder")
    done = subprocess.run([sys.executable, "-m", "refnorm.lessons", "--student", str(a_file)],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.startswith(f"refnorm lessons: error: {a_file} is a file")


def test_the_lessons_take_from_25_to_70_minutes_as_the_index_says():
    """docs/index.md: "how long it takes (from 25 to 70 minutes of reading and exercises)"."""
    stated = []
    for path in LESSONS:
        found = re.search(r"(?i)\*\*Takes\.?\*\*\.?\s+about\s+(\d+)\s+minutes",
                          _source(_cells(path)[0]))
        assert found, path.name
        stated.append(int(found.group(1)))
    assert (min(stated), max(stated)) == (25, 70), stated
