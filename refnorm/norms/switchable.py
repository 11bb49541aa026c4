"""Switchable Normalization (Luo, Ren, Peng, Zhang & Li, journal version; Luo et al. 2019).

SN normalizes with a learned mixture of the Instance, Layer and Batch Normalization
statistics (the *scopes*), as in the journal version's §3.1:

    y = gamma * (h - sum_k w_k mu_k) / sqrt(sum_k w'_k var_k + eps) + beta        # Eq. (3)
    w = softmax(lambda),  w' = softmax(lambda')                                    # Eq. (5)

with separate ratios for the means (``w``) and the variances (``w'``), as the conference
version's Eq. (1) also writes them. The control parameters start equal (ratios 1/3).

Statistics (Eq. 4) reuse the IN moments: the LN and BN means are means of the IN means, and
their variances follow from the IN moments. The paper writes them in the one-pass form
``mean(var_in + mu_in^2) - mu^2``, which cancels catastrophically in float32 when the data
sit far from zero; refnorm's default (``stats="stable"``) uses the same reuse in the law of
total variance form ``mean(var_in) + mean((mu_in - mu)^2)``, equal in exact arithmetic;
``stats="paper"`` keeps the printed form so that the failure can be shown.

The backward is written from Appendix A (single GPU), Eq. (6)-(14), generalized to separate
mean and variance ratios and to the official code's unbiased IN variance
(:func:`switchable_norm_backward`), and derived a second, compact way through the IN moments
(:func:`switchable_norm_backward_compact`); the tests hold both equal and against finite
differences. Appendix A's printed Eq. (10)-(11) sum over the channels as if ``gamma`` and
``beta`` were scalars; with per-channel parameters the sums run over (n, i, j) only (see the
docs' errata page).

Inference: IN and LN statistics stay per sample; the BN scope switches to population
statistics, either a moving average updated in training (``inference="moving_average"``,
PyTorch's momentum convention) or the paper's *batch average* computed after training by
:func:`batch_average`.

Inputs are (N, C, *spatial), viewed as (N, C, S) with S the number of spatial positions;
(N, C) inputs have S = 1 and only the LN and BN scopes are defined for them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable, Iterator

from refnorm.backend import Array, array_namespace
from refnorm.core import affine_forward, standardize
from refnorm.core.checks import (
    check_cache,
    check_channel_param,
    check_float_array,
    check_like,
    check_momentum,
    prepare_channel_norm,
)
from refnorm.core.running import update_running_stats
from refnorm.norms.base import ChannelNorm, CheckCase, Layer

SCOPES = ("in", "ln", "bn")
STATS_FORMS = ("stable", "paper")


@dataclass(frozen=True)
class SwitchableOptions:
    """The choices that select a variant of SN.

    Attributes
    ----------
    scopes : tuple of str
        Which statistics are mixed, a non-empty ordered subset of ``("in", "ln", "bn")``;
        the control parameters have one entry per scope, in this order. ``("in", "ln")`` is
        the paper's advice for one sample per device; (N, C) inputs need ``("ln", "bn")``.
    stats : {"stable", "paper"}
        How the LN and BN variances are formed from the IN moments (Eq. 4): the law of
        total variance (default) or the paper's printed ``E[h^2] - mu^2``.
    in_correction : {0, 1}
        0: biased IN variance (the paper's Eq. 2). 1: the official code's unbiased IN
        variance (``torch.var`` default), which the LN and BN variances then inherit.
    hard : bool
        Use one-hot ratios, the argmax of each softmax (the paper's "sparse SN", for
        inference and fine-tuning). The control parameters then get zero gradients.
    """

    scopes: tuple[str, ...] = SCOPES
    stats: str = "stable"
    in_correction: int = 0
    hard: bool = False


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
        ``1 / sqrt(var + eps)`` of the mixed variance.
    gamma : array, (C,)
    mu, var : dicts of scope to array
        Each scope's statistics: "in" (N, C, 1), "ln" (N, 1, 1), "bn" (1, C, 1).
    w_mean, w_var : arrays, (K,)
        The ratios ``w`` and ``w'`` for the K scopes of ``options.scopes``.
    frozen_bn : bool
        True at inference: the BN scope used population statistics, which do not depend
        on ``h``.
    options : SwitchableOptions
    x_shape : tuple of int
        The original input shape.
    x_dtype, param_dtype, logit_dtype : dtypes of dx, of dgamma/dbeta, of the logit grads
    comm : communicator or None
        Set by synchronized SN (:mod:`refnorm.sync`): the BN scope pools all devices.
    n_bn : int
        IN groups one BN statistic covers: N, or the total over all devices when synchronized.
    """

    h: Array
    x_hat: Array
    rstd: Array
    gamma: Array
    mu: dict[str, Array]
    var: dict[str, Array]
    w_mean: Array
    w_var: Array
    frozen_bn: bool
    options: SwitchableOptions
    x_shape: tuple[int, ...]
    x_dtype: Any
    param_dtype: Any
    logit_dtype: Any
    comm: Any = None
    n_bn: int = 0


# -- forward -----------------------------------------------------------------------------------


def switchable_norm_forward(
    x: Array,
    gamma: Array,
    beta: Array,
    mean_logits: Array,
    var_logits: Array,
    *,
    eps: float = 1e-5,
    scopes: tuple[str, ...] = SCOPES,
    stats: str = "stable",
    in_correction: int = 0,
    hard: bool = False,
    comm: Any = None,
) -> tuple[Array, SwitchableNormCache]:
    """Switchable Normalization in training: every scope uses this batch's statistics.

    Parameters
    ----------
    x : array, (N, C, *spatial)
    gamma, beta : arrays, (C,)
    mean_logits, var_logits : arrays, (K,)
        The control parameters ``lambda`` and ``lambda'``, one per scope.
    eps : float, > 0
    scopes, stats, in_correction, hard : see :class:`SwitchableOptions`
    comm : communicator, optional
        Synchronize the BN scope over the devices of ``comm`` (synchronized SN, Appendix A
        Eq. 15; see :mod:`refnorm.sync`). The backward then all-reduces once more, and the
        parameter gradients it returns are this device's contributions.

    Returns
    -------
    y : array, ``x.shape``
    cache : SwitchableNormCache
    """
    options = SwitchableOptions(tuple(scopes), stats, in_correction, hard)
    return _forward(x, (gamma, beta), (mean_logits, var_logits), None, eps=eps,
                    options=options, comm=comm)


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
    scopes: tuple[str, ...] = SCOPES,
    stats: str = "stable",
    in_correction: int = 0,
    hard: bool = False,
) -> tuple[Array, SwitchableNormCache]:
    """Switchable Normalization at inference: the BN scope uses population statistics.

    IN and LN statistics are still computed per sample. ``running_mean`` and
    ``running_var``, (C,), come from the moving average or from :func:`batch_average`.
    Other arguments as in :func:`switchable_norm_forward`.
    """
    options = SwitchableOptions(tuple(scopes), stats, in_correction, hard)
    population = (running_mean, running_var)
    return _forward(x, (gamma, beta), (mean_logits, var_logits), population,
                    eps=eps, options=options)


