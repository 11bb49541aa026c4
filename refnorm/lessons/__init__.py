"""Graded exercises in the lessons: the checks the lessons call, and the student copy.

- :mod:`refnorm.lessons.grading`: :func:`expect` and :func:`rel_err` for the lessons' plain
  checks, and the graders of the exercises (:func:`check_outputs`, :func:`check_gradients`,
  :func:`check_integers`), which name a known mistake or give a graded hint on a failure;
- :mod:`refnorm.lessons.exercises`: the catalogue of the exercises, their known mistakes
  (deliberately wrong variants of each exercise's function) and their hints, as
  :mod:`refnorm.lessons.spec` records them;
- :mod:`refnorm.lessons.student`: the cell tags, the student copy that blanks the solutions,
  and ``refnorm lessons --student DIR`` (or ``python -m refnorm.lessons --student DIR``).

Importing this package loads numpy and the standard library only; the catalogue, which
imports the rest of refnorm, loads when a grader first needs it.
"""

from __future__ import annotations

from refnorm.lessons.grading import (
    Exercise,
    Mistake,
    attempt,
    check_gradients,
    check_integers,
    check_outputs,
    diagnose,
    exercise,
    expect,
    register,
    rel_err,
)
from refnorm.lessons.student import (
    BEGIN,
    END,
    LESSONS_DIR,
    LessonFormatError,
    StudentWorkError,
    add_parser,
    blank_solution,
    exercise_title,
    main,
    run,
    student_notebook,
    tags,
    write_student_copies,
)

__all__ = [
    "BEGIN",
    "END",
    "LESSONS_DIR",
    "Exercise",
    "LessonFormatError",
    "Mistake",
    "StudentWorkError",
    "add_parser",
    "attempt",
    "blank_solution",
    "check_gradients",
    "check_integers",
    "check_outputs",
    "diagnose",
    "exercise",
    "exercise_title",
    "expect",
    "main",
    "register",
    "rel_err",
    "run",
    "student_notebook",
    "tags",
    "write_student_copies",
]
