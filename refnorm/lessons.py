"""Graded exercises in the lessons, and the student copy that blanks them.

Every lesson (``lessons/*.ipynb``) ships with its exercises solved, so that the docs build
executes each lesson with the solutions filled in and every check passing. Three cell tags
(Jupyter cell metadata ``"tags"``) mark the pieces:

``solution``
    A code cell holding an exercise. Its first line names it, ``# Exercise 01.1: <task>``
    (a long task goes on in comment lines indented past the ``#``, ``#   <more task>``);
    the answer sits between a ``# BEGIN SOLUTION`` and an ``# END SOLUTION`` line (usually the
    body of a function the exercise asks for). :func:`blank_solution` replaces those lines,
    markers included, by ``raise NotImplementedError("exercise 01.1: <task>")`` at the
    indentation of the ``BEGIN`` line.
``check``
    The cell that grades an exercise, with :func:`attempt` (a blank becomes an
    ``AssertionError`` naming the exercise) and :func:`check_close` or :func:`check_grad`,
    which print one pass line or raise ``AssertionError`` with the measured error, the
    allowed range, its reason and a hint.
``parameters``
    The cell that sets ``SEED = 0``; every random draw of the lesson derives from it, and
    ``tests/test_lessons.py`` reruns the lessons' checks with other seeds by replacing it.

``refnorm lessons --student DIR`` (or ``python -m refnorm.lessons --student DIR``) writes
the student copies: every lesson with its solution blocks blanked and its outputs cleared.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LESSONS_DIR = Path(__file__).resolve().parent.parent / "lessons"
BEGIN = "# BEGIN SOLUTION"
END = "# END SOLUTION"
_TITLE = re.compile(r"^#\s*Exercise\s+(\S+?):\s*(.+)$")
_TITLE_GOES_ON = re.compile(r"^#\s{2,}(\S.*)$")  # "#   more of the task", right after the title


class LessonFormatError(ValueError):
    """A ``solution`` cell without its title line or with unbalanced markers."""


# -- grading helpers, called from the lessons' check cells ----------------------------------------


def attempt(exercise: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the student's ``fn(*args, **kwargs)``; a blank becomes an ``AssertionError``.

    A blanked exercise raises ``NotImplementedError``; the check cell then fails with
    ``exercise <id> is not done yet`` and the task, instead of a bare traceback.
    """
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as exc:
        raise AssertionError(
            f"exercise {exercise} is not done yet: fill in the cell marked "
            f"'# Exercise {exercise}' ({exc})"
        ) from None


def rel_err(a: Any, b: Any) -> float:
    """``max|a - b| / max(max|a|, max|b|)`` in float64: the lessons' norm-relative error.

    Not entry by entry: a normalizer's gradients have entries that are zero up to rounding.
    Two all-zero arrays are 0 apart.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    scale = float(max(np.max(np.abs(a)), np.max(np.abs(b)))) if a.size else 0.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    return diff / scale if scale > 0 else diff


def _report(exercise: str, what: str, value: float, tol: float, reason: str, hint: str) -> None:
    line = f"{what} = {value:.2e}, allowed <= {tol:.0e} ({reason})"
    if not value <= tol:  # also catches NaN
        raise AssertionError(f"exercise {exercise} failed: {line}. Hint: {hint}")
    print(f"exercise {exercise} passed: {line}")


def check_close(exercise: str, what: str, got: Any, want: Any, *, tol: float, reason: str,
                hint: str = "compare your formula with the lesson's derivation") -> float:
    """Grade ``got`` against ``want`` (usually refnorm's result) by :func:`rel_err`.

    Prints ``exercise <id> passed: ...`` with the measured error, the tolerance and its
    reason; raises ``AssertionError`` with the same numbers and ``hint`` otherwise (also for
    a shape mismatch or a non-finite result). Returns the error.
    """
    got = np.asarray(got)
    want = np.asarray(want)
    if got.shape != want.shape:
        raise AssertionError(
            f"exercise {exercise} failed: {what}: shape {got.shape}, expected {want.shape}. "
            f"Hint: {hint}"
        )
    err = rel_err(got, want)
    _report(exercise, f"rel_err({what})", err, tol, reason, hint)
    return err


def check_grad(exercise: str, f: Callable[..., Any], vjp: Callable[..., Mapping[str, Any]],
               inputs: Mapping[str, Any], *, tol: float = 1e-6, seed: int = 0,
               hint: str = "differentiate the forward again, term by term") -> dict[str, float]:
    """Grade a student's backward ``vjp`` against finite differences of ``f``.

    Runs :func:`refnorm.gradcheck.check_vjp` (float64, central differences, a random upstream
    gradient, the error measured beyond the finite-difference noise floor) and grades every
    gradient ``vjp`` returns; ``tol`` 1e-6 is the gradcheck default (a correct float64
    backward stays below 1e-9 here, a wrong term gives an error of order 1e-2 or more).
    """
    from refnorm.gradcheck import check_vjp

    errors = check_vjp(f, lambda dy, **kw: attempt(exercise, vjp, dy, **kw), inputs, seed=seed)
    for name, err in errors.items():
        _report(exercise, f"finite-difference error of d{name}", err.max_rel_error, tol,
                "float64 central differences beyond their noise floor", hint)
    return {name: err.max_rel_error for name, err in errors.items()}


# -- the student copy ----------------------------------------------------------------------------


def _source(cell: Mapping[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def tags(cell: Mapping[str, Any]) -> list[str]:
    """The cell's tags (``metadata.tags``), or an empty list."""
    return list(cell.get("metadata", {}).get("tags", []))


def exercise_title(source: str) -> tuple[str, str]:
    """``(id, task)`` from a solution cell's first line ``# Exercise <id>: <task>``.

    Comment lines right after it that are indented past the ``#`` (``#   <more task>``)
    continue the task, joined with single spaces: a long task is wrapped to the lessons'
    line length without changing it.
    """
    lines = source.lstrip("\n").split("\n")
    first = lines[0].strip()
    match = _TITLE.match(first)
    if not match:
        raise LessonFormatError(
            f"a solution cell must start with '# Exercise <id>: <task>'; it starts with {first!r}"
        )
    task = [match.group(2).strip()]
    for line in lines[1:]:
        more = _TITLE_GOES_ON.match(line.rstrip())
        if more is None:
            break
        task.append(more.group(1).strip())
    return match.group(1), " ".join(task)


def blank_solution(source: str) -> str:
    """Replace every ``# BEGIN SOLUTION`` ... ``# END SOLUTION`` block by a ``raise``.

    The ``raise NotImplementedError("exercise <id>: <task>")`` keeps the ``BEGIN`` line's
    indentation, so a function whose body was the solution stays a valid function.
    """
    exercise, task = exercise_title(source)
    message = json.dumps(f"exercise {exercise}: {task}")
    out: list[str] = []
    inside = False
    blocks = 0
    for line in source.split("\n"):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise LessonFormatError(f"exercise {exercise}: nested '{BEGIN}'")
            inside = True
            blocks += 1
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}raise NotImplementedError({message})")
        elif stripped == END:
            if not inside:
                raise LessonFormatError(f"exercise {exercise}: '{END}' without '{BEGIN}'")
            inside = False
        elif not inside:
            out.append(line)
    if inside or blocks == 0:
        raise LessonFormatError(
            f"exercise {exercise}: needs balanced '{BEGIN}' / '{END}' lines (found {blocks} "
            f"block(s){', one unclosed' if inside else ''})"
        )
    return "\n".join(out)