def _forward(
    x: Array,
    params: tuple[Array, Array],
    logits: tuple[Array, Array],
    population: tuple[Array, Array] | None,
    *,
    eps: float,
    options: SwitchableOptions,
    comm: Any = None,
) -> tuple[Array, SwitchableNormCache]:
    gamma, beta = params
    xp, xc, gamma_c, beta_c = prepare_channel_norm(x, gamma, beta, eps=eps)
    comm = comm if population is None and "bn" in options.scopes else None
    _check_options(options, x.shape, training=population is None, synchronized=comm is not None)
    mean_logits, var_logits = logits
    _check_logits("mean_logits", mean_logits, len(options.scopes))
    _check_logits("var_logits", var_logits, len(options.scopes))
    N, C = x.shape[:2]
    h = xp.reshape(xc, (N, C, math.prod(x.shape[2:])))          # (N, C, S)
    mu, var, n_bn = _scope_moments(h, options, comm)             # Eq. (4)
    if comm is not None:
        _check_synchronized_count(n_bn * h.shape[2], x.shape)
    if population is not None and "bn" in options.scopes:
        mu["bn"], var["bn"] = _population(xp, population, C, h.dtype)   # (1, C, 1) each
    w_mean = ratios(xp.astype(mean_logits, h.dtype), hard=options.hard)  # Eq. (5)
    w_var = ratios(xp.astype(var_logits, h.dtype), hard=options.hard)    # Eq. (5)
    mu_mix = _mix(w_mean, mu, options.scopes)                    # (N, C, 1)  Eq. (3)
    var_mix = _mix(w_var, var, options.scopes)                   # (N, C, 1)  Eq. (3)
    x_hat, rstd = standardize(h, mu_mix, var_mix, eps=eps)       # (N, C, S)  Eq. (3)
    y = affine_forward(xp.reshape(x_hat, x.shape), gamma_c, beta_c)   # Eq. (3)
    cache = SwitchableNormCache(
        h=h, x_hat=x_hat, rstd=rstd, gamma=gamma_c, mu=mu, var=var,
        w_mean=w_mean, w_var=w_var, frozen_bn=population is not None, options=options,
        x_shape=tuple(x.shape), x_dtype=x.dtype, param_dtype=gamma.dtype,
        logit_dtype=mean_logits.dtype, comm=comm, n_bn=n_bn,
    )
    return xp.astype(y, x.dtype, copy=False), cache


