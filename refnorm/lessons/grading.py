"""The lessons' checks: plain asserts with their reasons, and the graders of the exercises.

:func:`expect` and :func:`rel_err` are what every lesson's ordinary cells use: a measured value
printed beside its allowed range and the reason for that range, then asserted.

An exercise is a function the student writes (the *candidate*). Its check cell hands the
candidate to a grader together with a ``run``: what the check does with a candidate (call it
on inputs drawn from refnorm, collect its outputs by name). The grader runs the candidate,
compares its outputs with refnorm's (:func:`check_outputs`), with central finite differences
(:func:`check_gradients`) or exactly, for integers (:func:`check_integers`), and prints one pass
line with the measured error, the tolerance and its reason. On a failure it diagnoses before
it raises ``AssertionError``:

1. each known mistake of the exercise (:class:`Mistake`, catalogued in
   :mod:`refnorm.lessons.exercises`: the exercise's function with one deliberate error, such
   as a missing ``1/m``, the wrong axes, a dropped term, the biased variance where the unbiased
   one belongs, a forgotten ``eps``, a device's own count where the global one belongs) is run
   the same way; when the candidate's outputs equal one mistake's, the message names it and
   says where it goes wrong;
2. otherwise a graded nudge: the exercise's first hint says where to look, a second failure
   gives the relevant equation; a hint never gives the answer.

A blank (``NotImplementedError`` from the student copy) fails with ``exercise <id> is not done
yet`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from refnorm.lessons.spec import _REGISTRY, Exercise, Mistake, register

__all__ = [
    "Exercise",
    "Mistake",
    "attempt",
    "check_gradients",
    "check_integers",
    "check_outputs",
    "diagnose",
    "exercise",
    "expect",
    "register",
    "rel_err",
]

# How close a candidate's outputs must be to a mistake's to be named as that mistake: a
# rounding difference of the same wrong computation (float64 sums in another order stay far
# below 1e-9; float32 ones below 1e-5), never the distance to the right answer.
MATCH_FLOAT64 = 1e-9
MATCH_FLOAT32 = 1e-5


_FAILURES: dict[str, int] = {}  # failed checks per exercise that matched no mistake


def exercise(exercise_id: str) -> Exercise:
    """The registered :class:`Exercise` ``exercise_id`` (the catalogue loads on first use)."""
    if exercise_id not in _REGISTRY:
        from refnorm.lessons import exercises  # noqa: F401  (registers the catalogue)
    try:
        return _REGISTRY[exercise_id]
    except KeyError:
        raise ValueError(f"no exercise {exercise_id!r} is registered; known: "
                         f"{', '.join(sorted(_REGISTRY))}") from None


# -- the lessons' plain checks ---------------------------------------------------------------


def _number(value: Any, fmt: str) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return format(float(value), fmt)


def _shown(*values: Any) -> list[str]:
    """``values`` at the fewest significant digits, at least 2, that keep each within a tenth
    of its distance to the nearest other: ``[0.9999, 1.0001]``, not ``[1, 1]``. Integers and
    flags print as they are; a NaN as ``nan``."""
    reals = [float(v) for v in values if not isinstance(v, (bool, np.bool_))
             and not isinstance(v, (int, np.integer)) and math.isfinite(float(v))]
    floats = [float(v) for v in values if not isinstance(v, (bool, np.bool_))]
    gaps = [abs(a - b) for a in floats for b in floats if a != b and math.isfinite(a - b)]
    close = min(gaps) / 10 if gaps else math.inf
    for digits in range(2, 18):
        if all(abs(float(f"{v:.{digits}g}") - v) <= close for v in reals):
            break
    return [_number(v, f".{digits}g") for v in values]


def expect(name: str, value: Any, lo: Any, hi: Any, reason: str) -> None:
    """Print ``value`` beside its allowed range ``[lo, hi]`` and ``reason``; assert it is inside.

    Integers print as integers (a count is not a relative error); a NaN is outside any range.
    The bounds print with the digits that tell them apart, and a failure shows the value with
    the digits that tell it from the bound it crossed.
    """
    lo_shown, hi_shown = _shown(lo, hi)
    print(f"{name:<46} = {_number(value, '10.3e'):>10}   expected in [{lo_shown}, {hi_shown}]"
          f"   ({reason})")
    if not lo <= value <= hi:
        shown, lo_shown, hi_shown = _shown(value, lo, hi)
        raise AssertionError(f"{name} = {shown} is outside [{lo_shown}, {hi_shown}] ({reason})")


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


def attempt(exercise_id: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the student's ``fn(*args, **kwargs)``; a blank becomes an ``AssertionError``.

    A blanked exercise raises ``NotImplementedError``; the check cell then fails with
    ``exercise <id> is not done yet`` and the task, instead of a bare traceback.
    """
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as exc:
        raise AssertionError(
            f"exercise {exercise_id} is not done yet: fill in the cell marked "
            f"'# Exercise {exercise_id}' ({exc})"
        ) from None