def student_notebook(nb: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A copy of notebook ``nb`` (nbformat 4 JSON) with its solutions blanked and outputs cleared.

    Returns the copy and the exercise ids blanked, in order.
    """
    out = copy.deepcopy(dict(nb))
    blanked: list[str] = []
    for cell in out["cells"]:
        if cell.get("cell_type") != "code":
            continue
        cell["outputs"] = []
        cell["execution_count"] = None
        if "solution" in tags(cell):
            source = _source(cell)
            cell["source"] = blank_solution(source)
            blanked.append(exercise_title(source)[0])
    return out, blanked


def write_student_copies(dest: Path, src: Path = LESSONS_DIR) -> dict[str, list[str]]:
    """Write the student copy of every ``src/*.ipynb`` into ``dest``; return the blanks per file."""
    src, dest = Path(src), Path(dest)
    notebooks = sorted(src.glob("*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no lessons (*.ipynb) in {src}")
    if dest.resolve() == src.resolve():
        raise ValueError(f"the student copy would overwrite the lessons in {src}; pick another DIR")
    dest.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[str]] = {}
    for path in notebooks:
        nb = json.loads(path.read_text(encoding="utf-8"))
        student, blanked = student_notebook(nb)
        (dest / path.name).write_text(json.dumps(student, indent=1, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
        written[path.name] = blanked
    return written


# -- command line --------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``lessons`` sub-command to ``subparsers``; return its parser."""
    p = subparsers.add_parser(
        "lessons", help="write the lessons with their exercises blanked",
        description=("Write a student copy of every lesson: each exercise's solution replaced "
                     "by 'raise NotImplementedError(...)', outputs cleared. The check cell "
                     "after each exercise fails until it is filled in."))
    p.add_argument("--student", metavar="DIR", type=Path, required=True,
                   help="folder to write the student copies into (created if missing)")
    p.add_argument("--source", metavar="DIR", type=Path, default=LESSONS_DIR,
                   help=f"folder of the solved lessons (default: {LESSONS_DIR})")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``lessons`` for parsed ``args``; return the exit status."""
    try:
        written = write_student_copies(args.student, args.source)
    except (OSError, ValueError) as exc:
        print(f"refnorm lessons: error: {exc}", file=sys.stderr)
        return 2
    for name, blanked in written.items():
        print(f"{args.student / name}: {len(blanked)} exercise(s) blanked "
              f"({', '.join(blanked) or 'none'})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``refnorm lessons`` as a program of its own (``python -m refnorm.lessons``)."""
    parser = argparse.ArgumentParser(prog="refnorm")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "lessons":
        argv = ["lessons", *argv]
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
