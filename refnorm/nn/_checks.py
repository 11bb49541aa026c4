"""Argument checks the layers of :mod:`refnorm.nn` and :mod:`refnorm.weights` share.

They add to :mod:`refnorm.core.checks` what a layer's constructor needs: counts, kernel
pairs, flags and the parameter dtype.

Each check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong
value) with a message naming the argument, what was expected and what came, as the checks
in :mod:`refnorm.core.checks` do.
"""

from __future__ import annotations

import numbers
import operator
from types import ModuleType
from typing import Any, SupportsIndex, TypeGuard

import numpy as np

from refnorm.backend import Array
from refnorm.core.checks import check_float_array


def is_int(value: object) -> TypeGuard[SupportsIndex]:
    """True for a Python or numpy integer, False for ``bool`` (``True`` is not a size)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_pair(name: str, value: Any, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each ``>= minimum``, as a pair ``(along H, along W)``.

    Raises
    ------
    TypeError
        If ``value`` is neither an int nor a pair of ints.
    ValueError
        If an entry is below ``minimum``.
    """
    pair = (value, value) if is_int(value) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(map(is_int, pair))):
        raise TypeError(f"{name} must be an int or a pair of ints; got {value!r}")
    pair = (int(pair[0]), int(pair[1]))
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum} (an int or a pair of ints); got {value!r}")
    return pair


def check_positive_int(name: str, value: object) -> int:
    """Check that ``value`` is an int ``>= 1`` (a channel or feature count); return it."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    count = operator.index(value)
    if count < 1:
        raise ValueError(f"{name} must be >= 1; got {count}")
    return count


def check_bool(name: str, value: object) -> bool:
    """Check that ``value`` is a bool (a numpy ``bool_`` too, as a flag); return it as ``bool``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return bool(value)


def check_rank(name: str, a: Array, *, layout: str) -> ModuleType:
    """Check that ``a`` is a real floating array with one axis per name in ``layout``.

    ``layout`` spells the axes, e.g. ``"(N, C, H, W)"``. Returns the array namespace.
    """
    xp = check_float_array(name, a)
    ndim = len(layout.strip("()").split(","))
    if a.ndim != ndim:
        raise ValueError(
            f"{name} must have layout {layout}, {ndim} dimensions; "
            f"got shape {tuple(a.shape)} ({a.ndim} dimensions)"
        )
    return xp


def check_param_dtype(xp: ModuleType, dtype: Any) -> Any:
    """The dtype of a layer's parameters: float32 by default, else a real floating dtype."""
    dtype = xp.float32 if dtype is None else dtype
    if not xp.isdtype(dtype, "real floating"):
        raise TypeError(f"dtype must be a real floating dtype; got {dtype}")
    return dtype


def check_bias(b: Array | None, num_out: int, *, axis_name: str) -> None:
    """Check an optional bias: ``None`` or a real floating ``(num_out,)`` array.

    ``axis_name`` says which axis of the weights it must match, e.g. ``"C_out"``.
    """
    if b is None:
        return
    check_float_array("b", b)
    if tuple(b.shape) != (num_out,):
        raise ValueError(
            f"b must have shape ({axis_name},) = ({num_out},) to match w's axis 0; "
            f"got shape {tuple(b.shape)}"
        )
