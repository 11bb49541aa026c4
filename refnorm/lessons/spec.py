"""What a grader knows about an exercise beyond its check cell: its function, its hints and its
known mistakes (:class:`Exercise`, :class:`Mistake`), and the registry the catalogue
(:mod:`refnorm.lessons.exercises`) fills."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Exercise", "Mistake", "register"]


@dataclass(frozen=True)
class Mistake:
    """A known wrong answer to an exercise.

    Attributes
    ----------
    name : str
        What the answer did, in a few words ("the biased variance in the running average").
    why : str
        Where it goes wrong and what to reconsider; never the corrected code.
    variant : callable
        The exercise's function with this one mistake (same signature as the candidate).
    """

    name: str
    why: str
    variant: Callable[..., Any]


@dataclass(frozen=True)
class Exercise:
    """What a grader knows about one exercise beyond its check cell.

    Attributes
    ----------
    id : str
        ``"01.1"``: the lesson's number, a dot, the exercise's number.
    function : str
        The name of the function the solution cell defines (the candidate).
    nudges : tuple of str
        Hints in the order they are given: where to look, then the relevant equation.
    mistakes : tuple of Mistake
    """

    id: str
    function: str
    nudges: tuple[str, ...]
    mistakes: tuple[Mistake, ...] = ()


_REGISTRY: dict[str, Exercise] = {}


def register(spec: Exercise) -> Exercise:
    """Add ``spec`` to the exercises the graders know (replacing one with its id)."""
    if not spec.nudges:
        raise ValueError(f"exercise {spec.id} needs at least one nudge")
    _REGISTRY[spec.id] = spec
    return spec
