"""The array namespace refnorm computes in: numpy, CuPy, or any Array API namespace.

Reference code never imports numpy for its arithmetic. It asks its input which namespace it
belongs to (:func:`array_namespace`) and calls only functions of the Array API standard on
that namespace, so the same lines run on numpy arrays, on CuPy arrays and on
``array_api_strict`` arrays (the test suite runs over the last to prove it).

This module is deliberately small; refnorm's runtime dependencies are numpy and numba only.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["array_namespace", "compute_dtype", "to_numpy"]

Array = Any  # an array of whatever namespace the caller uses


def array_namespace(*arrays: Array) -> ModuleType:
    """Return the one array namespace shared by ``arrays`` (``None`` entries are skipped).

    numpy arrays give ``numpy``; CuPy arrays give ``cupy``; any other object that implements
    ``__array_namespace__`` gives what it returns.

    Raises
    ------
    TypeError
        If an argument is not an array, or if the arrays come from different namespaces.
    """
    found: ModuleType | None = None
    for a in arrays:
        if a is None:
            continue
        xp = _namespace_of(a)
        if found is not None and xp is not found:
            raise TypeError(
                "all arrays must come from one array namespace; "
                f"got {found.__name__} and {xp.__name__}"
            )
        found = xp
    if found is None:
        raise TypeError("array_namespace() needs at least one array")
    return found


def _namespace_of(a: Array) -> ModuleType:
    if isinstance(a, np.ndarray):
        return np
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        return importlib.import_module("cupy")
    if hasattr(a, "__array_namespace__"):
        return a.__array_namespace__()
    raise TypeError(f"expected an array (numpy, CuPy or Array API); got {type(a).__name__}")


def compute_dtype(xp: ModuleType, dtype: Any) -> Any:
    """The dtype refnorm computes in for inputs of ``dtype``: float16 computes in float32.

    float16 is not an Array API dtype; namespaces without it (array_api_strict) keep
    ``dtype`` as it is.
    """
    float16 = getattr(xp, "float16", None)
    return xp.float32 if float16 is not None and dtype == float16 else dtype


def to_numpy(a: Array) -> np.ndarray:
    """Copy any supported array to a numpy array on the host (for checks and printing)."""
    if isinstance(a, (np.ndarray, np.generic)):
        return np.asarray(a)
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        return a.get()
    return np.from_dlpack(a)