def scope_moments(h: Array, options: SwitchableOptions, *, comm: Any = None) -> tuple[dict, dict]:
    """Means and variances of the three scopes from the IN moments, Eq. (4).

    Parameters
    ----------
    h : array, (N, C, S)
    options : SwitchableOptions (``stats`` and ``in_correction`` are used)
    comm : communicator, optional
        Synchronize the BN scope across devices (Appendix A, multiple GPUs: mu_sybn and
        sigma_sybn pool the IN moments of every device); IN and LN stay local.

    Returns
    -------
    mu, var : dicts with keys "in" (N, C, 1), "ln" (N, 1, 1), "bn" (1, C, 1)
    """
    mu, var, _ = _scope_moments(h, options, comm)
    return mu, var


def _scope_moments(h: Array, options: SwitchableOptions, comm: Any) -> tuple[dict, dict, int]:
    xp = array_namespace(h)
    S = h.shape[2]
    mu_in = xp.mean(h, axis=2, keepdims=True)                    # (N, C, 1)  Eq. (4)
    d = h - mu_in                                                # (N, C, S)
    var_in = xp.sum(d * d, axis=2, keepdims=True) / (S - options.in_correction)  # Eq. (4)
    mu = {"in": mu_in}
    var = {"in": var_in}
    mu["ln"], var["ln"], _ = pool_in_moments(mu_in, var_in, axis=1, stats=options.stats)
    mu["bn"], var["bn"], n_bn = pool_in_moments(mu_in, var_in, axis=0, stats=options.stats,
                                                comm=comm)
    return mu, var, n_bn


def pool_in_moments(mu_in: Array, var_in: Array, *, axis: int, stats: str,
                    comm: Any = None) -> tuple[Array, Array, int]:
    """Merge the IN moments of the groups along ``axis`` (1: LN, 0: BN) into one mean and
    variance, Eq. (4); with ``comm``, the groups of every device are pooled.

    ``stats="stable"``: mean of the variances plus the variance of the means (the law of
    total variance); ``stats="paper"``: the printed ``mean(var_in + mu_in^2) - mu^2``.
    Everything is a sum over groups divided by their count, so that a device holding no
    sample contributes zeros and a communicator only has to add.

    Returns
    -------
    mu_k, var_k : arrays, (N, 1, 1) for axis 1 or (1, C, 1) for axis 0
    count : int
        The number of groups pooled (over all devices).
    """
    xp = array_namespace(mu_in)
    inner = var_in if stats == "stable" else var_in + mu_in * mu_in      # E[h^2] per (n, c)
    sums = [xp.asarray([float(mu_in.shape[axis])], dtype=mu_in.dtype),
            xp.sum(mu_in, axis=axis, keepdims=True), xp.sum(inner, axis=axis, keepdims=True)]
    if comm is not None:
        sums = comm.allreduce_sum(sums)
    count, sum_mu, sum_inner = sums
    n = int(count[0])
    if n == 0:
        raise ValueError("no samples on any device: the BN scope has nothing to average")
    mu_k = sum_mu / n                                            # Eq. (4)
    if stats == "stable":
        spread = [xp.sum((mu_in - mu_k) * (mu_in - mu_k), axis=axis, keepdims=True)]
        if comm is not None:
            spread = comm.allreduce_sum(spread)
        var_k = (sum_inner + spread[0]) / n                      # law of total variance
    else:
        var_k = sum_inner / n - mu_k * mu_k                      # Eq. (4) as printed
    return mu_k, var_k, n


