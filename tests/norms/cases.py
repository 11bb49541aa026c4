"""The four activation normalizers as data, for the generic property tests.

Each entry says how to call the method's pure functions and, independently of refnorm's
code, which elements share a statistic (``view``): the tests compute expected statistics
with numpy from that description alone.

Inputs are drawn value by value (``hypothesis.extra.numpy``), so a failure shrinks to a
small readable array; shrunk arrays are often constant within a group (variance 0), and the
tolerances below are derived from each drawn case rather than fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import refnorm
from tests.core.strategies import float_arrays, nonzero_reals

U64 = np.finfo(np.float64).eps


@dataclass(frozen=True)
class Method:
    name: str
    forward: Callable[..., Any]   # forward(x, gamma, beta, *, eps, **options)
    backward: Callable[..., Any]  # backward(dy, cache)
    min_ndim: int                 # 2 if (N, C) inputs are accepted, 3 if a spatial axis is needed
    view: Callable[..., tuple[tuple[int, ...], tuple[int, ...]]]  # (shape, options) -> (view, axes)

    def __repr__(self) -> str:
        return self.name


def _bn_view(shape, options):
    return tuple(shape), (0,) + tuple(range(2, len(shape)))


def _in_view(shape, options):
    return tuple(shape), tuple(range(2, len(shape)))


def _ln_view(shape, options):
    return tuple(shape), tuple(range(1, len(shape)))


def _gn_view(shape, options):
    N, C, G = shape[0], shape[1], options["num_groups"]
    view = (N, G, C // G) + tuple(shape[2:])
    return view, tuple(range(2, len(view)))


METHODS = [
    Method("bn", refnorm.batch_norm_forward, refnorm.batch_norm_backward, 2, _bn_view),
    Method("in", refnorm.instance_norm_forward, refnorm.instance_norm_backward, 3, _in_view),
    Method("ln", refnorm.layer_norm_forward, refnorm.layer_norm_backward, 2, _ln_view),
    Method("gn", refnorm.group_norm_forward, refnorm.group_norm_backward, 2, _gn_view),
]


def stat_count(method: Method, shape, options) -> int:
    view, axes = method.view(shape, options)
    return int(np.prod([view[a] for a in axes]))


@st.composite
def configs(draw, method: Method, *, max_side: int = 4, min_count: int = 2):
    """Draw ``(shape, options, eps)`` with every statistic over at least ``min_count`` values."""
    ndim = draw(st.integers(method.min_ndim, 4))
    shape = tuple(draw(st.integers(1, max_side)) for _ in range(ndim))
    options = {}
    if method.name == "gn":
        C = shape[1]
        options["num_groups"] = draw(st.sampled_from([g for g in range(1, C + 1) if C % g == 0]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    assume(stat_count(method, shape, options) >= min_count)
    return shape, options, eps


def reference_stats(method: Method, x: np.ndarray, options):
    """Mean and biased variance of each statistic group, by numpy, broadcast to x.shape."""
    view, axes = method.view(x.shape, options)
    xv = x.reshape(view)
    mu = np.broadcast_to(xv.mean(axis=axes, keepdims=True), view).reshape(x.shape)
    var = np.broadcast_to(xv.var(axis=axes, keepdims=True), view).reshape(x.shape)
    return mu, var


def group_sum(method: Method, a: np.ndarray, options) -> np.ndarray:
    """Sum of ``a`` over each statistic group (the group's reduction axes)."""
    view, axes = method.view(a.shape, options)
    return a.reshape(view).sum(axis=axes)


def draw_inputs(data, config):
    """``(x, gamma, beta, dy)`` for a drawn ``(shape, options, eps)``, value by value.

    ``x = c + u``: ``u`` in [-10, 10] and a drawn offset ``c`` in [5, 15], so every group has
    a real mean to subtract (CS231n's ``5 * randn + 12``). ``gamma`` is of size 0.25 to 4
    with either sign (``dx`` is proportional to it: near 0 it would sink below what finite
    differences resolve); ``beta`` and ``dy`` are anything in [-10, 10].
    """
    shape, _, _ = config
    C = shape[1]
    x = data.draw(float_arrays(shape), label="u") + data.draw(st.floats(5.0, 15.0), label="c")
    gamma = data.draw(arrays(np.float64, (C,), elements=nonzero_reals()), label="gamma")
    beta = data.draw(float_arrays((C,)), label="beta")
    dy = data.draw(float_arrays(shape), label="dy")
    return x, gamma, beta, dy


def per_group(method: Method, a: np.ndarray, options, reduce=np.max) -> np.ndarray:
    """``reduce`` of ``a`` over each statistic group, broadcast back to ``a.shape``."""
    view, axes = method.view(a.shape, options)
    r = reduce(a.reshape(view), axis=axes, keepdims=True)
    return np.broadcast_to(r, view).reshape(a.shape)


def x_hat_rounding(method: Method, x: np.ndarray, options, eps: float) -> np.ndarray:
    """A bound on the float64 rounding error of a computed ``x_hat``, per element.

    The mean of m values of size <= max|x| is off by up to (m - 1) u max|x| (u = 2.2e-16,
    the naive summation bound; numpy's pairwise sums do better), each deviation x - mu by
    (m + 1) u max|x|; the variance's error moves rstd = 1/sqrt(var + eps) by as much
    relative to the deviations, times |x_hat| <= sqrt(m). Scaled by rstd that is
    (2 + sqrt(m)) (m + 1) u max|x| rstd, plus rounding of the O(sqrt(m)) result itself.
    Large where a group is nearly constant (rstd -> 1/sqrt(eps)) and far from 0.
    """
    m = stat_count(method, x.shape, options)
    _, var = reference_stats(method, x, options)
    size = per_group(method, np.abs(x), options)
    return (2 + np.sqrt(m)) * (m + 1) * U64 * (size / np.sqrt(var + eps) + 1.0)


def assert_within(actual, expected, bound, what: str) -> None:
    """Assert ``|actual - expected| <= bound`` elementwise, naming the worst element."""
    actual = np.asarray(actual)
    expected = np.broadcast_to(expected, actual.shape)
    bound = np.broadcast_to(bound, actual.shape)
    excess = np.abs(actual - expected) - bound
    assert not np.isnan(excess).any(), f"{what}: NaN in {actual!r} or {expected!r}"
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, (f"{what}: at {worst} got {actual[worst]!r}, expected "
                                f"{expected[worst]!r} within {bound[worst]!r}")
