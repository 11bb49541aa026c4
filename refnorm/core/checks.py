"""Argument checks for every public function and layer constructor: a clear error, never a
wrong number.

Each check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong
value) with a message naming the argument, what was expected and what came. One kind of
mistake gets one error type everywhere: a non-int count is a ``TypeError``, a count below 1 a
``ValueError``; numpy integers are ints and ``numpy.bool_`` is a bool.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable
from types import ModuleType
from typing import Any, SupportsIndex, TypeGuard

import numpy as np

from refnorm.backend import Array, array_namespace, compute_dtype


def check_float_array(name: str, a: Array) -> ModuleType:
    """Check that ``a`` is a real floating-point array; return its namespace."""
    if isinstance(a, np.matrix):
        raise TypeError(f"{name} must be an array, not a numpy.matrix (whose reductions keep "
                        f"two dimensions): pass numpy.asarray({name})")
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} must be an array, not a numpy masked array: the statistics "
                        f"would count masked values on one path and not on the other; pass "
                        f"{name}.filled(value) or the values you mean")
    try:
        xp = array_namespace(a)
    except TypeError:
        raise TypeError(f"{name} must be an array; got {type(a).__name__}") from None
    if not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(f"{name} must have a real floating-point dtype; got {a.dtype}")
    return xp


def check_ndim(name: str, a: Array, *, min_ndim: int, layout: str) -> None:
    """Check ``a.ndim >= min_ndim``; ``layout`` names the expected axes, e.g. (N, C, *spatial)."""
    if a.ndim < min_ndim:
        raise ValueError(
            f"{name} must have layout {layout}, at least {min_ndim} dimensions; "
            f"got shape {tuple(a.shape)} ({a.ndim} dimensions)"
        )


def check_channel_param(name: str, p: Array, num_channels: int, *,
                        axis: str = "x's channel axis") -> None:
    """Check that a per-channel parameter is a real floating array of shape ``(C,)``;
    ``axis`` names what C counts, in the error."""
    check_float_array(name, p)
    if tuple(p.shape) != (num_channels,):
        raise ValueError(
            f"{name} must have shape (C,) = ({num_channels},) to match {axis}; "
            f"got shape {tuple(p.shape)}"
        )


def check_eps(eps: object, *, xp: ModuleType | None = None, dtype: Any = None) -> None:
    """Check that ``eps`` is a finite real number greater than zero.

    With ``xp`` and ``dtype`` (the compute dtype), also check that ``eps`` neither rounds to
    zero in that dtype (``eps=1e-50`` is 0 in float32, and a zero-variance group would then
    divide by zero as with ``eps=0``) nor overflows it (``eps=1e39`` is inf in float32: every
    output would be ``beta``).
    """
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)):
        raise TypeError(f"eps must be a float; got {type(eps).__name__}"
                        + (" (pass float(eps))" if isinstance(eps, numbers.Real) else ""))
    try:
        value = float(eps)
    except OverflowError:  # an int beyond every float
        raise ValueError("eps must be finite and > 0; got an int beyond every float") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"eps must be finite and > 0; got {eps}")
    if xp is None or dtype is None:
        return
    info = xp.finfo(dtype)
    if float(eps) > float(info.max):
        raise ValueError(f"eps={eps} overflows {dtype_name(dtype)}, the compute dtype; use a "
                         f"smaller eps")
    # Rounded to the nearest (ties to even), eps becomes 0 at half the smallest subnormal or
    # below: decided on the host, without an array on the device at every forward.
    if float(eps) <= float(info.smallest_normal) * float(info.eps) / 2:
        raise ValueError(f"eps={eps} rounds to 0 in {dtype_name(dtype)}, the compute dtype; use "
                         f"a larger eps")


def dtype_name(dtype: Any) -> str:
    """``float32`` for numpy's ``np.float32`` (a class) or ``np.dtype("float32")``, else the
    dtype as its namespace prints it."""
    name = getattr(dtype, "__name__", None)
    return name if isinstance(name, str) else str(dtype)


def check_momentum(momentum: object) -> None:
    """Check ``0 < momentum <= 1`` (PyTorch's convention: the weight of the new batch)."""
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a real number; got {type(momentum).__name__}")
    if not 0 < float(momentum) <= 1:
        raise ValueError(f"momentum must be in (0, 1]; got {momentum}")


def check_count(count: int, *, what: str, shape: tuple[int, ...]) -> None:
    """Check that each statistic is taken over more than one value.

    With one value the deviation is exactly zero, every output equals ``beta`` whatever the
    input, and the gradient with respect to ``x`` is zero: a silent wrong result, so refuse.
    """
    if count < 2:
        raise ValueError(
            f"{what} needs more than 1 value per statistic; x of shape {tuple(shape)} "
            f"gives {count}"
        )


def check_like(name: str, a: Array, shape: tuple[int, ...]) -> None:
    """Check that an upstream gradient is a real floating array of the forward's shape."""
    check_float_array(name, a)
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(a.shape)}")