def ratios(logits: Array, *, hard: bool = False) -> Array:
    """Softmax of the control parameters, Eq. (5); with ``hard``, the one-hot argmax."""
    xp = array_namespace(logits)
    if hard:
        index = xp.argmax(logits)
        return xp.astype(xp.arange(logits.shape[0]) == index, logits.dtype)
    e = xp.exp(logits - xp.max(logits))
    return e / xp.sum(e)


def _mix(w: Array, stats: dict[str, Array], scopes: tuple[str, ...]) -> Array:
    """``sum_k w_k stats_k`` over the scopes, broadcast to (N, C, 1)."""
    total = 0
    for i, scope in enumerate(scopes):
        total = total + w[i] * stats[scope]
    return total


def _population(xp: ModuleType, population: tuple[Array, Array], C: int, dtype: Any):
    running_mean, running_var = population
    check_channel_param("running_mean", running_mean, C)
    check_channel_param("running_var", running_var, C)
    if bool(xp.any(running_var < 0)):
        raise ValueError("running_var must be >= 0 everywhere; got a negative entry")
    return (xp.reshape(xp.astype(running_mean, dtype), (1, C, 1)),
            xp.reshape(xp.astype(running_var, dtype), (1, C, 1)))


def _check_option_values(options: SwitchableOptions) -> None:
    scopes = options.scopes
    if not scopes or len(set(scopes)) != len(scopes) or not set(scopes) <= set(SCOPES):
        raise ValueError(
            f"scopes must be a non-empty subset of {SCOPES} without repeats; got {scopes}")
    if options.stats not in STATS_FORMS:
        raise ValueError(f"stats must be one of {STATS_FORMS}; got {options.stats!r}")
    if options.in_correction not in (0, 1) or isinstance(options.in_correction, bool):
        raise ValueError(f"in_correction must be 0 or 1; got {options.in_correction!r}")


def _check_options(options: SwitchableOptions, shape: tuple[int, ...], *, training: bool,
                   synchronized: bool = False):
    """Check the option values, then that every statistic used covers more than one value.

    A synchronized BN scope is checked after pooling (:func:`_check_synchronized_count`).
    """
    _check_option_values(options)
    N, C = shape[:2]
    S = math.prod(shape[2:])
    if S - options.in_correction < 1:
        raise ValueError(
            f"in_correction=1 (unbiased IN variance) needs more than one spatial position; "
            f"x of shape {tuple(shape)} has {S}")
    counts = {"in": S, "ln": C * S, "bn": N * S}
    for scope in options.scopes:
        if scope == "bn" and (not training or synchronized):
            continue  # population statistics, or pooled over devices
        if counts[scope] < 2:
            hint = (" (use scopes=('ln', 'bn') for (N, C) inputs; the official code returns NaN"
                    " for IN on 1x1 maps)" if scope == "in" else "")
            raise ValueError(
                f"the {scope.upper()} scope needs more than 1 value per statistic; x of shape "
                f"{tuple(shape)} gives {counts[scope]}{hint}")


def _check_synchronized_count(count: int, shape: tuple[int, ...]) -> None:
    if count < 2:
        raise ValueError(f"the synchronized BN scope needs more than 1 value per statistic over "
                         f"all devices; got {count} (this device's x has shape {tuple(shape)})")


def _check_logits(name: str, logits: Array, K: int) -> None:
    check_float_array(name, logits)
    if tuple(logits.shape) != (K,):
        raise ValueError(
            f"{name} must have shape ({K},), one control parameter per scope; "
            f"got shape {tuple(logits.shape)}")


# -- backward, Appendix A ---------------------------------------------------------------------


