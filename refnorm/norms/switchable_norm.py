"""Switchable Normalization (Luo, Zhang, Ren, Peng & Li, journal version, 2019).

SN normalizes with a learned mixture of the Instance, Layer and Batch Normalization
statistics (the *scopes*), as in the journal version's §3.1:

    y = gamma * (h - sum_k w_k mu_k) / sqrt(sum_k w'_k var_k + eps) + beta        # Eq. (3)
    w = softmax(lambda),  w' = softmax(lambda')                                    # Eq. (5)

with separate ratios for the means (``w``) and the variances (``w'``), as Luo, Peng, Ren &
Zhang's study of distinct normalizers (2018) also writes them in its Eq. (1). The control
parameters start equal (ratios 1/3).

Statistics (Eq. 4) reuse the IN moments: the LN and BN means are means of the IN means, and
their variances follow from the IN moments. The paper prints the variances in the one-pass
form ``mean(var_in + mu_in^2) - mu^2``, which cancels catastrophically in float32 when the
data sit far from zero; refnorm writes the same reuse in the law of total variance form
``mean(var_in) + mean((mu_in - mu)^2)``, equal in exact arithmetic. The printed form lives
with the other printed formulas in :mod:`refnorm.errata.sn_appendix`.

Large means. A mean rounded to the dtype is off by up to ``eps |mean|`` (5e-4 for a float32
mean of 1e4), which can exceed the spread of the data around it. Every mean is therefore also
held relative to the IN mean as stored, ``mu["in"]`` (the *shift*): ``offset[k] = mu_k -
mu["in"]`` is formed from differences of nearby numbers only, without rounding a mean first
(:func:`in_moments`, :func:`pool_in_moments`). Eq. (3) mixes these offsets, which is the same
mixture because the ratios sum to 1, and the backward takes ``h - mu_in``, ``mu_in - mu_k`` and
Eq. (12)-(14)'s sums ``S_k`` from them. In float32 at a mean of 1e4 and a spread of 1e-3 this
keeps the digits that the unshifted forms lose (tests/norms/test_switchable_norm.py); in exact
arithmetic every offset form equals the printed one.

The backward (:func:`switchable_norm_backward`) follows Appendix A (single GPU) equation by
equation, Eq. (6)-(14), generalized to separate mean and variance ratios and to the
official code's unbiased IN variance; a second, compact derivation through the IN moments
(:func:`switchable_norm_backward_compact`) is held equal to it by the tests. Appendix A's
printed Eq. (10)-(11) sum over the channels as if ``gamma`` and ``beta`` were scalars; with
per-channel parameters the sums run over (n, i, j) only (see the docs' errata page).
Synchronized SN (Appendix A, multiple GPUs) is its own pair in :mod:`refnorm.sync.switchable`.

Inference: IN and LN statistics stay per sample; the BN scope switches to population
statistics, either a moving average updated in training (``inference="moving_average"``,
PyTorch's momentum convention) or the paper's *batch average* computed after training by
:func:`refnorm.inference.batch_average`.

Inputs are (N, C, *spatial), viewed as (N, C, S) with S the number of spatial positions;
(N, C) inputs have S = 1 and only the LN and BN scopes are defined for them.

The file reads in the paper's order: the options and their checks, the cache, the forward
(Eq. 3-5), the backward of Appendix A (Eq. 6-14), the compact backward, the layer; the fast
path (:mod:`refnorm.dispatch`) comes last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar, NamedTuple

import numpy as np

from refnorm.backend import Array, array_namespace, device_of, on_device
from refnorm.core import affine_forward, standardize
from refnorm.core.checks import (
    check_bool,
    check_cache,
    check_channel_param,
    check_float_array,
    check_like,
    check_momentum,
    check_once,
    is_int,
    prepare_channel_norm,
)
from refnorm.core.moments import check_variance_finite
from refnorm.core.running import BatchStatistics, update_running_stats
from refnorm.dispatch import dispatched
from refnorm.kernels import norms as kernels
from refnorm.norms.base import ChannelNorm, CheckCase

SCOPES = ("in", "ln", "bn")
INFERENCE_MODES = ("moving_average", "batch_average")


# -- options, and the checks of the arguments against them -----------------------------------------


@dataclass(frozen=True)
class SwitchableOptions:
    """The choices that select a variant of SN's forward and backward.

    The layer's inference mode and momentum are not here: the pure functions never read
    them (the eval forward takes the population statistics as arguments).

    Attributes
    ----------
    scopes : tuple of str
        Which statistics are mixed, a non-empty ordered subset of ``("in", "ln", "bn")``;
        the control parameters have one entry per scope, in this order. ``("in", "ln")`` is
        the paper's advice for one sample per device; (N, C) inputs need ``("ln", "bn")``.
    in_correction : {0, 1}
        0: biased IN variance (the paper's Eq. 2). 1: the official ``SwitchNorm2d``'s unbiased
        IN variance (``torch.var`` default), which the LN and BN variances then inherit.
    hard : bool
        Use one-hot ratios, the argmax of each softmax (the paper's "sparse SN", for
        inference and fine-tuning). The control parameters then get zero gradients.
    scope_correction : {0, 1}
        1: every scope's variance is the unbiased one over the m_k values it covers, its
        biased variance times m_k / (m_k - 1) (m_k = S for IN, C S for LN, N S for BN), as
        the official ``SwitchNorm1d`` computes its LN and BN variances (``x.var(1)`` over the
        C features, ``x.var(0)`` over the N samples of an (N, C) input). 0: as
        ``in_correction`` says. The two are alternatives: at most one of them is 1.
    """

    scopes: tuple[str, ...] = SCOPES
    in_correction: int = 0
    hard: bool = False
    scope_correction: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.scopes, (tuple, list))
                and all(isinstance(s, str) for s in self.scopes)):
            raise TypeError(f"scopes must be a tuple of scope names from {SCOPES}; "
                            f"got {self.scopes!r}")
        scopes = tuple(self.scopes)
        object.__setattr__(self, "scopes", scopes)  # lists become tuples (hashable, frozen)
        if not scopes or len(set(scopes)) != len(scopes) or not set(scopes) <= set(SCOPES):
            raise ValueError(
                f"scopes must be a non-empty subset of {SCOPES} without repeats; got {scopes}")
        for name in ("in_correction", "scope_correction"):
            value = getattr(self, name)
            if not is_int(value):  # a bool is not an int here (True is no correction)
                raise TypeError(f"{name} must be an int, 0 or 1; got {value!r}")
            if value not in (0, 1):
                raise ValueError(f"{name} must be 0 or 1; got {value!r}")
            object.__setattr__(self, name, int(value))
        object.__setattr__(self, "hard", check_bool("hard", self.hard))
        if self.in_correction and self.scope_correction:
            raise ValueError("in_correction=1 and scope_correction=1 are two conventions for "
                             "the same variances (SwitchNorm2d's and SwitchNorm1d's); got both")


DEFAULT_OPTIONS = SwitchableOptions()


def prepare_inputs(x: Array, gamma: Array, beta: Array, logits: tuple[Array, Array], *,
                   eps: float, options: SwitchableOptions) -> tuple[ModuleType, Array]:
    """Check the arguments; return the namespace and the (N, C, S) view in compute dtype."""
    if not isinstance(options, SwitchableOptions):
        raise TypeError(f"options must be a SwitchableOptions; got {type(options).__name__}")
    xp, xc, _, _ = prepare_channel_norm(x, gamma, beta, eps=eps)
    K = len(options.scopes)
    for name, value in zip(("mean_logits", "var_logits"), logits, strict=True):
        check_float_array(name, value)
        if tuple(value.shape) != (K,):
            raise ValueError(
                f"{name} must have shape ({K},), one control parameter per scope; "
                f"got shape {tuple(value.shape)}")
    N, C = x.shape[:2]
    h = xp.reshape(xc, (N, C, math.prod(x.shape[2:])))           # (N, C, S)
    return xp, xp.asarray(h, copy=True)  # the cache keeps h: never a view of the caller's x


def check_scope_counts(shape: tuple[int, ...], options: SwitchableOptions, *,
                       with_bn: bool) -> None:
    """Check that every statistic used covers more than one value.

    ``with_bn=False`` skips the BN scope: population statistics at inference, or a
    synchronized BN scope that its caller checks after pooling the devices.
    """
    S = math.prod(shape[2:])
    if options.in_correction and S < 2:  # else an empty map is the IN count's error below
        raise ValueError(
            f"in_correction=1 (unbiased IN variance) needs more than one spatial position; "
            f"x of shape {tuple(shape)} has {S}")
    counts = scope_counts(shape)
    for scope in options.scopes:
        if scope == "bn" and not with_bn:
            continue
        if counts[scope] < 2:
            hint = (" (use scopes=('ln', 'bn') for (N, C) inputs; the official code returns NaN"
                    " for IN on 1x1 maps)" if scope == "in" else "")
            raise ValueError(
                f"the {scope.upper()} scope needs more than 1 value per statistic; x of shape "
                f"{tuple(shape)} gives {counts[scope]}{hint}")


def scope_counts(shape: tuple[int, ...], *, bn_groups: int | None = None) -> dict[str, int]:
    """The values m_k one statistic of each scope covers: S, C S and N S for IN, LN and BN
    (``bn_groups``: the samples of the BN scope when they are not ``shape[0]``, synchronized
    over devices)."""
    N, C = shape[:2]
    S = math.prod(shape[2:])
    return {"in": S, "ln": C * S, "bn": (N if bn_groups is None else bn_groups) * S}


def variance_factors(shape: tuple[int, ...], options: SwitchableOptions, *,
                     bn_groups: int | None = None) -> dict[str, float]:
    """What each scope's biased variance is multiplied by: m_k / (m_k - 1) with
    ``options.scope_correction`` (the unbiased variance), else 1."""
    counts = scope_counts(shape, bn_groups=bn_groups)
    return {k: m / (m - options.scope_correction) if m > options.scope_correction else 1.0
            for k, m in counts.items()}


# -- the cache, and what the backward returns ------------------------------------------------------


@dataclass(frozen=True)
class SwitchableNormCache:
    """What the SN forward saves for its backward. Shapes use the (N, C, S) view.

    Attributes
    ----------
    h : array, (N, C, S)
        The input in the compute dtype: Eq. (9) needs ``h - mu_k`` for every scope.
    x_hat : array, (N, C, S)
        The normalized input, the paper's ``h~``.
    rstd : array, (N, C, 1)
        ``1 / sqrt(var + eps)`` of the mixed variance, in its shape: (1, C, 1) with the BN
        scope alone, (N, 1, 1) with the LN scope alone.
    gamma : array, (C,)
    mu, var : dicts of scope to array
        Each scope's statistics: "in" (N, C, 1), "ln" (N, 1, 1), "bn" (1, C, 1); the means
        rounded to the dtype (what the running statistics take).
    offset : dict of scope to array, (N, C, 1) each
        Each scope's mean minus ``mu["in"]``, unrounded (:class:`ScopeStatistics`): the
        backward takes every difference of means from these.
    w_mean, w_var : arrays, (K,)
        The ratios ``w`` and ``w'`` for the K scopes of ``options.scopes``.
    bn_given : bool
        True when the BN-scope statistics were arguments (population statistics at
        inference), so they do not depend on ``h`` and the backward has no BN terms.
    options : SwitchableOptions
    x_shape : tuple of int
        The original input shape.
    x_dtype, param_dtype, logit_dtype : dtypes of dx, of dgamma/dbeta, of the logit grads
    """

    h: Array
    x_hat: Array
    rstd: Array
    gamma: Array
    mu: dict[str, Array]
    offset: dict[str, Array]
    var: dict[str, Array]
    w_mean: Array
    w_var: Array
    bn_given: bool
    options: SwitchableOptions
    x_shape: tuple[int, ...]
    x_dtype: Any
    param_dtype: Any
    logit_dtype: Any


class SwitchableNormGrads(NamedTuple):
    """What SN's backward returns: ``dx`` and the gradient of every parameter, by name.

    Attributes
    ----------
    dx : array, (N, C, *spatial), dtype of ``x``
    dgamma, dbeta : arrays, (C,), dtype of ``gamma``
    dmean_logits, dvar_logits : arrays, (K,), dtype of the control parameters
    """

    dx: Array
    dgamma: Array
    dbeta: Array
    dmean_logits: Array
    dvar_logits: Array

    def params(self) -> dict[str, Array]:
        """The parameter gradients under the names of the layer's ``params``."""
        return {"gamma": self.dgamma, "beta": self.dbeta, "mean_logits": self.dmean_logits,
                "var_logits": self.dvar_logits}


# -- forward: statistics, Eq. (4); ratios, Eq. (5); normalization, Eq. (3) -------------------------


def in_moments(h: Array, *, in_correction: int = 0) -> tuple[Array, Array, Array]:
    """The IN mean and variance of every (n, c), the first line of Eq. (4).

    The mean comes in two parts: ``mu_in``, rounded to the dtype, and ``offset_in``, the mean
    of ``h - mu_in``, which is what that rounding lost (0 in exact arithmetic; up to
    ``eps |mu_in|``, e.g. 5e-4 for a float32 mean of 1e4). The differences ``h - mu_in`` of
    nearby numbers are exact, so ``mu_in + offset_in`` holds the mean to the data's own
    precision, and the variance is taken about it.

    Parameters
    ----------
    h : array, (N, C, S)
    in_correction : {0, 1}
        Divide the squared deviations by S - in_correction.

    Returns
    -------
    mu_in, offset_in, var_in : arrays, (N, C, 1)
    """
    xp = array_namespace(h)
    S = h.shape[2]
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow raises just below
        mu_in = xp.mean(h, axis=2, keepdims=True)                # (N, C, 1)  Eq. (4)
        offset_in = xp.mean(h - mu_in, axis=2, keepdims=True)    # (N, C, 1)  its rounding
        d = (h - mu_in) - offset_in                              # (N, C, S)  h - IN mean
        var_in = xp.sum(d * d, axis=2, keepdims=True) / (S - in_correction)   # Eq. (4)
    check_variance_finite(mu_in, h)  # the sum of a plane overflows (its variance is then NaN)
    check_variance_finite(var_in, h)
    return mu_in, offset_in, var_in


def pool_in_moments(mu_in: Array, offset_in: Array, var_in: Array, *,
                    axis: int) -> tuple[Array, Array, Array]:
    """Merge the IN moments along ``axis`` (1: LN, 0: BN) into one mean and variance, Eq. (4).

    The mean is ``mu_k``, rounded to the dtype, and ``offset_k``, the unrounded mean minus
    each IN group's ``mu_in``: ``mean(mu_in + offset_in) - mu_in``, written as
    ``(mu_k - mu_in) + mean(mu_in - mu_k) + mean(offset_in)`` so that only differences of
    nearby numbers are formed. The variance is the law of total variance, mean of the IN
    variances plus the variance of the IN means about ``mu_k``; the paper prints the equal
    ``mean(var_in + mu_in^2) - mu^2``, which cancels in float32
    (:func:`refnorm.errata.sn_appendix.printed_eq4`).

    Parameters
    ----------
    mu_in, offset_in, var_in : arrays, (N, C, 1), as :func:`in_moments` returns them
    axis : {0, 1}

    Returns
    -------
    mu_k : array, (N, 1, 1) for axis 1 or (1, C, 1) for axis 0
    offset_k : array, (N, C, 1)
        The scope's mean minus ``mu_in``, per IN group.
    var_k : array, shape of ``mu_k``
    """
    xp = array_namespace(mu_in, offset_in, var_in)
    if mu_in.shape[axis] == 0:  # nothing to pool (an unused BN scope of an empty batch): NaN,
        # as a mean over nothing, without numpy's "Mean of empty slice" warning
        shape = tuple(1 if a == axis else n for a, n in enumerate(mu_in.shape))
        nan = xp.full(shape, math.nan, dtype=mu_in.dtype, **on_device(device_of(mu_in)))
        return nan, xp.zeros_like(offset_in), nan
    with np.errstate(over="ignore", invalid="ignore"):  # the callers refuse an overflow
        mu_k = xp.mean(mu_in, axis=axis, keepdims=True)          # Eq. (4), in the dtype
        lost = (xp.mean(mu_in - mu_k, axis=axis, keepdims=True)  # what rounding mu_k lost
                + xp.mean(offset_in, axis=axis, keepdims=True))
        offset_k = (mu_k - mu_in) + lost                         # (N, C, 1)
        between = offset_in - offset_k                           # (N, C, 1)  mu_in - mu_k
        var_k = xp.mean(var_in + between * between, axis=axis, keepdims=True)   # Eq. (4)
    return mu_k, offset_k, var_k


@dataclass(frozen=True)
class ScopeStatistics:
    """Every scope's statistics, Eq. (4): dicts with keys "in", "ln", "bn".

    Attributes
    ----------
    mu : dict
        The means rounded to the dtype: "in" (N, C, 1), "ln" (N, 1, 1), "bn" (1, C, 1).
    offset : dict
        Each mean minus ``mu["in"]``, unrounded (see the module docstring), (N, C, 1) each;
        ``offset["in"]`` is what the rounding of ``mu["in"]`` lost.
    var : dict
        The variances, shaped as ``mu``.
    """

    mu: dict[str, Array]
    offset: dict[str, Array]
    var: dict[str, Array]


def scope_statistics(h: Array, options: SwitchableOptions, *,
                     bn: tuple[Array, Array, Array] | None = None) -> ScopeStatistics:
    """Means and variances of the three scopes from the IN moments, Eq. (4).

    Parameters
    ----------
    h : array, (N, C, S)
    options : SwitchableOptions (``in_correction`` and ``scope_correction`` are used)
    bn : tuple of three arrays, (1, C, 1) each, optional
        The BN scope's ``(mean, lost, var)`` given instead of pooled from ``h``, used as they
        come: population statistics at inference (``lost`` zero), or the synchronized ones
        (:mod:`refnorm.sync.switchable`; ``lost``: what the rounding of ``mean`` lost).

    Returns
    -------
    ScopeStatistics
    """
    mu_in, offset_in, var_in = in_moments(h, in_correction=options.in_correction)  # Eq. (4)
    mu, offset, var = {"in": mu_in}, {"in": offset_in}, {"in": var_in}
    mu["ln"], offset["ln"], var["ln"] = pool_in_moments(mu_in, offset_in, var_in, axis=1)
    if bn is None:
        mu["bn"], offset["bn"], var["bn"] = pool_in_moments(mu_in, offset_in, var_in, axis=0)
    if options.scope_correction:  # SwitchNorm1d: each scope unbiased over its own m_k values
        factors = variance_factors(tuple(h.shape), options)
        var = {k: v * factors[k] for k, v in var.items()}
    for scope in ("ln",) if bn is not None else ("ln", "bn"):
        check_variance_finite(mu[scope], h)   # the sum of the IN means overflows
        check_variance_finite(var[scope], h)  # the IN variances plus the spread of the IN means
    if bn is not None:
        mu["bn"], lost, var["bn"] = bn
        offset["bn"] = (mu["bn"] - mu_in) + lost                # (N, C, 1)
    return ScopeStatistics(mu=mu, offset=offset, var=var)


def scope_moments(h: Array, options: SwitchableOptions) -> tuple[dict, dict]:
    """Means and variances of the three scopes from the IN moments, Eq. (4).

    Parameters
    ----------
    h : array, (N, C, S)
    options : SwitchableOptions (``in_correction`` is used)

    Returns
    -------
    mu, var : dicts with keys "in" (N, C, 1), "ln" (N, 1, 1), "bn" (1, C, 1)
        The means rounded to the dtype (:func:`scope_statistics` also gives what that
        rounding lost).
    """
    stats = scope_statistics(h, options)
    return stats.mu, stats.var


def ratios(logits: Array, *, hard: bool = False) -> Array:
    """Softmax of the control parameters, Eq. (5); with ``hard``, the one-hot argmax. (K,)."""
    xp = array_namespace(logits)
    if hard:
        index = xp.argmax(logits)
        positions = xp.arange(logits.shape[0], **on_device(device_of(logits)))   # (K,)
        return xp.astype(positions == index, logits.dtype)
    e = xp.exp(logits - xp.max(logits))
    return e / xp.sum(e)


def mix(w: Array, stats: dict[str, Array], scopes: tuple[str, ...]) -> Array:
    """``sum_k w_k stats_k`` over the scopes (Eq. 3), broadcast to (N, C, 1)."""
    total = 0
    for i, scope in enumerate(scopes):
        total = total + w[i] * stats[scope]
    return total


def mix_and_normalize(x: Array, h: Array, params: tuple[Array, Array],
                      logits: tuple[Array, Array], stats: ScopeStatistics, *, bn_given: bool,
                      eps: float, options: SwitchableOptions) -> tuple[Array, SwitchableNormCache]:
    """Eq. (5) and Eq. (3) from the scope statistics; ``bn_given``: see the cache.

    Eq. (3) mixes the means, ``sum_k w_k mu_k``. The ratios sum to 1, so this is
    ``mu_in + sum_k w_k (mu_k - mu_in)``: the mixture is formed from the offsets and ``h`` is
    centred on the shift ``mu["in"]``, so that neither the rounding of the ratios (in float32
    their sum misses 1 by ~1e-8) nor that of the means is multiplied by a large mean.
    """
    xp = array_namespace(h)
    gamma, beta = params
    mean_logits, var_logits = logits
    w_mean = ratios(xp.astype(mean_logits, h.dtype), hard=options.hard)  # (K,)  Eq. (5)
    w_var = ratios(xp.astype(var_logits, h.dtype), hard=options.hard)    # (K,)  Eq. (5)
    offset_mix = mix(w_mean, stats.offset, options.scopes)       # (N, C, 1)  Eq. (3), - mu_in
    var_mix = mix(w_var, stats.var, options.scopes)              # (N, C, 1)  Eq. (3)
    x_hat, rstd = standardize(h - stats.mu["in"], offset_mix, var_mix, eps=eps)  # Eq. (3)
    gamma_c, beta_c = xp.astype(gamma, h.dtype), xp.astype(beta, h.dtype)
    y = affine_forward(xp.reshape(x_hat, x.shape), gamma_c, beta_c)   # Eq. (3)
    cache = SwitchableNormCache(
        h=h, x_hat=x_hat, rstd=rstd, gamma=gamma_c, mu=stats.mu, offset=stats.offset,
        var=stats.var, w_mean=w_mean, w_var=w_var, bn_given=bn_given, options=options,
        x_shape=tuple(x.shape), x_dtype=x.dtype, param_dtype=gamma.dtype,
        logit_dtype=mean_logits.dtype,
    )
    return xp.astype(y, x.dtype, copy=False), cache


@dispatched
def switchable_norm_forward(
    x: Array,
    gamma: Array,
    beta: Array,
    mean_logits: Array,
    var_logits: Array,
    *,
    eps: float = 1e-5,
    options: SwitchableOptions = DEFAULT_OPTIONS,
) -> tuple[Array, SwitchableNormCache]:
    """Switchable Normalization in training: every scope uses this batch's statistics.

    Parameters
    ----------
    x : array, (N, C, *spatial)
    gamma, beta : arrays, (C,)
    mean_logits, var_logits : arrays, (K,)
        The control parameters ``lambda`` and ``lambda'``, one per scope of ``options``.
    eps : float, > 0
    options : SwitchableOptions
    path : {"reference", "fast"}, optional
        Which implementation computes (:mod:`refnorm.dispatch`); default: the process-wide
        choice, else the reference.

    Returns
    -------
    y : array, ``x.shape``
    cache : SwitchableNormCache
    """
    _, h = prepare_inputs(x, gamma, beta, (mean_logits, var_logits), eps=eps, options=options)
    check_scope_counts(x.shape, options, with_bn=True)
    stats = scope_statistics(h, options)                         # Eq. (4)
    return mix_and_normalize(x, h, (gamma, beta), (mean_logits, var_logits), stats,
                             bn_given=False, eps=eps, options=options)  # Eq. (3), (5)


def _population(running_mean: Array, running_var: Array, *, like: Array) -> tuple[Array, Array]:
    """Check the given BN-scope statistics (C,); view them as (1, C, 1) in ``like``'s dtype."""
    xp, C = array_namespace(like), like.shape[1]
    check_channel_param("running_mean", running_mean, C)
    check_channel_param("running_var", running_var, C)
    if bool(xp.any(running_var < 0)):
        raise ValueError("running_var must be >= 0 everywhere; got a negative entry")
    return (xp.reshape(xp.astype(running_mean, like.dtype), (1, C, 1)),
            xp.reshape(xp.astype(running_var, like.dtype), (1, C, 1)))


@dispatched
def switchable_norm_eval_forward(
    x: Array,
    gamma: Array,
    beta: Array,
    mean_logits: Array,
    var_logits: Array,
    running_mean: Array,
    running_var: Array,
    *,
    eps: float = 1e-5,
    options: SwitchableOptions = DEFAULT_OPTIONS,
) -> tuple[Array, SwitchableNormCache]:
    """Switchable Normalization with given BN-scope statistics (inference).

    IN and LN statistics are still computed per sample. ``running_mean`` and
    ``running_var``, (C,), are the population statistics (moving average or
    :func:`refnorm.inference.batch_average`); the backward treats them as constants.
    Synchronized SN (:func:`refnorm.sync.switchable.sync_switchable_norm_forward`) passes
    the statistics pooled over all devices here. Other arguments (``path`` too) as in
    :func:`switchable_norm_forward`.
    """
    xp, h = prepare_inputs(x, gamma, beta, (mean_logits, var_logits), eps=eps, options=options)
    check_scope_counts(x.shape, options, with_bn=False)
    mu_bn, var_bn = _population(running_mean, running_var, like=h)       # (1, C, 1)
    bn = (mu_bn, xp.zeros_like(mu_bn), var_bn)   # given constants: no rounding to recover
    stats = scope_statistics(h, options, bn=bn)                           # Eq. (4)
    return mix_and_normalize(x, h, (gamma, beta), (mean_logits, var_logits), stats,
                             bn_given=True, eps=eps, options=options)  # Eq. (3), (5)


# -- backward, Appendix A: Eq. (6)-(8), (9), (10)-(11), (12)-(14) ----------------------------------


def backward_view(dy: Array, cache: SwitchableNormCache) -> tuple[ModuleType, Array]:
    """Check ``dy`` against the cache; return the namespace and ``dy`` as (N, C, S)."""
    check_cache(cache, SwitchableNormCache)
    check_like("dy", dy, cache.x_shape)
    xp = array_namespace(dy, cache.h)
    dy_c = xp.astype(dy, cache.h.dtype, copy=False)
    return xp, xp.reshape(dy_c, cache.h.shape)


def statistic_gradients(dy: Array, cache: SwitchableNormCache) -> tuple[Array, Array, Array]:
    """Eq. (6)-(8): the gradients of ``h~`` and of the mixed ``sigma^2`` and ``mu``.

    Parameters
    ----------
    dy : array, (N, C, S)
        dL/dh^, the upstream gradient on the (N, C, S) view.
    cache : SwitchableNormCache
        The forward's: ``gamma``, ``x_hat`` and ``rstd``.

    Returns
    -------
    dx_tilde : array, (N, C, S)
    dvar, dmu : arrays, (N, C, 1)
        One entry per (n, c), as Appendix A reshapes every statistic.
    """
    xp = array_namespace(dy, cache.h)
    dx_tilde = dy * xp.reshape(cache.gamma, (1, -1, 1))                     # Eq. (6)
    rstd = cache.rstd                                           # 1 / sqrt(sigma^2 + eps)
    dvar = -0.5 * rstd * rstd * xp.sum(dx_tilde * cache.x_hat, axis=2, keepdims=True)  # Eq. (7)
    dmu = -rstd * xp.sum(dx_tilde, axis=2, keepdims=True)                   # Eq. (8)
    return dx_tilde, dvar, dmu


def scope_variance_derivative(centred: Array, between: Array, *, groups: int,
                              in_correction: int) -> Array:
    """d sigma_k^2 / d h for each element of the (n, c) groups one statistic covers.

    Appendix A prints ``2 (h - mu_k) / |I_k|`` with ``|I_k|`` = ``groups * S`` values (groups =
    1, C, N for IN, LN, BN). With the law of total variance over ``groups`` IN groups,
    ``sigma_k^2 = mean(var_in) + mean((mu_in - mu_k)^2)``, the derivative is
    ``(2 / groups) ((h - mu_in) / (S - in_correction) + (mu_in - mu_k) / S)``, which is the
    printed one for the biased IN variance (``in_correction=0``): ``h - mu_k`` split at the
    IN mean, so that both parts come from the offsets (:class:`ScopeStatistics`). With
    ``scope_correction=1`` the variance, and so this derivative, is m_k / (m_k - 1) times
    the biased one (:func:`variance_factors`); the callers apply that factor.

    Parameters
    ----------
    centred : array, (N, C, S)
        ``h - mu_in``.
    between : array, (N, C, 1)
        ``mu_in - mu_k``.
    groups : int
    in_correction : {0, 1}

    Returns
    -------
    array, (N, C, S)
    """
    S = centred.shape[2]
    within = centred / (S - in_correction)
    return (2.0 / groups) * (within + between / S)


def centred_input(cache: SwitchableNormCache) -> Array:
    """``h - mu_in``, (N, C, S), from the shift ``mu["in"]`` and its offset."""
    return (cache.h - cache.mu["in"]) - cache.offset["in"]


def ratio_gradients(w: Array, s: list[Array], *, hard: bool = False) -> Array:
    """Eq. (12)-(14): dL/dlambda_k = w_k (1 - w_k) S_k - sum_{j != k} w_k w_j S_j.

    Parameters
    ----------
    w : array, (K,)
        The ratios (softmax of the control parameters).
    s : list of K 0-d arrays
        ``S_k`` for each scope.
    hard : bool
        One-hot ratios have no gradient: zeros.

    Returns
    -------
    array, (K,)
    """
    xp = array_namespace(w)
    K = w.shape[0]
    if hard:
        return xp.zeros((K,), dtype=w.dtype, **on_device(device_of(w)))
    rows = []
    for k in range(K):
        row = w[k] * (1 - w[k]) * s[k]                                  # Eq. (12)-(14)
        for j in range(K):
            if j != k:
                row = row - w[k] * w[j] * s[j]                          # Eq. (12)-(14)
        rows.append(row)
    return xp.stack(rows)


def cast_gradients(cache: SwitchableNormCache, dh: Array, affine: tuple[Array, Array],
                   dlogits: tuple[Array, Array]) -> SwitchableNormGrads:
    """The gradients in the shapes and dtypes of the forward's arguments."""
    xp = array_namespace(dh)
    dx = xp.astype(xp.reshape(dh, cache.x_shape), cache.x_dtype, copy=False)
    dgamma, dbeta = (xp.astype(g, cache.param_dtype, copy=False) for g in affine)
    dml, dvl = (xp.astype(g, cache.logit_dtype, copy=False) for g in dlogits)
    return SwitchableNormGrads(dx=dx, dgamma=dgamma, dbeta=dbeta, dmean_logits=dml,
                               dvar_logits=dvl)


@dispatched
def switchable_norm_backward(dy: Array, cache: SwitchableNormCache) -> SwitchableNormGrads:
    """Backward of SN written from Appendix A (single GPU), Eq. (6)-(14), in its order.

    The appendix ties the ratios (``w_k`` on both the means and the variances). With
    separate ratios every variance term takes ``w'_k`` where the printed form has ``w_k``,
    and the control-parameter gradients split into a mean part (``S_k`` from dL/dmu) for
    ``lambda`` and a variance part (``S'_k`` from dL/dsigma^2) for ``lambda'``; tied ratios
    add the two parts back into the printed Eq. (12)-(14).

    Parameters
    ----------
    dy : array, (N, C, *spatial)
    cache : SwitchableNormCache
    path : {"reference", "fast"}, optional
        As in :func:`switchable_norm_forward`; the fast path computes the compact form
        (:func:`switchable_norm_backward_compact`) fused, on training and inference caches.

    Returns
    -------
    SwitchableNormGrads
        ``dx`` (N, C, *spatial); ``dgamma``, ``dbeta`` (C,); ``dmean_logits``,
        ``dvar_logits`` (K,), zero with hard ratios (the argmax has no gradient).
    """
    xp, dy_v = backward_view(dy, cache)
    c, scopes = cache, cache.options.scopes
    N, C, S = c.h.shape
    wm = {k: c.w_mean[i] for i, k in enumerate(scopes)}     # w_k  (means)
    wv = {k: c.w_var[i] for i, k in enumerate(scopes)}      # w'_k (variances)
    # scopes whose statistics depend on h (population BN statistics do not)
    live = [k for k in scopes if not (k == "bn" and c.bn_given)]
    dx_tilde, dvar, dmu = statistic_gradients(dy_v, c)                  # Eq. (6), (7), (8)
    # the printed d sigma_k^2 / dh = 2 (h - mu_k) / |I_k| of each live scope, (N, C, S)
    groups = {"in": 1, "ln": C, "bn": N}                    # IN groups each statistic pools
    centred = centred_input(c)                                          # h - mu_in
    unbias = variance_factors(tuple(c.h.shape), c.options)  # m_k/(m_k-1), scope_correction
    dsigma2_dh = {k: unbias[k] * scope_variance_derivative(
                      centred, c.offset["in"] - c.offset[k], groups=groups[k],
                      in_correction=c.options.in_correction)
                  for k in live}
    # Eq. (9), term by term as printed (variance terms with w'_k):
    dh = dx_tilde * c.rstd                                              # Eq. (9) dL/dh~ / sqrt
    if "in" in live:
        dh = dh + wv["in"] * dsigma2_dh["in"] * dvar                    # Eq. (9) 2w(h-mu_in)/HW
    if "ln" in live:
        sum_c = xp.sum(dvar, axis=1, keepdims=True)                     # (N, 1, 1)
        dh = dh + wv["ln"] * dsigma2_dh["ln"] * sum_c                   # Eq. (9) 2w(h-mu_ln)/CHW
    if "bn" in live:
        sum_n = xp.sum(dvar, axis=0, keepdims=True)                     # (1, C, 1)
        dh = dh + wv["bn"] * dsigma2_dh["bn"] * sum_n                   # Eq. (9) 2w(h-mu_bn)/NHW
    if "in" in live:
        dh = dh + wm["in"] / S * dmu                                    # Eq. (9) w_in / HW
    if "ln" in live:
        dh = dh + wm["ln"] / (C * S) * xp.sum(dmu, axis=1, keepdims=True)   # Eq. (9) w_ln / CHW
    if "bn" in live:
        dh = dh + wm["bn"] / (N * S) * xp.sum(dmu, axis=0, keepdims=True)   # Eq. (9) w_bn / NHW
    # Eq. (10)-(11), per-channel gamma and beta: sums over (n, i, j), not over c (errata)
    dgamma = xp.sum(dy_v * c.x_hat, axis=(0, 2))                       # (C,)  Eq. (10)
    dbeta = xp.sum(dy_v, axis=(0, 2))                                  # (C,)  Eq. (11)
    # Eq. (12)-(14): S_k = sum_nc dL/dmu_nc mu_k (means), sum_nc dL/dsigma^2_nc sigma^2_k (vars).
    # The means enter relative to the shift: sum_nc dL/dmu_nc (mu_k - mu_in) = S_k - A, with
    # A = sum_nc dL/dmu_nc mu_in the same for every k. Eq. (12)-(14) read
    # w_k (1 - w_k) S_k - sum_{j != k} w_k w_j S_j = w_k (S_k - sum_j w_j S_j), which changes by
    # w_k (-A + A sum_j w_j) = 0 as the ratios sum to 1: the same gradients, from sums of the
    # size of the spread of the means rather than of the means (which cancel, and in float32
    # bring the ratios' rounding of 1e-8 times the mean).
    s_mean = [xp.sum(dmu * c.offset[k]) for k in scopes]               # Eq. (12)-(14) S_k - A
    s_var = [xp.sum(dvar * c.var[k]) for k in scopes]                  # Eq. (12)-(14) S'_k
    dmean_logits = ratio_gradients(c.w_mean, s_mean, hard=c.options.hard)  # Eq. (12)-(14)
    dvar_logits = ratio_gradients(c.w_var, s_var, hard=c.options.hard)     # Eq. (12)-(14)
    return cast_gradients(c, dh, (dgamma, dbeta), (dmean_logits, dvar_logits))


# -- backward, compact -----------------------------------------------------------------------------


def switchable_norm_backward_compact(dy: Array, cache: SwitchableNormCache) -> SwitchableNormGrads:
    """The same gradients as :func:`switchable_norm_backward`, derived through the IN moments.

    Every scope's statistics are functions of the IN moments ``(mu_in, var_in)`` (Eq. 4),
    so the gradients of the mixed ``mu`` and ``var`` (Eq. 7, 8) are first collected onto
    ``mu_in`` and ``var_in``, and only then taken to ``h`` with the IN derivatives
    ``d mu_in / dh = 1 / S`` and ``d var_in / dh = 2 (h - mu_in) / (S - correction)``.
    With ``var_k = mean(var_in) + mean((mu_in - mu_k)^2)`` over a scope of n_k groups:
    ``d var_k / d var_in = 1 / n_k`` and ``d var_k / d mu_in = 2 (mu_in - mu_k) / n_k``.
    The control-parameter gradients take the softmax Jacobian in its compact form,
    ``w * (s - sum(w * s))``.

    No ``path``: :func:`switchable_norm_backward`'s fast variant computes this form, fused.
    """
    xp, dy_v = backward_view(dy, cache)
    c = cache
    N, C, S = c.h.shape
    dx_tilde, dvar, dmu = statistic_gradients(dy_v, c)
    unbias = variance_factors(tuple(c.h.shape), c.options)  # m_k/(m_k-1), scope_correction
    dmu_in, dvar_in = 0, 0                                             # (N, C, 1) after the loop
    for i, scope in enumerate(c.options.scopes):
        if scope == "bn" and c.bn_given:
            continue  # population statistics do not depend on h
        axis = {"in": None, "ln": 1, "bn": 0}[scope]
        n_k = {"in": 1, "ln": C, "bn": N}[scope]
        dvar_k = dvar if axis is None else xp.sum(dvar, axis=axis, keepdims=True)
        dmu_k = dmu if axis is None else xp.sum(dmu, axis=axis, keepdims=True)
        g_var = c.w_var[i] * unbias[scope] * dvar_k / n_k              # onto each var_in
        dvar_in = dvar_in + g_var
        dmu_in = dmu_in + c.w_mean[i] * dmu_k / n_k
        between = c.offset["in"] - c.offset[scope]                     # mu_in - mu_k
        dmu_in = dmu_in + g_var * 2.0 * between                        # var_k's between part
    dh = (dx_tilde * c.rstd + dmu_in / S
          + dvar_in * 2.0 * centred_input(c) / (S - c.options.in_correction))
    dgamma = xp.sum(dy_v * c.x_hat, axis=(0, 2))
    dbeta = xp.sum(dy_v, axis=(0, 2))
    dlogits = []
    # the means relative to the shift, as in switchable_norm_backward (the same gradients)
    for w, grads, stats in ((c.w_mean, dmu, c.offset), (c.w_var, dvar, c.var)):
        s = xp.stack([xp.sum(grads * stats[k]) for k in c.options.scopes])   # (K,)
        dlogits.append(xp.zeros_like(w) if c.options.hard else w * (s - xp.sum(w * s)))
    return cast_gradients(c, dh, (dgamma, dbeta), (dlogits[0], dlogits[1]))


# -- the layer -------------------------------------------------------------------------------------


class SwitchableNorm(ChannelNorm):
    """Switchable Normalization layer.

    Parameters
    ----------
    num_channels : int
    eps : float, default 1e-5
    scopes, in_correction, hard, scope_correction
        See :class:`SwitchableOptions` (built once, ``self.options``).
    inference : {"moving_average", "batch_average"}
        How the BN scope gets population statistics. "moving_average" updates
        ``state`` in every training forward (PyTorch's convention: ``momentum`` weights the
        new batch, and the BN-scope variance is scaled by m / (m - 1) with m its values per
        channel; with ``in_correction=1`` that variance is already partly unbiased, and with
        ``scope_correction=1`` wholly, so the factor over-corrects it, as measured on the
        conventions page).
        "batch_average" leaves the running statistics alone in training;
        :func:`refnorm.inference.batch_average` sets them after training, as the paper does,
        through :meth:`set_population`.
    momentum : float, default 0.1
    dtype, xp, device : see :class:`~refnorm.layer.Layer`

    Params: gamma, beta (C,), mean_logits, var_logits (K,) initialised to zeros (ratios 1/K).
    State: running_mean, running_var (C,) with the BN scope; always ``population_ready``, a
    0-d bool array: whether eval may use the running statistics (True from the start for
    "moving_average" or without a BN scope, False for "batch_average" until
    :meth:`set_population`). It is state so that checkpoints carry it.
    """

    check_cases: ClassVar[tuple[CheckCase, ...]] = (
        CheckCase((3, 4, 3, 3)),
        CheckCase((4, 6), {"scopes": ("ln", "bn")}),
        CheckCase((2, 4, 3, 2), {"scopes": ("in", "ln")}),
        CheckCase((3, 4, 3, 3), {"in_correction": 1}),
        CheckCase((4, 6), {"scopes": ("ln", "bn"), "scope_correction": 1}),
        CheckCase((3, 4, 3, 3), {"scope_correction": 1}),
        CheckCase((3, 4, 3, 3), training=False),
    )

    def __init__(
        self,
        num_channels: int,
        *,
        eps: float = 1e-5,
        scopes: tuple[str, ...] = SCOPES,
        in_correction: int = 0,
        hard: bool = False,
        scope_correction: int = 0,
        inference: str = "moving_average",
        momentum: float = 0.1,
        dtype: Any = None,
        xp: ModuleType | None = None,
        device: Any = None,
    ) -> None:
        super().__init__(num_channels, eps=eps, dtype=dtype, xp=xp, device=device)
        self.options = SwitchableOptions(scopes, in_correction, hard, scope_correction)
        if inference not in INFERENCE_MODES:
            raise ValueError(
                f"inference must be 'moving_average' or 'batch_average'; got {inference!r}")
        check_momentum(momentum)
        self.inference, self.momentum = inference, momentum
        K, where = len(self.options.scopes), on_device(self.device)
        self.params["mean_logits"] = self.xp.zeros((K,), dtype=self.dtype, **where)
        self.params["var_logits"] = self.xp.zeros((K,), dtype=self.dtype, **where)
        has_bn = "bn" in self.options.scopes
        if has_bn:
            self.state = {
                "running_mean": self.xp.zeros((num_channels,), dtype=self.dtype, **where),
                "running_var": self.xp.ones((num_channels,), dtype=self.dtype, **where)}
        ready = inference == "moving_average" or not has_bn
        self.state["population_ready"] = self.xp.asarray(ready, **where)
        self._last_batch: BatchStatistics | None = None

    def _forward(self, x: Array, training: bool) -> tuple[Array, SwitchableNormCache]:
        p = self.params
        args = (x, p["gamma"], p["beta"], p["mean_logits"], p["var_logits"])
        if not training and "bn" in self.options.scopes:
            return switchable_norm_eval_forward(*args, *self.population(), eps=self.eps,
                                                options=self.options, path=self.compute_path())
        y, cache = switchable_norm_forward(*args, eps=self.eps, options=self.options,
                                           path=self.compute_path())
        if training and "bn" in self.options.scopes:
            C, S = self.num_channels, cache.h.shape[2]
            self._observe(BatchStatistics(count=cache.h.shape[0] * S,
                                          mean=self.xp.reshape(cache.mu["bn"], (C,)),
                                          var=self.xp.reshape(cache.var["bn"], (C,))))
        return y, cache

    def _backward(self, dy: Array, cache: SwitchableNormCache) -> tuple[Array, dict[str, Array]]:
        grads = switchable_norm_backward(dy, cache, path=self.compute_path())
        return grads.dx, grads.params()

    # -- population statistics: the moving average, or the batch average's records --------

    def _observe(self, batch: BatchStatistics) -> None:
        """Keep the batch statistics; with a moving average, update the running ones."""
        self._last_batch = batch
        if self.inference == "moving_average":
            running_mean, running_var = update_running_stats(
                self.state["running_mean"], self.state["running_var"], batch.mean, batch.var,
                count=batch.count, momentum=self.momentum)
            self.state = {**self.state, "running_mean": running_mean, "running_var": running_var}

    def batch_statistics(self) -> BatchStatistics:
        """The BN-scope (count, mean, var) of the last training forward.

        Raises
        ------
        ValueError
            If the layer has no BN scope, or no training forward ran since the layer was
            built or :meth:`reset`.
        """
        if "bn" not in self.options.scopes:
            raise ValueError(f"this SwitchableNorm has no BN scope (scopes={self.options.scopes})")
        if self._last_batch is None:
            raise ValueError("no batch statistics yet: run a training forward first")
        return self._last_batch

    def set_population(self, mean: Array, var: Array) -> None:
        """Set the BN-scope population statistics and mark them ready for inference.

        Parameters
        ----------
        mean, var : arrays, (C,)
            Stored in the dtype of the running statistics; ``var`` must be >= 0, and a finite
            value must stay finite in that dtype (1e39 is refused by a float32 layer).
        """
        if "bn" not in self.options.scopes:
            raise ValueError(f"this SwitchableNorm has no BN scope (scopes={self.options.scopes})")
        check_channel_param("mean", mean, self.num_channels, axis="the layer's channels")
        check_channel_param("var", var, self.num_channels, axis="the layer's channels")
        if bool(self.xp.any(var < 0)):
            raise ValueError("var must be >= 0 everywhere; got a negative entry")
        dtype = self.state["running_mean"].dtype
        largest = float(self.xp.finfo(dtype).max)
        for name, given in (("mean", mean), ("var", var)):
            if bool(self.xp.any(self.xp.isfinite(given) & (self.xp.abs(given) > largest))):
                raise ValueError(f"{name} has a finite entry beyond the layer's dtype {dtype}: "
                                 f"it would be stored as an infinity")
        self.state = {**self.state,
                      "running_mean": self.xp.astype(mean, dtype),
                      "running_var": self.xp.astype(var, dtype),
                      "population_ready": self.xp.asarray(
                          True, **on_device(device_of(self.state["running_mean"])))}

    def population(self) -> tuple[Array, Array]:
        """The BN-scope population statistics ``(running_mean, running_var)``, (C,) each.

        Raises
        ------
        ValueError
            If the layer has no BN scope (it keeps no population statistics).
        RuntimeError
            If they are not ready (``inference="batch_average"`` before a batch average).
        """
        if "bn" not in self.options.scopes:
            raise ValueError(f"this SwitchableNorm has no BN scope (scopes={self.options.scopes})")
        if not bool(self.state["population_ready"]):
            raise RuntimeError(
                f"{type(self).__name__}(inference='batch_average') has no population "
                "statistics yet: call refnorm.batch_average(model, batches) first")
        return self.state["running_mean"], self.state["running_var"]

    def reset(self) -> None:
        """Drop the saved cache and the last batch statistics."""
        super().reset()
        self._last_batch = None

    def current_ratios(self) -> dict[str, dict[str, float]]:
        """The current mean and variance ratios by scope, as Python floats."""
        hard = self.options.hard
        out = {}
        for kind in ("mean", "var"):
            w = ratios(self.params[f"{kind}_logits"], hard=hard)
            out[kind] = {s: float(w[i]) for i, s in enumerate(self.options.scopes)}
        return out


# -- the fast path: the same checks, then the fused loops ------------------------------------------


def _fused(x: Array, h: Array, params: tuple[Array, Array], logits: tuple[Array, Array], *,
           eps: float, options: SwitchableOptions,
           bn: tuple[Array, Array] | None) -> tuple[Array, SwitchableNormCache]:
    """The forward by :func:`refnorm.kernels.norms.sn_forward`; ``bn``: given BN statistics."""
    xp = array_namespace(h)
    (gamma, beta), (mean_logits, var_logits) = params, logits
    w_mean = ratios(xp.astype(mean_logits, h.dtype), hard=options.hard)  # (K,)  Eq. (5)
    w_var = ratios(xp.astype(var_logits, h.dtype), hard=options.hard)    # (K,)  Eq. (5)
    gamma_c, beta_c = xp.astype(gamma, h.dtype), xp.astype(beta, h.dtype)
    k = kernels.sn_forward(h, gamma_c, beta_c, w_mean, w_var, eps=eps, scopes=options.scopes,
                           in_correction=options.in_correction,
                           scope_correction=options.scope_correction, bn=bn)
    cache = SwitchableNormCache(
        h=k.h, x_hat=k.x_hat, rstd=k.rstd, gamma=gamma_c, mu=k.mu, offset=k.offset,
        var=k.var, w_mean=w_mean, w_var=w_var, bn_given=bn is not None, options=options,
        x_shape=tuple(x.shape), x_dtype=x.dtype, param_dtype=gamma.dtype,
        logit_dtype=mean_logits.dtype,
    )
    return xp.astype(xp.reshape(k.y, x.shape), x.dtype, copy=False), cache


def _fast_view(x: Array, gamma: Array, beta: Array, logits: tuple[Array, Array], *,
               eps: float, options: SwitchableOptions, with_bn: bool) -> Array:
    """:func:`_prepare` and :func:`check_scope_counts` for the fast variants, checked once per
    argument signature (:func:`refnorm.core.checks.check_once`); the (N, C, S) copy of ``x``
    in the compute dtype."""
    def check() -> None:
        prepare_inputs(x, gamma, beta, logits, eps=eps, options=options)
        check_scope_counts(x.shape, options, with_bn=with_bn)

    check_once(lambda: ("switchable_norm", with_bn, type(options), options, type(eps), eps,
                        *((type(a), a.shape, a.dtype) for a in (x, gamma, beta, *logits))),
               check)
    dtype = np.float32 if x.dtype == np.float16 else x.dtype
    return np.array(x, dtype=dtype, copy=True).reshape(x.shape[0], x.shape[1],
                                                       math.prod(x.shape[2:]))


@switchable_norm_forward.fast
def _switchable_norm_forward_fast(
    x: Array, gamma: Array, beta: Array, mean_logits: Array, var_logits: Array, *,
    eps: float = 1e-5, options: SwitchableOptions = DEFAULT_OPTIONS,
) -> tuple[Array, SwitchableNormCache]:
    h = _fast_view(x, gamma, beta, (mean_logits, var_logits), eps=eps, options=options,
                   with_bn=True)
    return _fused(x, h, (gamma, beta), (mean_logits, var_logits), eps=eps, options=options,
                  bn=None)


@switchable_norm_eval_forward.fast
def _switchable_norm_eval_forward_fast(
    x: Array, gamma: Array, beta: Array, mean_logits: Array, var_logits: Array,
    running_mean: Array, running_var: Array, *, eps: float = 1e-5,
    options: SwitchableOptions = DEFAULT_OPTIONS,
) -> tuple[Array, SwitchableNormCache]:
    h = _fast_view(x, gamma, beta, (mean_logits, var_logits), eps=eps, options=options,
                   with_bn=False)
    population = _population(running_mean, running_var, like=h)
    return _fused(x, h, (gamma, beta), (mean_logits, var_logits), eps=eps, options=options,
                  bn=population)


@switchable_norm_backward.fast
def _switchable_norm_backward_fast(dy: Array, cache: SwitchableNormCache) -> SwitchableNormGrads:
    """The compact form (:func:`switchable_norm_backward_compact`), fused."""
    if bool(np.any(cache.rstd == 0)):
        # an infinite mixed variance (a given infinite running variance): x_hat is 0 there and
        # no longer holds h - mu_in, which the variance terms of the other channels' LN (or
        # the other samples' BN) statistics need; the compact form takes it from the cached h
        return switchable_norm_backward_compact(dy, cache)
    _, dy_v = backward_view(dy, cache)
    o = cache.options
    g = kernels.sn_backward(dy_v, cache.x_hat, cache.rstd, cache.gamma,
                            (cache.offset, cache.var),
                            (cache.w_mean, cache.w_var), scopes=o.scopes,
                            in_correction=o.in_correction,
                            scope_correction=o.scope_correction, hard=o.hard,
                            frozen=("bn",) if cache.bn_given else ())
    return cast_gradients(cache, g.dx, (g.dgamma, g.dbeta), (g.dmean_logits, g.dvar_logits))