def check_input(x: Array, *, min_ndim: int) -> ModuleType:
    """Check the input ``x`` of a channel normalizer: a real floating (N, C, *spatial) array.

    ``min_ndim`` is 2 for methods defined on ``(N, C)`` and 3 for those that need a spatial
    axis. Returns the array namespace.
    """
    xp = check_float_array("x", x)
    layout = "(N, C, *spatial)" + (" with a spatial axis" if min_ndim > 2 else "")
    check_ndim("x", x, min_ndim=min_ndim, layout=layout)
    return xp


def prepare_channel_norm(
    x: Array, gamma: Array, beta: Array, *, eps: float, min_ndim: int = 2
) -> tuple[ModuleType, Array, Array, Array]:
    """Check the arguments every channel normalizer takes and cast them to the compute dtype.

    ``min_ndim`` is as in :func:`check_input`.

    Returns
    -------
    xp : the array namespace
    xc : ``x`` in the compute dtype (float16 computes in float32)
    gamma_c, beta_c : the parameters in the compute dtype
    """
    xp = check_input(x, min_ndim=min_ndim)
    check_channel_param("gamma", gamma, x.shape[1])
    check_channel_param("beta", beta, x.shape[1])
    array_namespace(x, gamma, beta)  # one namespace for all three
    dtype = compute_dtype(xp, x.dtype)
    check_eps(eps, xp=xp, dtype=dtype)
    return (
        xp,
        xp.astype(x, dtype, copy=False),
        xp.astype(gamma, dtype, copy=True),  # a copy: caches keep it, the caller may change it
        xp.astype(beta, dtype, copy=False),
    )


# -- the fast variants: check an argument signature once -------------------------------------

#: The argument signatures that passed a fast variant's checks, ``(what, types, shapes, dtypes,
#: hyperparameters)`` tuples, and what the checks returned (a convolution's window). The checks
#: cached this way read nothing else (no value of an array: value checks, such as
#: ``running_var >= 0``, run on every call), so a layer that calls its fast variant with the
#: same configuration step after step is checked on its first call only. Bounded: emptied when
#: full.
CHECKED: dict[tuple, Any] = {}
CHECKED_LIMIT = 1024
_UNCHECKED = object()


def check_once(key: Callable[[], tuple], check: Callable[[], Any]) -> Any:
    """Run ``check()`` (which raises on bad arguments) unless the signature ``key()`` passed
    it before; return what it returned (then, or the first time). A signature that cannot be
    formed or hashed (an argument that is not an array, an unhashable hyperparameter) is
    always checked, so the error is the reference's."""
    try:
        signature = key()
        known = CHECKED.get(signature, _UNCHECKED)  # one lookup: another thread may clear
        if known is not _UNCHECKED:
            return known
    except (AttributeError, TypeError):
        signature = None
    result = check()
    if signature is not None:
        if len(CHECKED) >= CHECKED_LIMIT:
            CHECKED.clear()
        CHECKED[signature] = result
    return result


def typed(value: Any) -> tuple:
    """A hyperparameter as an entry of a :func:`check_once` signature: the value with its
    type and, for a tuple, its entries' types. ``(True, 2)`` and ``(1.0, 2)`` equal ``(1, 2)``
    and hash like it, but only ``(1, 2)`` is a pair of ints."""
    entries = tuple(map(type, value)) if isinstance(value, tuple) else ()
    return (type(value), value, entries)


def check_cache(cache: object, expected: type) -> None:
    """A backward given another operation's cache would compute a wrong gradient: refuse."""
    if type(cache) is not expected:
        article = "an" if expected.__name__[0] in "AEIOU" else "a"
        raise TypeError(
            f"cache must be {article} {expected.__name__}; got {type(cache).__name__}"
        )


# -- layer constructors: counts, pairs, flags, dtypes, bias ---------------------------------


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
    try:
        floating = xp.isdtype(dtype, "real floating")
    except (TypeError, ValueError):  # a string, a Python type, ...: not a dtype of xp
        floating = None
    if floating is None:
        raise TypeError(f"dtype must be a dtype of {xp.__name__}, such as {xp.__name__}.float32; "
                        f"got {dtype!r}")
    if not floating:
        raise TypeError(f"dtype must be a real floating dtype; got {dtype}")
    return dtype


def check_device(xp: ModuleType, device: Any) -> Any:
    """The device a layer creates its arrays on: ``None`` (the namespace's default) or, for
    a namespace whose creation functions take ``device=`` (numpy's ``"cpu"``, an
    ``array_api_strict.Device``, ...), one of its devices, returned as it is.

    CuPy creates every array on the current CUDA device and takes no ``device=``: select
    the GPU with ``with cupy.cuda.Device(i):`` around the constructor instead.
    """
    if device is not None and xp.__name__ == "cupy":
        raise ValueError("device must be None with xp=cupy (CuPy creates arrays on the "
                         "current CUDA device; select it with cupy.cuda.Device(i)); "
                         f"got {device!r}")
    return device


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