def switchable_norm_backward(
    dy: Array, cache: SwitchableNormCache
) -> tuple[Array, Array, Array, Array, Array]:
    """Backward of SN written from Appendix A, Eq. (6)-(14), with separate ratios.

    Parameters
    ----------
    dy : array, (N, C, *spatial)
    cache : SwitchableNormCache

    Returns
    -------
    dx : array, (N, C, *spatial)
    dgamma, dbeta : arrays, (C,)
    dmean_logits, dvar_logits : arrays, (K,)
        Zero with hard ratios (the argmax has no gradient).
    """
    xp, dy_v = _check_backward(dy, cache)
    c = cache
    # Eq. (10), (11), corrected: per-channel gamma and beta sum over (n, i, j) only
    dgamma = xp.sum(dy_v * c.x_hat, axis=(0, 2))                       # (C,)
    dbeta = xp.sum(dy_v, axis=(0, 2))                                  # (C,)
    dx_hat = dy_v * xp.reshape(c.gamma, (1, -1, 1))                   # (N, C, S)  Eq. (6)
    dvar = -0.5 * c.rstd * c.rstd * xp.sum(dx_hat * c.x_hat, axis=2, keepdims=True)  # Eq. (7)
    dmu = -c.rstd * xp.sum(dx_hat, axis=2, keepdims=True)             # (N, C, 1)  Eq. (8)
    # Eq. (9); on several devices Eq. (22): dh = Term1 + Term2 + Term3
    dh = dx_hat * c.rstd                                               # Term1, Eq. (23)
    sums = _scope_gradient_sums(c, dvar, dmu)                          # one all-reduce if synced
    for i, scope in enumerate(c.options.scopes):
        if scope not in sums:
            continue  # frozen BN scope: population statistics do not depend on h
        dvar_k, dmu_k = sums[scope]                                    # sums of Eq. (7), (8)
        n_k = _groups_per_statistic(c, scope)                          # 1, C, N (or sum of N)
        dh = dh + c.w_var[i] * dvar_k * _dvar_k_dh(c, scope, n_k)      # Term2, Eq. (24)
        dh = dh + c.w_mean[i] * dmu_k / (n_k * c.h.shape[2])           # Term3, Eq. (25)
    dlogits = _dlogits(c, dmu, dvar)                                   # Eq. (12)-(14)
    return _cast_grads(xp, c, dh, (dgamma, dbeta), dlogits)


def _groups_per_statistic(cache: SwitchableNormCache, scope: str) -> int:
    """How many IN groups (n, c) one statistic of ``scope`` covers: 1, C or N.

    For a synchronized BN scope, N summed over all devices (the P N of Eq. 24-25).
    """
    return {"in": 1, "ln": cache.h.shape[1], "bn": cache.n_bn}[scope]


def _scope_gradient_sums(cache: SwitchableNormCache, dvar: Array,
                         dmu: Array) -> dict[str, tuple[Array, Array]]:
    """For each scope whose statistics depend on h: the sums of Eq. (7) and Eq. (8) entries
    over the (n, c) one statistic feeds (none for IN, over c for LN, over n for BN).

    Synchronized, the BN sums also run over every device (one all-reduce of two (C,)
    arrays), as Term2 and Term3 of Eq. (24)-(25) sum over p and n.
    """
    xp = array_namespace(dvar)
    sums = {}
    for scope in cache.options.scopes:
        if scope == "in":
            sums[scope] = (dvar, dmu)
        elif scope == "ln":
            sums[scope] = (xp.sum(dvar, axis=1, keepdims=True), xp.sum(dmu, axis=1, keepdims=True))
        elif not cache.frozen_bn:
            local = [xp.sum(dvar, axis=0, keepdims=True), xp.sum(dmu, axis=0, keepdims=True)]
            sums[scope] = tuple(local if cache.comm is None else cache.comm.allreduce_sum(local))
    return sums


def _dvar_k_dh(cache: SwitchableNormCache, scope: str, n_k: int) -> Array:
    """d var_k / d h for each element, (N, C, S).

    With the biased IN variance this is Appendix A's ``2 (h - mu_k) / |I_k|``. With the
    unbiased one (``in_correction=1``) the within-group part divides by S - 1:
    ``(2 / n_k) ((h - mu_in) / (S - 1) + (mu_in - mu_k) / S)``; both are this expression.
    """
    S = cache.h.shape[2]
    mu_in, mu_k = cache.mu["in"], cache.mu[scope]
    within = (cache.h - mu_in) / (S - cache.options.in_correction)
    between = (mu_in - mu_k) / S
    return (2.0 / n_k) * (within + between)