# -- grading an exercise ---------------------------------------------------------------------


class Graded(dict):
    """What a passed check returns: its outputs or measured differences by name, a dict.

    A notebook shows nothing for it: the check has printed its verdict, and a check cell,
    which ends with the check's call, would otherwise print every array of the answer again
    under it (thousands of lines for a lesson's larger answers)."""

    def _ipython_display_(self) -> None:
        """Display nothing (IPython asks this before any other representation)."""


def _named(out: Any) -> dict[str, Any]:
    return dict(out) if isinstance(out, Mapping) else {"output": out}


# What the check's own code raises when it cannot use a candidate's return value: None or a
# tuple of another length where the check unpacks, a list where it indexes an array, ...
_UNUSABLE = (TypeError, ValueError, IndexError, KeyError, AttributeError)


def _label(exercise_id: str, part: str) -> str:
    """How a verdict names what it graded: ``exercise 03.1``, or ``exercise 03.1 (check 1 of
    2)`` for one of the checks of an exercise graded in several, so that the first check's
    "passed" is not read as the exercise's."""
    return f"exercise {exercise_id}" + (f" (check {part})" if part else "")


def _run(exercise_id: str, run: Callable[[Any], Any], candidate: Any,
         part: str = "") -> dict[str, Any]:
    try:
        return _named(run(candidate))
    except NotImplementedError as exc:
        raise AssertionError(
            f"exercise {exercise_id} is not done yet: fill in the cell marked "
            f"'# Exercise {exercise_id}' ({exc})"
        ) from None
    except _UNUSABLE as exc:
        if _raised_within(exc, candidate):
            raise  # the student's own code failed: its traceback shows their line
        raise AssertionError(
            f"{_label(exercise_id, part)} failed: the check could not use what your function "
            f"returned ({type(exc).__name__}: {exc}); return what the exercise's task says, "
            "in its order, as arrays of the shapes it gives"
        ) from None


def _raised_within(exc: BaseException, candidate: Any) -> bool:
    """Whether ``exc`` passed through the candidate's own code (its function, or a function
    defined in the same cell), rather than arising in the check that used its result."""
    code = getattr(candidate, "__code__", None)
    if code is None:
        return True  # not a plain function: nothing to tell the two apart by
    tb = exc.__traceback__
    while tb is not None:
        frame_code = tb.tb_frame.f_code
        if frame_code is code or frame_code.co_filename == code.co_filename != __file__:
            return True
        tb = tb.tb_next
    return False


def _distance(got: Mapping[str, Any], other: Mapping[str, Any]) -> float:
    """How far apart two answers are, in units of the matching tolerance (<= 1: the same)."""
    if set(got) != set(other):
        return math.inf
    worst = 0.0
    for key, value in got.items():
        a, b = np.asarray(value), np.asarray(other[key])
        if a.shape != b.shape:
            return math.inf
        if not (np.issubdtype(a.dtype, np.number) and np.issubdtype(b.dtype, np.number)):
            if not np.array_equal(a, b):
                return math.inf
            continue
        exact = np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)
        if exact:
            if not np.array_equal(a, b):
                return math.inf
            continue
        loose = any(np.issubdtype(x.dtype, np.floating) and np.finfo(x.dtype).bits < 64
                    for x in (a, b))
        err = rel_err(a, b)
        if not math.isfinite(err):
            return math.inf
        worst = max(worst, err / (MATCH_FLOAT32 if loose else MATCH_FLOAT64))
    return worst


def diagnose(exercise_id: str, got: Mapping[str, Any],
             outputs_of: Callable[[Callable[..., Any]], Mapping[str, Any]]) -> str:
    """What to tell a student whose answer ``got`` failed: the known mistake it equals (the
    nearest within the matching tolerance), else the next nudge.

    ``outputs_of(variant)`` computes a mistake's answer the way the check computed ``got``.
    """
    spec = exercise(exercise_id)
    found: list[tuple[float, Mistake]] = []
    for mistake in spec.mistakes:
        try:
            other = outputs_of(mistake.variant)
        except Exception:  # a mistake that cannot even run on these inputs is not this one
            continue
        distance = _distance(got, other)
        if distance <= 1.0:
            found.append((distance, mistake))
    if found:
        mistake = min(found, key=lambda pair: pair[0])[1]
        return f"Your answer is what a known mistake gives: {mistake.name}. {mistake.why}"
    level = min(_FAILURES.get(exercise_id, 0), len(spec.nudges) - 1)
    _FAILURES[exercise_id] = _FAILURES.get(exercise_id, 0) + 1
    more = " (fail again for the next one)" if level + 1 < len(spec.nudges) else ""
    return f"Hint {level + 1} of {len(spec.nudges)}{more}: {spec.nudges[level]}"


