"""Moments over axes, computed in two passes.

The one-pass form ``E[x^2] - E[x]^2`` cancels catastrophically when ``|mean| >> std``
(in float32, inputs offset by 1e4 lose every digit of a unit variance). refnorm's reference
path therefore always takes the mean first and then the mean of squared deviations.

The mean's sum is accumulated in float64 and the mean rounded once to ``x``'s dtype, as
PyTorch's CPU kernels accumulate float32 in double. A float32 sum rounds at every addition,
and the mean it gives of a constant group is not that constant: the deviations from it, some
ulps of a large value, would be normalized by ``sqrt(eps)`` into outputs of order 1 (``|y|``
up to 0.9 for a constant float32 channel of 1e5, exactly 1 at 1e20), or overflow when squared
(a constant channel of 1e26 would be refused as an overflowing variance). The float64 sum of
up to 2^29 equal float32 values is exact: a constant group has the mean it holds, and its
outputs are ``beta``.

A float64 sum adds no precision to float64 values: the rounded mean of a float64 constant
group of 1.2345678901234567e13 is an ulp (0.002) off, which ``sqrt(eps)`` turns into outputs
of 0.53. So a float64 mean is refined once, by the mean of the deviations from it: ``x - mu``
of nearby numbers is exact, and for a constant group that correction is exactly what the
rounding lost. (For float32 the correction is below half an ulp of the correctly rounded
mean: it would round away, and the pass is not taken.) The fast kernels get the same from
their shift by one of the group's values; Switchable Normalization's ``in_moments`` keeps the
correction apart as its ``offset_in``.
"""

from __future__ import annotations

import math

import numpy as np

from refnorm.backend import Array, array_namespace


def reduced_count(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
    """Number of elements each statistic is taken over: the product of ``shape[axes]``."""
    return math.prod(shape[a] for a in axes)


def moments(x: Array, axes: tuple[int, ...]) -> tuple[Array, Array]:
    """Mean and biased variance of ``x`` over ``axes``, two-pass, dimensions kept.

    Parameters
    ----------
    x : array, any shape
    axes : tuple of int
        The reduction axes.

    Returns
    -------
    mu : array, ``x.shape`` with ``axes`` set to 1
        The sum accumulated in float64, divided by m, rounded to ``x``'s dtype; in float64
        plus the mean of the deviations from it.
    var : array, same shape as ``mu``
        ``mean((x - mu)**2)``, the biased (1/m) estimator, in ``x``'s dtype.

    Raises
    ------
    ValueError
        If a variance overflows ``x``'s dtype although its group of ``x`` is finite (float32
        values near 1e20): normalizing by ``1/sqrt(inf)`` would silently turn every output of
        the group into ``beta``. (Non-finite inputs give NaN statistics for their own group,
        as they should, and excuse no other group.)
    """
    xp = array_namespace(x)
    m = reduced_count(tuple(x.shape), axes)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow raises just below
        total = xp.sum(x, axis=axes, dtype=xp.float64, keepdims=True)
        mu = xp.astype(total / m, x.dtype)
        if x.dtype == xp.float64:  # the sum added no precision: refine (module docstring)
            lost = xp.sum(x - mu, axis=axes, keepdims=True)      # what the rounding lost
            mu = mu + lost / m
        centred = x - mu
        var = xp.mean(centred * centred, axis=axes, keepdims=True)
    check_variance_finite(var, x)
    return mu, var


def check_variance_finite(var: Array, x: Array, *, name: str = "x",
                          merged: bool = False) -> None:
    """Refuse a variance that overflowed (inf) from finite values; see :func:`moments`.

    ``var`` has ``x``'s number of dimensions, length 1 along the axes it was reduced over:
    each entry is checked against its own group of ``x``, so a NaN or inf in another group
    excuses no overflow (as the NaN propagates in its own group only).

    The variance is infinite when a sum formed in the dtype overflows it: of the values (their
    mean is then infinite) or of their squared deviations; it is NaN when partial sums of
    both signs overflowed (``inf - inf``). From a finite group nothing else makes it
    non-finite; an empty ``x`` has no sum to overflow (its mean over nothing is NaN: SN's
    unused scope on an empty axis). ``name`` names ``x`` in the error. ``merged``: ``var``
    holds other devices' data too (a synchronized statistic), whose NaN inputs make it NaN:
    only an infinity is then an overflow.
    """
    xp = array_namespace(var, x)
    bad = xp.isinf(var) if merged else ~xp.isfinite(var)
    if math.prod(x.shape) == 0 or not bool(xp.any(bad)):  # the common case: no pass over x
        return
    reduce_axes = tuple(a for a in range(x.ndim) if var.shape[a] == 1)
    finite = xp.all(xp.isfinite(x), axis=reduce_axes, keepdims=True)   # var's shape
    overflowed = bad & finite                                           # var's shape
    if bool(xp.any(overflowed)):
        largest = float(xp.max(xp.where(overflowed, xp.abs(x), xp.zeros_like(x))))
        remedy = (f"rescale {name}" if xp.isdtype(x.dtype, xp.float64) else
                  f"compute in float64 or rescale {name}")
        raise ValueError(
            f"the variance of {name} overflows {x.dtype} (|{name}| up to {largest:.3g}): the "
            f"sum of its values or of their squared deviations exceeds the dtype's range; "
            f"{remedy}"
        )