def _dlogits(cache: SwitchableNormCache, dmu: Array, dvar: Array) -> tuple[Array, Array]:
    """Eq. (12)-(14) with separate ratios: dL/dlambda_k = w_k (S_k - sum_j w_j S_j).

    ``S_k = sum_{n,c} dL/dmu_nc * mu_k`` for the mean ratios and
    ``sum_{n,c} dL/dvar_nc * var_k`` for the variance ratios. Expanding ``sum_j`` gives the
    printed ``w_k (1 - w_k) S_k - sum_{j != k} w_k w_j S_j``.
    """
    xp = array_namespace(dmu)
    scopes = cache.options.scopes
    if cache.options.hard:
        zeros = xp.zeros((len(scopes),), dtype=dmu.dtype)
        return zeros, zeros
    s_mean = xp.stack([xp.sum(dmu * cache.mu[k]) for k in scopes])     # (K,)
    s_var = xp.stack([xp.sum(dvar * cache.var[k]) for k in scopes])    # (K,)
    w, wv = cache.w_mean, cache.w_var
    return w * (s_mean - xp.sum(w * s_mean)), wv * (s_var - xp.sum(wv * s_var))


def _check_backward(dy: Array, cache: SwitchableNormCache) -> tuple[ModuleType, Array]:
    check_cache(cache, SwitchableNormCache)
    check_like("dy", dy, cache.x_shape)
    xp = array_namespace(dy, cache.h)
    dy_c = xp.astype(dy, cache.h.dtype, copy=False)
    return xp, xp.reshape(dy_c, cache.h.shape)


def _cast_grads(xp: ModuleType, cache: SwitchableNormCache, dh: Array,
                affine: tuple[Array, Array], dlogits: tuple[Array, Array]) -> tuple:
    dx = xp.astype(xp.reshape(dh, cache.x_shape), cache.x_dtype, copy=False)
    dgamma, dbeta = (xp.astype(g, cache.param_dtype, copy=False) for g in affine)
    dml, dvl = (xp.astype(g, cache.logit_dtype, copy=False) for g in dlogits)
    return dx, dgamma, dbeta, dml, dvl


# -- backward, compact ------------------------------------------------------------------------


def switchable_norm_backward_compact(
    dy: Array, cache: SwitchableNormCache
) -> tuple[Array, Array, Array, Array, Array]:
    """The same gradients as :func:`switchable_norm_backward`, derived through the IN moments.

    Every scope's statistics are functions of the IN moments ``(mu_in, var_in)`` (Eq. 4),
    so the gradients of the mixed ``mu`` and ``var`` (Eq. 7, 8) are first collected onto
    ``mu_in`` and ``var_in``, and only then taken to ``h`` with the IN derivatives
    ``d mu_in / dh = 1 / S`` and ``d var_in / dh = 2 (h - mu_in) / (S - correction)``.
    With ``var_k = mean(var_in) + mean((mu_in - mu_k)^2)`` over a scope of n_k groups:
    ``d var_k / d var_in = 1 / n_k`` and ``d var_k / d mu_in = 2 (mu_in - mu_k) / n_k``.
    """
    xp, dy_v = _check_backward(dy, cache)
    c = cache
    dgamma = xp.sum(dy_v * c.x_hat, axis=(0, 2))
    dbeta = xp.sum(dy_v, axis=(0, 2))
    dx_hat = dy_v * xp.reshape(c.gamma, (1, -1, 1))
    dvar = -0.5 * c.rstd * c.rstd * xp.sum(dx_hat * c.x_hat, axis=2, keepdims=True)
    dmu = -c.rstd * xp.sum(dx_hat, axis=2, keepdims=True)
    dmu_in, dvar_in = 0, 0                                             # (N, C, 1) after the loop
    sums = _scope_gradient_sums(c, dvar, dmu)
    for i, scope in enumerate(c.options.scopes):
        if scope not in sums:
            continue
        dvar_k, dmu_k = sums[scope]
        n_k = _groups_per_statistic(c, scope)
        g_var = c.w_var[i] * dvar_k / n_k                              # onto each var_in
        dvar_in = dvar_in + g_var
        dmu_in = dmu_in + c.w_mean[i] * dmu_k / n_k
        dmu_in = dmu_in + g_var * 2.0 * (c.mu["in"] - c.mu[scope])     # var_k's between part
    S = c.h.shape[2]
    dh = (dx_hat * c.rstd + dmu_in / S
          + dvar_in * 2.0 * (c.h - c.mu["in"]) / (S - c.options.in_correction))
    return _cast_grads(xp, c, dh, (dgamma, dbeta), _dlogits(c, dmu, dvar))


# -- layer and batch average ------------------------------------------------------------------


