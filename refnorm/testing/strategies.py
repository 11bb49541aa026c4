"""Hypothesis strategies for the inputs of every refnorm method.

:func:`norm_inputs` draws a :class:`Case`: an input, the method's parameters, an upstream
gradient, ``eps`` and (GN) the group count, with the array values drawn through
``hypothesis.extra.numpy`` (bounded, finite), so that a failure shrinks to a small array a
person can read. Each case is of one *kind*:

- ``"plain"``: values in [-10, 10];
- ``"offset"``: values within 1 of a large offset (100, -1000 or 10000): a one-pass
  variance ``E[x^2] - E[x]^2`` loses every digit here in float32;
- ``"tiny_variance"``: spread about ``0.1 * sqrt(eps)`` around a centre, so the variance is
  below ``eps`` and where ``eps`` goes decides the output;
- for WS and WN, ``"tiny_variance"`` is a filter whose standard deviation (WS) or norm (WN)
  is about ``eps``; hypothesis also shrinks towards constant (WS) and zero (WN) filters.

Shapes include N = 1 where the method allows it (IN, LN, GN, SN; BN then needs more than
one spatial position) and the smallest statistic of two values. A statistic of a single
value is refused by refnorm for every method but WN (a one-weight filter), and is drawn
there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refnorm.core.checks import check_eps, is_int
from refnorm.testing.reference import ACTIVATION_METHODS, PARAM_NAMES, check_method

KINDS = ("plain", "offset", "tiny_variance")
EPS_CHOICES = (1e-5, 1e-3, 0.1)


@dataclass(frozen=True, eq=False)
class Case:
    """One drawn input of a method.

    Attributes
    ----------
    method : str
    kind : str, one of :data:`KINDS`
    x : array
        The input (``w`` for WS, ``v`` for WN), in the dtype under test.
    params : tuple of arrays
        In the order of :data:`refnorm.testing.reference.PARAM_NAMES`, dtype under test.
    dy : array, ``x.shape``
        The upstream gradient (never constant).
    eps : float
    num_groups : int or None
        G for GN.
    """

    method: str
    kind: str
    x: np.ndarray
    params: tuple[np.ndarray, ...]
    dy: np.ndarray
    eps: float
    num_groups: int | None = None

    def __repr__(self) -> str:
        with np.printoptions(precision=17, threshold=10_000, linewidth=100):
            lines = [f"Case(method={self.method!r}, kind={self.kind!r}, eps={self.eps!r}"
                     + (f", num_groups={self.num_groups}" if self.num_groups else "") + ",",
                     f"  x={self.x!r},"]
            for name, p in zip(PARAM_NAMES[self.method], self.params, strict=True):
                lines.append(f"  {name}={p!r},")
            lines.append(f"  dy={self.dy!r})")
        return "\n".join(lines)


def check_kinds(kinds: object) -> tuple[str, ...]:
    """Check that ``kinds`` is a non-empty tuple (or list) of names from :data:`KINDS`."""
    if not (isinstance(kinds, (tuple, list)) and kinds and all(k in KINDS for k in kinds)):
        raise ValueError(f"kinds must be a non-empty tuple of names from {KINDS}; got {kinds!r}")
    return tuple(kinds)


def _values(shape: tuple[int, ...], bound: float) -> st.SearchStrategy[np.ndarray]:
    """float64 arrays of ``shape`` with finite values in [-bound, bound]."""
    return hnp.arrays(np.float64, shape,
                      elements=st.floats(-bound, bound, allow_nan=False, allow_infinity=False,
                                               allow_subnormal=False))


def _divisors(C: int) -> list[int]:
    return [g for g in range(1, C + 1) if C % g == 0]


def _statistic_size(method: str, shape: tuple[int, ...], G: int | None) -> int:
    """Values per statistic (the smallest over the scopes for SN)."""
    N, C, S = shape[0], shape[1], math.prod(shape[2:])
    sizes = {"bn": N * S, "in": S, "ln": C * S, "gn": (C // (G or 1)) * S,
             "sn": min(S, N * S, C * S), "ws": math.prod(shape[1:]),
             "wn": math.prod(shape[1:])}
    return sizes[method]


@st.composite
def _shapes(draw: Any, method: str, num_channels: int | None, num_groups: int | None,
            spatial: int | None, input_shape: tuple[int, ...] | None) -> tuple:
    """(shape, G) for ``method``; every statistic covers at least two values (WN: one)."""
    if method in ("ws", "wn") and input_shape is not None:
        return tuple(input_shape), None
    if method in ("ws", "wn"):
        out = num_channels or draw(st.integers(1, 4))
        fan = draw(st.sampled_from([(draw(st.integers(1, 6)),),
                                    (draw(st.integers(1, 2)), 2, 2)]))
        shape = (out, *fan)
        if method == "ws" and math.prod(fan) < 2:
            shape = (out, 2)
        return shape, None
    if input_shape is not None:
        N = draw(st.integers(1, 3))
        shape = (N, *input_shape)
        return shape, None
    need_spatial = method in ("in", "sn")
    k = spatial if spatial is not None else draw(st.integers(1 if need_spatial else 0, 2))
    G = num_groups
    if num_channels is not None:
        C = num_channels
    elif method == "gn" and G is not None:
        C = G * draw(st.integers(1, 3))
    else:
        C = draw(st.integers(1, 6))
    if method == "gn" and G is None:
        G = draw(st.sampled_from(_divisors(C)))
    N = draw(st.integers(1, 4))
    sizes = tuple(draw(st.integers(1, 3)) for _ in range(k))
    shape = (N, C, *sizes)
    if _statistic_size(method, shape, G) < 2 or (need_spatial and math.prod(sizes) < 2):
        # the smallest valid case instead: two values per statistic along the last axis
        if k:
            shape = (N, C, *sizes[:-1], 2)
        elif method == "bn":
            shape = (max(N, 2), C)
        elif spatial is None:
            shape = (N, C, 2)
        elif num_channels is None:
            shape = (N, 2 * C)
        if _statistic_size(method, shape, G) < 2:
            raise ValueError(f"no {method} input with spatial={spatial}, num_channels="
                             f"{num_channels}, num_groups={num_groups} has two values per "
                             "statistic")
    return shape, G


@st.composite
def norm_inputs(
    draw: Any,
    method: str,
    *,
    dtype: Any = np.float64,
    eps: float | None = None,
    num_channels: int | None = None,
    num_groups: int | None = None,
    spatial: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    affine: bool = True,
    kinds: tuple[str, ...] = KINDS,
) -> Case:
    """Draw a :class:`Case` for ``method``.

    Parameters
    ----------
    method : {"bn", "in", "ln", "gn", "sn", "ws", "wn"}
    dtype : float16, float32 or float64
        The dtype of every drawn array (values are drawn in float64 and rounded to it).
    eps : float, optional
        Fixed ``eps``; drawn from :data:`EPS_CHOICES` when None.
    num_channels : int, optional
        Fixed C (C_out for WS and WN).
    num_groups : int, optional
        Fixed G for GN; C is then a multiple of it.
    spatial : int, optional
        Fixed number of spatial axes (0 means (N, C) inputs).
    input_shape : tuple of int, optional
        Fixed trailing shape (C, *spatial) (a LayerNorm with a multi-axis normalized shape);
        for WS and WN the whole weight shape (C_out, ...).
    affine : bool
        False: gamma = 1 and beta = 0 (implementations without affine parameters).
    kinds : non-empty tuple of str
        Which of :data:`KINDS` to draw from.

    Returns
    -------
    SearchStrategy of Case
    """
    method = check_method(method)
    dtype = np.dtype(dtype)
    if dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"dtype must be float16, float32 or float64; got {dtype}")
    check_kinds(kinds)
    if input_shape is not None and not (
            len(input_shape) >= 1 and all(is_int(n) and int(n) >= 1 for n in input_shape)):
        raise ValueError(f"input_shape must be None or a non-empty tuple of ints >= 1; "
                         f"got {input_shape!r}")
    for name, value, low in (("num_channels", num_channels, 1), ("num_groups", num_groups, 1),
                             ("spatial", spatial, 0)):
        if value is not None and (not is_int(value) or int(value) < low):
            raise ValueError(f"{name} must be None or an int >= {low}; got {value!r}")
    if eps is not None:
        check_eps(eps)
    shape, G = draw(_shapes(method, num_channels, num_groups, spatial, input_shape))
    eps_value = eps if eps is not None else draw(st.sampled_from(EPS_CHOICES))
    kind = draw(st.sampled_from(kinds))
    base = draw(_values(shape, 1.0))
    if kind == "plain":
        x = 10.0 * base
    elif kind == "offset":
        x = draw(st.sampled_from([100.0, -1000.0, 10000.0])) + base
    else:
        centre = draw(st.floats(-1, 1, allow_subnormal=False)) if method != "wn" else 0.0
        x = centre + base * (0.1 * math.sqrt(eps_value) if method in ACTIVATION_METHODS
                             else eps_value)
    C = shape[0] if method in ("ws", "wn") else shape[1]
    params = []
    for name in PARAM_NAMES[method]:
        if name in ("mean_logits", "var_logits"):
            params.append(draw(_values((3,), 3.0)))
        elif not affine:
            params.append(np.ones(C) if name == "gamma" else np.zeros(C))
        else:
            params.append(draw(_values((C,), 2.0)))
    ripple = 0.5 * np.cos(np.arange(math.prod(shape), dtype=np.float64)).reshape(shape)
    dy = draw(_values(shape, 1.0)) + ripple                        # never constant
    return Case(method, kind, x.astype(dtype), tuple(p.astype(dtype) for p in params),
                dy.astype(dtype), float(eps_value), G)
