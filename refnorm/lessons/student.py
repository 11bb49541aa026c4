"""The student copy: every lesson with its solutions blanked, and ``refnorm lessons``.

Every lesson (``lessons/*.ipynb``) ships with its exercises solved, so that the docs build
executes each lesson with the solutions filled in and every check passing. Cell tags (Jupyter
cell metadata ``"tags"``) mark the pieces:

``solution``
    A code cell holding an exercise. Its first line names it, ``# Exercise 01.1: <task>``
    (a long task goes on in comment lines indented past the ``#``, ``#   <more task>``);
    the answer sits between a ``# BEGIN SOLUTION`` and an ``# END SOLUTION`` line (usually the
    body of a function the exercise asks for). :func:`blank_solution` replaces those lines,
    markers included, by ``raise NotImplementedError("exercise 01.1: <task>")`` at the
    indentation of the ``BEGIN`` line.
``check``
    A cell that grades exercises (:mod:`refnorm.lessons.grading`). In a student copy it fails
    until its exercises are filled in, and it is the only kind of cell that may: every other
    cell runs whether or not the exercises are done.
``parameters``
    The cell that sets ``SEED = 0``; every random draw of the lesson derives from it, and
    ``tests/test_lessons.py`` reruns the lessons' checks with other seeds by replacing it.
``slow``
    A training run whose asserts were measured over several seeds: the docs build runs it,
    the reruns with other seeds do not.

``refnorm lessons --student DIR`` (or ``python -m refnorm.lessons --student DIR``) writes
the student copies: every lesson with its solution blocks blanked and its outputs cleared. It
never overwrites a notebook that differs from the blank it would write (the student's work)
unless asked with ``--force``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from refnorm.argtypes import OneLineParser, folder_path

# The solved lessons: package data (refnorm/lessons/notebooks, in a checkout a link to the
# repository's lessons/), so that an installed wheel has them too.
LESSONS_DIR = (Path(__file__).parent / "notebooks").resolve()
BEGIN = "# BEGIN SOLUTION"
END = "# END SOLUTION"
_TITLE = re.compile(r"^#\s*Exercise\s+(\S+?):\s*(.+)$")
_TITLE_GOES_ON = re.compile(r"^#\s{2,}(\S.*)$")  # "#   more of the task", right after the title


class LessonFormatError(ValueError):
    """A ``solution`` cell without its title line or with unbalanced markers."""


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
    message = json.dumps(f"exercise {exercise}: {task}", ensure_ascii=False)
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


class StudentWorkError(ValueError):
    """A student copy would overwrite a notebook that differs from the blank it writes."""


def _dumps(nb: Mapping[str, Any]) -> str:
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def _read_lesson(path: Path) -> tuple[str, list[str]]:
    """The student copy of the lesson in ``path`` (as the text to write) and its blanks.

    Raises
    ------
    LessonFormatError
        Naming ``path``, if it is not notebook JSON (an object whose ``"cells"`` is a list of
        objects) or a solution cell in it is malformed.
    """
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LessonFormatError(f"{path} is not a notebook: it is not JSON ({exc})") from None
    cells = nb.get("cells") if isinstance(nb, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        raise LessonFormatError(f"{path} is not a notebook: expected a JSON object whose "
                                f"'cells' is a list of objects; got {_kind(nb)}")
    try:
        student, blanked = student_notebook(nb)
    except LessonFormatError as exc:
        raise LessonFormatError(f"{path}: {exc}") from None
    except (TypeError, AttributeError, KeyError) as exc:  # a cell's fields of other types
        raise LessonFormatError(f"{path} is not a notebook: a cell does not have nbformat 4's "
                                f"fields ({type(exc).__name__}: {exc})") from None
    return _dumps(student), blanked


def _kind(nb: Any) -> str:
    if not isinstance(nb, dict):
        return f"a JSON {type(nb).__name__}"
    if "cells" not in nb:
        return "an object without 'cells'"
    return f"'cells' of type {type(nb['cells']).__name__}" if not isinstance(
        nb["cells"], list) else "a cell that is not an object"


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, so that a
    failed write (a full disk) leaves the old file or none, never a truncated notebook."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would create it (mkstemp's is 0600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_student_copies(dest: Path, src: Path = LESSONS_DIR, *,
                         force: bool = False) -> dict[str, list[str]]:
    """Write the student copy of every ``src/*.ipynb`` into ``dest``; return the blanks per file.

    A notebook already in ``dest`` is left alone if it is the blank this would write; one that
    differs (a student's edits) makes the call refuse, before anything is written, with
    :class:`StudentWorkError` naming it, unless ``force`` is true.

    Raises
    ------
    FileNotFoundError
        If ``src`` holds no lesson.
    LessonFormatError
        Naming the file, if a lesson in ``src`` is not a notebook or has a malformed solution
        cell.
    NotADirectoryError
        If ``dest`` (or a folder above it) is a file.
    IsADirectoryError
        If a folder stands where a copy goes (whatever ``force``), before any is written.
    ValueError
        If ``dest`` is ``src``.
    StudentWorkError
        If a notebook in ``dest`` differs from its blank and ``force`` is false.
    """
    src, dest = Path(src), Path(dest)
    notebooks = sorted(src.glob("*.ipynb"))
    if not notebooks:
        raise FileNotFoundError(f"no lessons (*.ipynb) in {src}")
    for folder in (dest, *dest.parents):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{folder} is a file; --student needs a folder to write "
                                     "the copies into")
    if dest.resolve() == src.resolve():
        raise ValueError(f"the student copy would overwrite the lessons in {src}; pick another DIR")
    copies: dict[str, tuple[str, list[str]]] = {}
    for path in notebooks:
        copies[path.name] = _read_lesson(path)
        target = dest / path.name
        if target.is_dir():  # refused before anything is written, --force or not
            raise IsADirectoryError(f"{target} is a folder, where the student copy of "
                                    f"{path.name} goes: remove or rename it")
        if not force and target.exists() and _differs(target, copies[path.name][0]):
            raise StudentWorkError(f"{target} differs from the blank student copy (your work?): "
                                   "it is kept; pass --force to overwrite it")
    dest.mkdir(parents=True, exist_ok=True)
    for name, (text, _) in copies.items():
        _write_atomically(dest / name, text)
    return {name: blanked for name, (_, blanked) in copies.items()}


def _differs(path: Path, text: str) -> bool:
    """Whether the file ``path`` holds anything but ``text`` (a file that is not even UTF-8
    does)."""
    try:
        return path.read_text(encoding="utf-8") != text
    except UnicodeDecodeError:
        return True


# -- command line --------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``lessons`` sub-command to ``subparsers``; return its parser."""
    p = subparsers.add_parser(
        "lessons", help="write the lessons with their exercises blanked",
        description=("Write a student copy of every lesson: each exercise's solution replaced "
                     "by 'raise NotImplementedError(...)', outputs cleared. The check cell "
                     "after each exercise fails until it is filled in. A notebook in DIR that "
                     "differs from its blank (your work) is never overwritten without "
                     "--force."))
    p.add_argument("--student", metavar="DIR", type=_folder, required=True,
                   help="folder to write the student copies into (created if missing)")
    p.add_argument("--source", metavar="DIR", type=Path, default=LESSONS_DIR,
                   help=f"folder of the solved lessons (default: {LESSONS_DIR})")
    p.add_argument("--force", action="store_true",
                   help="overwrite notebooks in DIR that differ from their blank (edited ones)")
    return p


def _folder(text: str) -> Path:
    """An argparse type: a non-empty folder path, as ``refnorm train --out`` takes it."""
    return Path(folder_path(text))


def run(args: argparse.Namespace) -> int:
    """Run ``lessons`` for parsed ``args``; return the exit status."""
    try:
        written = write_student_copies(args.student, args.source, force=args.force)
    except (OSError, ValueError) as exc:
        print(f"refnorm lessons: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    for name, blanked in written.items():
        print(f"{args.student / name}: {len(blanked)} exercise(s) blanked "
              f"({', '.join(blanked) or 'none'})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``refnorm lessons`` as a program of its own (``python -m refnorm.lessons``)."""
    parser = OneLineParser(prog="refnorm")  # one-line errors, as refnorm lessons'
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "lessons":
        argv = ["lessons", *argv]
    return run(parser.parse_args(argv))