class SwitchableNorm(ChannelNorm):
    """Switchable Normalization layer.

    Parameters
    ----------
    num_channels : int
    eps : float, default 1e-5
    scopes, stats, in_correction, hard : see :class:`SwitchableOptions`
    inference : {"moving_average", "batch_average"}
        How the BN scope gets population statistics. "moving_average" updates
        ``state`` in every training forward (PyTorch's convention: ``momentum`` weights the
        new batch, and the BN-scope variance is scaled by m / (m - 1) with m its values per
        channel; with ``in_correction=1`` that variance is already partly unbiased, so the
        factor over-corrects it slightly, as documented on the conventions page).
        "batch_average" leaves the state alone in training; :func:`batch_average` sets it
        after training, as the paper does, and sets ``population_ready``. After loading a
        saved state into such a layer, set ``layer.population_ready = True`` yourself.
    momentum : float, default 0.1
    dtype, xp : see :class:`~refnorm.norms.base.ChannelNorm`

    Params: gamma, beta (C,), mean_logits, var_logits (K,) initialised to zeros (ratios 1/K).
    State (with the BN scope): running_mean, running_var (C,).
    """

    check_cases = (
        CheckCase((3, 4, 3, 3)),
        CheckCase((4, 6), {"scopes": ("ln", "bn")}),
        CheckCase((2, 4, 3, 2), {"scopes": ("in", "ln")}),
        CheckCase((3, 4, 3, 3), {"in_correction": 1, "stats": "paper"}),
        CheckCase((3, 4, 3, 3), training=False),
    )

    def __init__(
        self,
        num_channels: int,
        *,
        eps: float = 1e-5,
        scopes: tuple[str, ...] = SCOPES,
        stats: str = "stable",
        in_correction: int = 0,
        hard: bool = False,
        inference: str = "moving_average",
        momentum: float = 0.1,
        dtype: Any = None,
        xp: ModuleType | None = None,
    ) -> None:
        super().__init__(num_channels, eps=eps, dtype=dtype, xp=xp)
        self.options = SwitchableOptions(tuple(scopes), stats, in_correction, hard)
        _check_option_values(self.options)
        if inference not in ("moving_average", "batch_average"):
            raise ValueError(
                f"inference must be 'moving_average' or 'batch_average'; got {inference!r}")
        check_momentum(momentum)
        self.inference, self.momentum = inference, momentum
        K = len(self.options.scopes)
        self.params["mean_logits"] = self.xp.zeros((K,), dtype=self.dtype)
        self.params["var_logits"] = self.xp.zeros((K,), dtype=self.dtype)
        if "bn" in self.options.scopes:
            self.state = {"running_mean": self.xp.zeros((num_channels,), dtype=self.dtype),
                          "running_var": self.xp.ones((num_channels,), dtype=self.dtype)}
        self.population_ready = inference == "moving_average"
        self._recording: list | None = None
        self.comm: Any = None  # a communicator synchronizes the BN scope (refnorm.sync)

    def current_ratios(self) -> dict[str, dict[str, float]]:
        """The current mean and variance ratios by scope, as Python floats."""
        hard = self.options.hard
        out = {}
        for kind in ("mean", "var"):
            w = ratios(self.params[f"{kind}_logits"], hard=hard)
            out[kind] = {s: float(w[i]) for i, s in enumerate(self.options.scopes)}
        return out

    def _forward(self, x: Array, training: bool) -> tuple[Array, SwitchableNormCache]:
        p, o = self.params, self.options
        args = (x, p["gamma"], p["beta"], p["mean_logits"], p["var_logits"])
        kw = {"eps": self.eps, "scopes": o.scopes, "stats": o.stats,
              "in_correction": o.in_correction, "hard": o.hard}
        if not training and "bn" in o.scopes:
            if not self.population_ready:
                raise RuntimeError(
                    "SwitchableNorm(inference='batch_average') has no population statistics "
                    "yet: call refnorm.norms.switchable.batch_average(model, batches) first")
            return switchable_norm_eval_forward(
                *args, self.state["running_mean"], self.state["running_var"], **kw)
        y, cache = switchable_norm_forward(*args, comm=self.comm, **kw)
        if training and "bn" in o.scopes:
            self._observe(cache)
        return y, cache

    def _observe(self, cache: SwitchableNormCache) -> None:
        xp, C = self.xp, self.num_channels
        mean = xp.reshape(cache.mu["bn"], (C,))
        var = xp.reshape(cache.var["bn"], (C,))
        count = cache.n_bn * cache.h.shape[2]  # every device's values when synchronized
        if self._recording is not None:
            self._recording.append((count, mean, var))
        elif self.inference == "moving_average":
            running_mean, running_var = update_running_stats(
                self.state["running_mean"], self.state["running_var"], mean, var,
                count=count, momentum=self.momentum)
            self.state = {"running_mean": running_mean, "running_var": running_var}

    def _backward(self, dy: Array, cache: SwitchableNormCache):
        dx, dgamma, dbeta, dml, dvl = switchable_norm_backward(dy, cache)
        return dx, {"gamma": dgamma, "beta": dbeta, "mean_logits": dml, "var_logits": dvl}