def check_outputs(exercise_id: str, run: Callable[[Any], Any], candidate: Any, want: Any, *,
                  tol: float, reason: str, part: str = "") -> dict[str, Any]:
    """Grade ``candidate`` by its outputs ``run(candidate)`` against ``want``, by :func:`rel_err`.

    Parameters
    ----------
    exercise_id : str
    run : callable
        ``run(candidate)`` calls the candidate on the check's inputs and returns its outputs:
        one array, or a dict of them by name.
    candidate : callable
        The student's function (or a mistake, when the tests ask).
    want : array or dict of arrays
        refnorm's answers, with the names of ``run``'s outputs.
    tol : float
        The largest :func:`rel_err` allowed for every output.
    reason : str
        Why ``tol`` is that: the error that can be explained (rounding, usually).
    part : str, optional
        Which of an exercise's checks this is ("1 of 2"), named in the verdict.

    Returns
    -------
    dict of str to array, the candidate's outputs.
    """
    got = _run(exercise_id, run, candidate, part)
    want = _named(want)
    if set(got) != set(want):
        raise AssertionError(f"{_label(exercise_id, part)} failed: the check expected the "
                             "outputs "
                             f"{sorted(want)}; it got {sorted(got)}")
    lines, failures = [], []
    for key, target in want.items():
        a, b = np.asarray(got[key]), np.asarray(target)
        if a.shape != b.shape:
            failures.append(f"{key} has shape {a.shape}, expected {b.shape}")
            continue
        err = rel_err(a, b)
        lines.append(f"rel_err({key}) = {err:.1e}")
        if not err <= tol:  # also catches NaN
            failures.append(f"rel_err({key}) = {err:.1e}, allowed <= {tol:.0e}")
    if failures:
        advice = diagnose(exercise_id, got, lambda v: _named(run(v)))
        raise AssertionError(f"{_label(exercise_id, part)} failed: {'; '.join(failures)} "
                             f"({reason}). {advice}")
    print(f"{_label(exercise_id, part)} passed: {', '.join(lines)}; allowed <= {tol:.0e} "
          f"({reason})")
    return Graded(got)


def check_integers(exercise_id: str, run: Callable[[Any], Any], candidate: Any, want: Any, *,
                   reason: str, at_most: bool = False, part: str = "") -> dict[str, Any]:
    """Grade integer answers exactly: every output of ``run(candidate)`` (an int or a sequence
    of ints, by name) must equal ``want``'s, or with ``at_most`` be no larger (entry by
    entry). Prints and reports integers, not errors; ``part`` as in :func:`check_outputs`."""
    got = _run(exercise_id, run, candidate, part)
    want = _named(want)
    if set(got) != set(want):
        raise AssertionError(f"{_label(exercise_id, part)} failed: the check expected the "
                             "outputs "
                             f"{sorted(want)}; it got {sorted(got)}")
    failures = []
    for key, target in want.items():
        value, target = got[key], _as_ints(target)
        as_ints = _as_ints(value)
        if as_ints is None:
            failures.append(f"{key} must be an integer (or integers); got {value!r}")
        elif np.shape(as_ints) != np.shape(target):  # <= would broadcast one int over many
            shape = np.shape(target)
            wanted = ("one integer" if shape == () else f"{shape[0]} integers"
                      if len(shape) == 1 else f"integers of shape {shape}")
            failures.append(f"{key} = {_show(as_ints)}, expected {wanted}")
        elif at_most and not np.all(np.asarray(as_ints) <= np.asarray(target)):
            failures.append(f"{key} = {_show(as_ints)}, allowed at most {_show(target)}")
        elif not at_most and as_ints != target:
            failures.append(f"{key} = {_show(as_ints)}, expected {_show(target)}")
    if failures:
        advice = diagnose(exercise_id, _int_arrays(got), lambda v: _int_arrays(_named(run(v))))
        raise AssertionError(f"{_label(exercise_id, part)} failed: {'; '.join(failures)} "
                             f"({reason}). {advice}")
    shown = ", ".join(f"{k} = {_show(_as_ints(v))}" + (f" <= {_show(_as_ints(want[k]))}"
                                                       if at_most else "")
                      for k, v in got.items())
    print(f"{_label(exercise_id, part)} passed: {shown} ({reason})")
    return Graded(got)


