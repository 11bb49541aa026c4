"""Which implementation computes a call: the reference, or the fused numba kernels.

The pure functions of :mod:`refnorm.norms` and :mod:`refnorm.nn` are the reference: readable,
written with Array API calls only, running on any namespace. :mod:`refnorm.kernels` holds
fused numba loops for numpy arrays on the CPU, behind the same functions and tested equal to
them. A call picks one by, in this order:

1. its ``path=`` argument, ``"reference"`` or ``"fast"``;
2. the process-wide choice, :func:`set_path` (or :func:`use_path` for a ``with`` block),
   else the environment variable ``REFNORM_PATH``;
3. the caller's default: ``"reference"`` for the pure functions (what the lessons, the
   errata and :mod:`refnorm.gradcheck` call), ``"fast"`` for layers (what the trainer and
   the study use).

``"fast"`` runs the kernels only where they apply (:func:`fast_applies`): numpy arrays of a
real floating dtype, with numba importable. Any other namespace (CuPy, ``array_api_strict``)
falls back to the reference; ``refnorm bench`` reports which path ran.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

PATHS = ("reference", "fast")
ENV = "REFNORM_PATH"

_chosen: str | None = None


def check_path(path: object, *, name: str = "path") -> str:
    """Return ``path`` if it is one of :data:`PATHS`, else raise ``ValueError``."""
    if path not in PATHS:
        raise ValueError(f"{name} must be 'reference' or 'fast'; got {path!r}")
    return str(path)


def set_path(path: str | None) -> None:
    """Choose the path for every call that does not name one; ``None`` restores the defaults."""
    global _chosen
    _chosen = None if path is None else check_path(path)


@contextlib.contextmanager
def use_path(path: str | None) -> Iterator[None]:
    """``with use_path("reference"): ...`` — :func:`set_path` for the block only."""
    global _chosen
    previous = _chosen
    set_path(path)
    try:
        yield
    finally:
        _chosen = previous


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
    return get_path(default) if path is None else check_path(path)


_NUMBA = importlib.util.find_spec("numba") is not None


def fast_applies(*arrays: Any) -> bool:
    """Whether the kernels can run on ``arrays``: numpy, real floating, numba installed."""
    return _NUMBA and all(
        isinstance(a, np.ndarray) and a.dtype in (np.float16, np.float32, np.float64)
        for a in arrays
    )


def fast_norms() -> ModuleType:
    """:mod:`refnorm.kernels.norms`, imported on first use (importing numba takes a moment)."""
    return importlib.import_module("refnorm.kernels.norms")


def fast_nn() -> ModuleType:
    """:mod:`refnorm.kernels.nn`, imported on first use."""
    return importlib.import_module("refnorm.kernels.nn")


def runs_fast(path: str | None, *arrays: Any, default: str = "reference") -> bool:
    """True if a call with ``path`` on ``arrays`` runs the kernels (see the module docstring)."""
    return resolve(path, default=default) == "fast" and fast_applies(*arrays)


__all__ = ["ENV", "PATHS", "fast_applies", "fast_nn", "fast_norms", "get_path",
           "process_choice", "resolve", "runs_fast", "set_path", "use_path"]