def iter_layers(model: Any) -> Iterator[Layer]:
    """Every :class:`~refnorm.norms.base.Layer` in ``model``.

    ``model`` is a layer, an object with a ``layers()`` method, or a list/tuple of those.
    """
    if isinstance(model, Layer):
        yield model
    if hasattr(model, "layers") and callable(model.layers):
        for sub in model.layers():
            yield from iter_layers(sub)
    elif isinstance(model, (list, tuple)):
        for sub in model:
            yield from iter_layers(sub)


def _run(model: Any, x: Array) -> Array:
    if isinstance(model, (list, tuple)):
        for layer in model:
            x = _run(layer, x)
        return x
    return model.forward(x, training=True)


def batch_average(model: Any, batches: Iterable[Array]) -> int:
    """Set the BN-scope population statistics of every SN layer by the paper's batch average.

    The network is frozen: its parameters are not touched and every layer's state (BN
    running statistics, SN moving averages) is restored afterwards. Each batch is fed in
    training mode, each SN layer records its BN-scope (count, mean, variance) per batch,
    and the records are merged by the law of total variance::

        mean = sum_b n_b mu_b / n
        var  = sum_b n_b var_b / n + sum_b n_b (mu_b - mean)^2 / n

    which is exactly the mean and the (biased) variance of all values fed, per channel, with
    the default biased IN variance. (With ``in_correction=1`` each batch's BN-scope variance
    is the official code's mixture, mean of unbiased IN variances plus variance of IN means,
    and the merge pools those.) The paper says it averages "the means and variances" of the
    batches; averaging variances alone would miss the spread of the batch means. Its official
    code accumulates means and second moments (``var_b + mu_b^2``) and subtracts the squared
    mean: the same number as the merge above, but with the float32 cancellation of Eq. (4).

    Parameters
    ----------
    model : a layer, an object with ``forward(x, training)`` and ``layers()``, or a
        list/tuple of layers applied in order
    batches : iterable of arrays

    Returns
    -------
    int : the number of batches fed
    """
    layers = list(iter_layers(model))
    targets = [l for l in layers if isinstance(l, SwitchableNorm) and "bn" in l.options.scopes]
    if not targets:
        raise ValueError("batch_average: the model has no SwitchableNorm layer with a BN scope")
    saved = [copy.deepcopy(l.state) for l in layers]
    for layer in targets:
        layer._recording = []
    fed = 0
    try:
        for x in batches:
            _run(model, x)
            fed += 1
    finally:
        for layer, state in zip(layers, saved):
            layer.state = state
        records = [layer._recording for layer in targets]
        for layer in targets:
            layer._recording = None
    if fed == 0:
        raise ValueError("batch_average needs at least one batch; got none")
    for layer, record in zip(targets, records):
        layer.state = _merge_records(layer.xp, record, layer.state["running_mean"].dtype)
        layer.population_ready = True
    return fed


def _merge_records(xp: ModuleType, record: list, dtype: Any) -> dict[str, Array]:
    """Merge per-batch (count, mean, biased var) into the statistics of all values."""
    n = sum(count for count, _, _ in record)
    mean = sum(count * xp.astype(m, xp.float64) for count, m, _ in record) / n
    within = sum(count * xp.astype(v, xp.float64) for count, _, v in record) / n
    between = sum(count * (xp.astype(m, xp.float64) - mean) ** 2 for count, m, _ in record) / n
    return {"running_mean": xp.astype(mean, dtype), "running_var": xp.astype(within + between, dtype)}