def _as_ints(value: Any) -> Any:
    """``value`` as an int or a tuple of ints (nested), or None if it is not integral."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]  # a 0-d array: its one number
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if float(value).is_integer() else None
    if isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, str):
        items = [_as_ints(v) for v in value]
        return None if any(i is None for i in items) else tuple(items)
    return None


def _int_arrays(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """Integer outputs as int64 arrays (compared exactly); a non-integral one as an object."""
    arrays = {}
    for key, value in outputs.items():
        ints = _as_ints(value)
        arrays[key] = np.asarray(ints, dtype=np.int64) if ints is not None else np.asarray(
            repr(value))
    return arrays


def _show(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def check_gradients(exercise_id: str, f: Callable[..., Any], vjp: Callable[..., Any],
                    candidate: Any, inputs: Mapping[str, Any], *, tol: float = 1e-6,
                    seed: int = 0, part: str = "") -> dict[str, float]:
    """Grade a student's backward against central finite differences of ``f``, in float64.

    Parameters
    ----------
    exercise_id : str
        The exercise graded, named in its failure messages.
    f : callable
        ``f(**inputs) -> y``, the forward (refnorm's).
    vjp : callable
        ``vjp(candidate, dy, **inputs) -> {name: gradient}``: how the check calls a backward
        (the candidate, or a mistake) to get the gradients of ``sum(f(**inputs) * dy)``.
    candidate : callable
    inputs : dict of str to array
        The point to check at (converted to float64).
    tol : float
        Largest error beyond the finite-difference noise floor, relative to the gradient's
        scale (:func:`refnorm.gradcheck.relative_error`); 1e-6, the gradcheck default: a right
        float64 backward stays below 1e-9, a wrong term gives 1e-2 or more.
    seed : int
        Seeds the random upstream gradient ``dy`` (never all ones).
    part : str, optional
        Which of an exercise's checks this is ("1 of 2"), named in the verdict.

    Prints, for each gradient, the *measured* difference from central differences relative to
    the gradient's scale (about 1e-10 for a right backward: the differences' own noise), the
    noise floor and the tolerance. Returns those measured differences by name.
    """
    from refnorm.backend import to_numpy
    from refnorm.gradcheck import (
        _DY_STREAM,
        DEFAULT_STEP,
        finite_difference_noise,
        numerical_vjp,
        relative_error,
    )

    args = {k: np.array(to_numpy(v), dtype=np.float64) for k, v in inputs.items()}
    y = np.asarray(to_numpy(f(**args)))
    dy = np.random.default_rng([seed, _DY_STREAM]).standard_normal(y.shape)

    def grads_of(backward: Any) -> dict[str, Any]:
        out = vjp(backward, dy, **{k: v.copy() for k, v in args.items()})
        return {k: _host(v, f"d{k}") for k, v in dict(out).items()}

    def _host(value: Any, name: str) -> np.ndarray:
        if value is None:
            raise TypeError(f"{name} is None")
        if hasattr(value, "__dlpack__") and not isinstance(value, np.ndarray):
            return np.asarray(to_numpy(value))  # a CuPy or other Array API array
        return np.asarray(value)  # numpy arrays, numbers, lists

    got = _run(exercise_id, grads_of, candidate, part)
    unknown = sorted(set(got) - set(args))
    if unknown:
        raise AssertionError(f"{_label(exercise_id, part)} failed: gradients for unknown "
                             f"inputs {unknown}")
    noise = finite_difference_noise(y, dy, DEFAULT_STEP)
    lines, failures, measured = [], [], {}
    for name, grad in got.items():
        numeric = numerical_vjp(f, args, dy, name)
        if grad.shape != numeric.shape:
            failures.append(f"d{name} has shape {grad.shape}, {name} has {numeric.shape}")
            continue
        err = relative_error(grad, numeric, noise=noise)
        measured[name] = err.raw_rel_error
        floor = noise / err.scale if err.scale > 0 else math.inf
        lines.append(f"d{name} differs from central differences by {err.raw_rel_error:.1e} of "
                     f"its scale (their noise: up to {floor:.0e})")
        if not err.max_rel_error <= tol:
            failures.append(f"d{name} differs from central differences by "
                            f"{err.raw_rel_error:.1e} of its scale, {err.max_rel_error:.1e} "
                            f"beyond their noise; allowed {tol:.0e}")
    if failures:
        advice = diagnose(exercise_id, got, grads_of)
        raise AssertionError(f"{_label(exercise_id, part)} failed: {'; '.join(failures)}. "
                             f"{advice}")
    print(f"{_label(exercise_id, part)} passed: {'; '.join(lines)}; allowed {tol:.0e} beyond "
          "the noise (float64, random dy)")
    return Graded(measured)
