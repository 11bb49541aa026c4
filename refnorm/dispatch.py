"""Which implementation computes a call: the reference, or the fused numba kernels.

The public pure functions of :mod:`refnorm.norms` and :mod:`refnorm.nn` are the reference:
readable, written with Array API calls only, running on any namespace. Some also have a fast
variant that calls the numba loops of :mod:`refnorm.kernels` on numpy arrays, tested equal to
the reference. The two are joined here, outside both bodies:

.. code-block:: python

    @dispatched                       # the reference: the math alone
    def batch_norm_forward(x, gamma, beta, *, eps=1e-5): ...

    @batch_norm_forward.fast          # the same checks, then the kernel, named by import
    def _batch_norm_forward_fast(x, gamma, beta, *, eps=1e-5):
        ... kernels.bn_forward(...) ...

The decorated function takes one more keyword, ``path``, and runs its fast variant when

1. the path is ``"fast"``: its ``path=`` argument, else the process-wide choice
   (:func:`set_path`, :func:`use_path` for a ``with`` block, else the environment variable
   ``REFNORM_PATH``), else ``"reference"`` — the default for pure functions and layers alike,
   so that a reader who steps into a layer lands in numpy; the trainer, the study and the
   bench ask for ``"fast"``;
2. and the kernels apply to its first argument (``x``, or ``dy`` for a backward):
   :func:`fast_applies`, a numpy array of a real floating dtype in native byte order, with
   numba installed. Any other namespace (CuPy, ``array_api_strict``), and a byte-swapped
   array, runs the reference; ``refnorm bench`` reports which path ran.

A fast variant makes the same argument checks as its reference before its kernel runs, so
both paths accept and refuse the same inputs with the same errors (``tests/test_dispatch.py``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar, cast

import numpy as np

from refnorm import kernels

PATHS = ("reference", "fast")
ENV = "REFNORM_PATH"

_chosen: str | None = None
_recorders: list[list[tuple[str, str]]] = []  # open record_paths() blocks, innermost last


def check_path(path: object, *, name: str = "path") -> str:
    """Return ``path`` if it is one of :data:`PATHS`, else raise ``ValueError``."""
    if path not in PATHS:
        raise ValueError(f"{name} must be 'reference' or 'fast'; got {path!r}")
    return str(path)


def set_path(path: str | None) -> None:
    """Choose the path for every call that does not name one; ``None`` restores the default."""
    global _chosen
    _chosen = None if path is None else check_path(path)


@contextlib.contextmanager
def use_path(path: str | None) -> Iterator[None]:
    """``with use_path("fast"): ...`` — :func:`set_path` for the block only."""
    global _chosen
    previous = _chosen
    set_path(path)
    try:
        yield
    finally:
        _chosen = previous


@contextlib.contextmanager
def record_paths() -> Iterator[list[tuple[str, str]]]:
    """``with record_paths() as calls: ...`` — ``calls`` receives ``(function name, path)``
    for every call of a dispatched function in the block, in order (``refnorm bench`` reports
    which layers of a training step ran which path)."""
    calls: list[tuple[str, str]] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


def process_choice() -> str | None:
    """The process-wide choice (:func:`set_path`, else ``REFNORM_PATH``), or None if none."""
    if _chosen is not None:
        return _chosen
    env = os.environ.get(ENV)
    return check_path(env, name=f"the environment variable {ENV}") if env else None


def get_path(default: str = "reference") -> str:
    """The process-wide path: :func:`set_path`'s, else ``REFNORM_PATH``'s, else ``default``."""
    choice = process_choice()
    return check_path(default) if choice is None else choice


def resolve(path: str | None, *, default: str = "reference") -> str:
    """The path one call takes: its own ``path`` if given, else :func:`get_path`."""
    if path is None:
        return get_path(default)
    return path if path in PATHS else check_path(path)


_FLOAT_CODES = frozenset("efd")  # numpy's type codes of float16, float32, float64


def fast_applies(*arrays: Any) -> bool:
    """Whether the kernels can run on ``arrays``: numpy, real floating, native byte order,
    numba installed."""
    return all(isinstance(a, np.ndarray) and a.dtype.char in _FLOAT_CODES and a.dtype.isnative
               for a in arrays) and kernels.numba_installed()


def runs_fast(path: str | None, *arrays: Any, default: str = "reference") -> bool:
    """True if a call with ``path`` on ``arrays`` runs the kernels (see the module docstring)."""
    return resolve(path, default=default) == "fast" and fast_applies(*arrays)


F = TypeVar("F", bound=Callable[..., Any])


class Dispatched(Protocol):
    """A reference function with a fast variant (what :func:`dispatched` returns)."""

    reference: Callable[..., Any]
    fast_variant: Callable[..., Any] | None

    def __call__(self, *args: Any, path: str | None = None, **kwargs: Any) -> Any: ...

    def fast(self, variant: F) -> F: ...


def dispatched(reference: Callable[..., Any]) -> Dispatched:
    """Decorate a reference function: it gains the keyword ``path`` and runs the variant that
    ``@function.fast`` registers when :func:`runs_fast` says so on its first argument.

    The returned function keeps the reference's name, docstring and signature (plus ``path``)
    and holds both implementations: ``.reference`` and ``.fast_variant``.
    """
    signature = inspect.signature(reference)
    first = next(iter(signature.parameters))  # x, or dy for a backward

    name = reference.__name__

    @functools.wraps(reference)
    def call(*args: Any, path: str | None = None, **kwargs: Any) -> Any:
        this = cast(Dispatched, call)
        array = args[0] if args else kwargs.get(first)
        if this.fast_variant is not None and runs_fast(path, array):
            if _recorders:
                _recorders[-1].append((name, "fast"))
            return this.fast_variant(*args, **kwargs)
        resolve(path)  # a bad path is refused on every call, whichever runs
        if _recorders:
            _recorders[-1].append((name, "reference"))
        return this.reference(*args, **kwargs)

    def fast(variant: F) -> F:
        call.fast_variant = variant  # type: ignore[attr-defined]
        return variant

    path = inspect.Parameter("path", inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation="str | None")
    call.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*signature.parameters.values(), path])
    call.reference = reference  # type: ignore[attr-defined]
    call.fast_variant = None  # type: ignore[attr-defined]
    call.fast = fast  # type: ignore[attr-defined]
    return cast(Dispatched, call)


__all__ = ["ENV", "PATHS", "Dispatched", "check_path", "dispatched", "fast_applies", "get_path",
           "process_choice", "record_paths", "resolve", "runs_fast", "set_path", "use_path"]
