"""Batch Normalization (Ioffe & Szegedy, 2015).

Statistics per channel over the batch and spatial axes, as written in Luo et al.,
*Switchable Normalization* (journal version), Eq. (1)-(2) with ``I_bn = {(n, i, j)}``, and in
Gitman & Ginsburg, *Comparison of BN and WN*, §3.1:

    y = gamma * (x - E_B[x]) / sqrt(Var_B[x] + eps) + beta          # SN Eq. (1)
    E_B, Var_B over (N, *spatial) for each channel, Var biased      # SN Eq. (2)

Training normalizes with the batch statistics and updates the running statistics
(:func:`refnorm.core.running.update_running_stats`); evaluation normalizes with the running
statistics. The backward comes twice: the closed form (:func:`batch_norm_backward`), and a
step-by-step backward through every node of the forward graph
(:func:`batch_norm_backward_graph`) that a lesson can follow; the tests hold them equal.

The fast path (:mod:`refnorm.dispatch`) is at the end of the file: the same checks, then the
fused loops of :mod:`refnorm.kernels.norms`.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from refnorm.backend import Array, array_namespace, on_device
from refnorm.core import affine_backward, affine_forward, moments, reduced_count, standardize
from refnorm.core.affine import channel_view, non_channel_axes
from refnorm.core.checks import (
    check_cache,
    check_count,
    check_like,
    check_momentum,
    prepare_channel_norm,
)
from refnorm.core.moments import check_variance_finite
from refnorm.core.running import update_running_stats
from refnorm.core.standardize import standardize_backward
from refnorm.dispatch import dispatched
from refnorm.kernels import norms as kernels
from refnorm.layer import CheckCase
from refnorm.norms.base import (
    ChannelNorm,
    cast_grads,
    fast_backward_args,
    fast_channel_args,
    fast_grads,
    frozen_statistics,
    upstream,
)


@dataclass(frozen=True)
class BatchNormCache:
    """What :func:`batch_norm_forward` (or the eval forward) saves for :func:`batch_norm_backward`.

    Attributes
    ----------
    x_hat : array, (N, C, *spatial)
        The standardized input, in the compute dtype. Saved instead of ``x``: the closed-form
        backward needs ``x_hat`` and never ``x - mu``.
    rstd : array, (1, C, 1, ...)
        ``1 / sqrt(var + eps)``; saved instead of ``std`` because the backward multiplies by it.
    gamma : array, (C,)
        The scale in the compute dtype (``dx_hat = dy * gamma``).
    mean, var : arrays, (1, C, 1, ...)
        The statistics used (batch, biased; or running). The backward does not need them; the
        layer's running update and a reader do.
    reduce_axes : tuple of int
        (0, 2, 3, ...) when the statistics came from ``x``; () when they were the running
        statistics, which ``x`` reaches through no path.
    x_dtype, param_dtype : dtypes
        The dtypes ``dx`` and ``dgamma``/``dbeta`` are returned in.
    """

    x_hat: Array
    rstd: Array
    gamma: Array
    mean: Array
    var: Array
    reduce_axes: tuple[int, ...]
    x_dtype: Any
    param_dtype: Any


@dispatched
def batch_norm_forward(
    x: Array, gamma: Array, beta: Array, *, eps: float = 1e-5
) -> tuple[Array, BatchNormCache]:
    """Batch Normalization in training: normalize with the batch statistics.

    Parameters
    ----------
    x : array, (N, C, *spatial)
        Real floating; float16 computes in float32 and returns float16.
    gamma, beta : arrays, (C,)
    eps : float, > 0
        Added to the variance inside the square root.
    path : {"reference", "fast"}, optional
        Which implementation computes (:mod:`refnorm.dispatch`); default: the process-wide
        choice, else the reference.

    Returns
    -------
    y : array, ``x.shape``, dtype of ``x``
    cache : BatchNormCache
        ``cache.mean`` and ``cache.var`` (1, C, 1, ...) are the batch statistics
        (biased variance) for the running update.

    Raises
    ------
    ValueError
        If some channel has a single value (N * prod(spatial) == 1).
    """
    xp, xc, gamma_c, beta_c = prepare_channel_norm(x, gamma, beta, eps=eps)
    reduce_axes = non_channel_axes(x.ndim)                       # (0, 2, 3, ...)
    check_count(reduced_count(x.shape, reduce_axes),
                what="batch normalization in training", shape=x.shape)
    mu, var = moments(xc, reduce_axes)                # (1, C, 1, 1)  SN Eq. (2), GG Eq. (2)
    x_hat, rstd = standardize(xc, mu, var, eps=eps)   # (N, C, H, W)  SN Eq. (1), GG Eq. (1)
    y = affine_forward(x_hat, gamma_c, beta_c)        # (N, C, H, W)  SN Eq. (1), GG Eq. (1)
    cache = BatchNormCache(x_hat=x_hat, rstd=rstd, gamma=gamma_c, mean=mu, var=var,
                           reduce_axes=reduce_axes, x_dtype=x.dtype, param_dtype=gamma.dtype)
    return xp.astype(y, x.dtype, copy=False), cache


@dispatched
def batch_norm_eval_forward(
    x: Array,
    gamma: Array,
    beta: Array,
    running_mean: Array,
    running_var: Array,
    *,
    eps: float = 1e-5,
) -> tuple[Array, BatchNormCache]:
    """Batch Normalization at inference: normalize with the running statistics.

    Parameters
    ----------
    x : array, (N, C, *spatial)
    gamma, beta, running_mean, running_var : arrays, (C,)
    eps : float, > 0
    path : {"reference", "fast"}, optional
        As in :func:`batch_norm_forward`.

    Returns
    -------
    y : array, ``x.shape``
    cache : BatchNormCache with ``reduce_axes=()``; its backward is
        ``dx = dy * gamma / sqrt(running_var + eps)``.
    """
    xp, xc, gamma_c, beta_c = prepare_channel_norm(x, gamma, beta, eps=eps)
    mu, var = frozen_statistics(running_mean, running_var, like=xc)  # (1, C, 1, 1)
    x_hat, rstd = standardize(xc, mu, var, eps=eps)              # (N, C, H, W)
    y = affine_forward(x_hat, gamma_c, beta_c)                   # (N, C, H, W)
    cache = BatchNormCache(x_hat=x_hat, rstd=rstd, gamma=gamma_c, mean=mu, var=var,
                           reduce_axes=(), x_dtype=x.dtype, param_dtype=gamma.dtype)
    return xp.astype(y, x.dtype, copy=False), cache


@dispatched
def batch_norm_backward(dy: Array, cache: BatchNormCache) -> tuple[Array, Array, Array]:
    """Closed-form backward of :func:`batch_norm_forward` or :func:`batch_norm_eval_forward`.

    With batch statistics, per channel over the m = N * prod(spatial) values of axes
    (0, 2, 3, ...), ``dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat))``
    with ``dx_hat = gamma * dy`` (derived in :mod:`refnorm.core.standardize`). With running
    statistics, ``dx = rstd * dx_hat``.

    Parameters
    ----------
    dy : array, (N, C, *spatial)
    cache : BatchNormCache
    path : {"reference", "fast"}, optional
        As in :func:`batch_norm_forward`.

    Returns
    -------
    dx : array, (N, C, *spatial), dtype of ``x``
    dgamma, dbeta : arrays, (C,), dtype of ``gamma``
    """
    check_cache(cache, BatchNormCache)
    xp, dy_c = upstream(dy, cache.x_hat)
    dx_hat, dgamma, dbeta = affine_backward(dy_c, cache.x_hat, cache.gamma)  # (N,C,H,W), (C,)x2
    if cache.reduce_axes:                                        # (0, 2, 3): batch statistics
        dx = standardize_backward(dx_hat, cache.x_hat, cache.rstd, cache.reduce_axes)
    else:                                                        # running statistics
        dx = dx_hat * cache.rstd
    return cast_grads(xp, dx, dgamma, dbeta, x_dtype=cache.x_dtype, param_dtype=cache.param_dtype)


@dataclass(frozen=True)
class BatchNormGraphCache:
    """Every intermediate node of :func:`batch_norm_forward_graph`, for the staged backward.

    The nodes, in forward order (shapes for an (N, C, H, W) input)::

        mu      = mean(x)              (1, C, 1, 1), its sum in float64
        xmu     = x - mu               (N, C, H, W)
        sq      = xmu ** 2             (N, C, H, W)
        var     = mean(sq)             (1, C, 1, 1)
        std     = sqrt(var + eps)      (1, C, 1, 1)
        inv_std = 1 / std              (1, C, 1, 1)
        x_hat   = xmu * inv_std        (N, C, H, W)
        y       = gamma * x_hat + beta (N, C, H, W)

    The staged backward needs ``xmu``, ``std``, ``inv_std``, ``x_hat`` and ``gamma``.
    """

    xmu: Array
    std: Array
    inv_std: Array
    x_hat: Array
    gamma: Array
    reduce_axes: tuple[int, ...]
    x_dtype: Any
    param_dtype: Any


def batch_norm_forward_graph(
    x: Array, gamma: Array, beta: Array, *, eps: float = 1e-5
) -> tuple[Array, BatchNormGraphCache]:
    """The training forward of Batch Normalization one graph node at a time.

    Same arguments, same result as :func:`batch_norm_forward`; saves every node that
    :func:`batch_norm_backward_graph` walks back through.

    No ``path``: the staged form exists to be read node by node; :func:`batch_norm_forward`
    computes the same and has a fast variant.
    """
    xp, xc, gamma_c, beta_c = prepare_channel_norm(x, gamma, beta, eps=eps)
    axes = non_channel_axes(x.ndim)                              # (0, 2, 3, ...)
    m = reduced_count(x.shape, axes)
    check_count(m, what="batch normalization in training", shape=x.shape)
    g = channel_view(gamma_c, x.ndim)                            # (1, C, 1, 1)
    b = channel_view(beta_c, x.ndim)                             # (1, C, 1, 1)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow raises just below
        total = xp.sum(xc, axis=axes, dtype=xp.float64, keepdims=True)  # as moments() does
        mu = xp.astype(total / m, xc.dtype)                      # (1, C, 1, 1)
        if xc.dtype == xp.float64:  # as moments() refines a float64 mean
            mu = mu + xp.sum(xc - mu, axis=axes, keepdims=True) / m   # (1, C, 1, 1)
        xmu = xc - mu                                            # (N, C, H, W)
        sq = xmu * xmu                                           # (N, C, H, W)
        var = xp.mean(sq, axis=axes, keepdims=True)              # (1, C, 1, 1)
    check_variance_finite(var, xc)  # an overflow: the error of refnorm.core.moments.moments
    std = xp.sqrt(var + float(eps))                              # (1, C, 1, 1)
    inv_std = 1.0 / std                                          # (1, C, 1, 1)
    x_hat = xmu * inv_std                                        # (N, C, H, W)
    y = g * x_hat + b                                            # (N, C, H, W)
    cache = BatchNormGraphCache(
        xmu=xmu, std=std, inv_std=inv_std, x_hat=x_hat, gamma=gamma_c,
        reduce_axes=axes, x_dtype=x.dtype, param_dtype=gamma.dtype,
    )
    return xp.astype(y, x.dtype, copy=False), cache


def batch_norm_backward_graph(
    dy: Array, cache: BatchNormGraphCache
) -> tuple[Array, Array, Array]:
    """Backward of :func:`batch_norm_forward_graph`, node by node in reverse order.

    Returns the same ``(dx, dgamma, dbeta)`` as :func:`batch_norm_backward`.

    No ``path``: the staged form exists to be read node by node; :func:`batch_norm_backward`
    computes the same and has a fast variant.
    """
    check_cache(cache, BatchNormGraphCache)
    check_like("dy", dy, cache.x_hat.shape)
    xp = array_namespace(dy, cache.x_hat)
    dy = xp.astype(dy, cache.x_hat.dtype, copy=False)
    axes = cache.reduce_axes
    m = reduced_count(cache.x_hat.shape, axes)
    # y = gamma * x_hat + beta
    dbeta = xp.sum(dy, axis=axes)                                        # (C,)
    dgamma = xp.sum(dy * cache.x_hat, axis=axes)                         # (C,)
    dx_hat = dy * channel_view(cache.gamma, dy.ndim)                     # (N, C, H, W)
    # x_hat = xmu * inv_std: two inputs, two gradients
    dinv_std = xp.sum(dx_hat * cache.xmu, axis=axes, keepdims=True)      # (1, C, 1, 1)
    dxmu = dx_hat * cache.inv_std                                        # (N, C, H, W)
    # inv_std = 1 / std
    dstd = -dinv_std / (cache.std * cache.std)                           # (1, C, 1, 1)
    # std = sqrt(var + eps)
    dvar = dstd * 0.5 / cache.std                                        # (1, C, 1, 1)
    # var = mean(sq): every sq element receives dvar / m
    dsq = xp.ones_like(cache.xmu) * (dvar / m)                           # (N, C, H, W)
    # sq = xmu ** 2: xmu now has a second incoming gradient
    dxmu = dxmu + 2.0 * cache.xmu * dsq                                  # (N, C, H, W)
    # xmu = x - mu: x receives dxmu directly, mu receives -sum(dxmu)
    dmu = -xp.sum(dxmu, axis=axes, keepdims=True)                        # (1, C, 1, 1)
    # mu = mean(x): every x element receives dmu / m
    dx = dxmu + xp.ones_like(dxmu) * (dmu / m)                           # (N, C, H, W)
    return (
        xp.astype(dx, cache.x_dtype, copy=False),
        xp.astype(dgamma, cache.param_dtype, copy=False),
        xp.astype(dbeta, cache.param_dtype, copy=False),
    )


class BatchNorm(ChannelNorm):
    """Batch Normalization layer with running statistics for inference.

    Parameters
    ----------
    num_channels : int
    eps : float, default 1e-5
    momentum : float, default 0.1
        Weight of the new batch in the running average (PyTorch's convention).
    dtype, xp, device : see :class:`~refnorm.layer.Layer`

    State
    -----
    running_mean : (C,), starts at 0
    running_var : (C,), starts at 1; updated with the unbiased batch variance
    """

    check_cases = (
        CheckCase((4, 3, 5, 5)),
        CheckCase((6, 4)),
        CheckCase((2, 3, 4, 3, 2)),
        CheckCase((4, 3, 5, 5), training=False),
    )

    def __init__(
        self,
        num_channels: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        dtype: Any = None,
        xp: ModuleType | None = None,
        device: Any = None,
    ) -> None:
        super().__init__(num_channels, eps=eps, dtype=dtype, xp=xp, device=device)
        check_momentum(momentum)
        self.momentum = momentum
        where = on_device(self.device)
        self.state = {
            "running_mean": self.xp.zeros((num_channels,), dtype=self.dtype, **where),
            "running_var": self.xp.ones((num_channels,), dtype=self.dtype, **where),
        }

    def _forward(self, x: Array, training: bool) -> tuple[Array, BatchNormCache]:
        gamma, beta = self.params["gamma"], self.params["beta"]
        if not training:
            stats = (self.state["running_mean"], self.state["running_var"])
            return batch_norm_eval_forward(x, gamma, beta, *stats, eps=self.eps,
                                           path=self.compute_path())
        y, cache = batch_norm_forward(x, gamma, beta, eps=self.eps, path=self.compute_path())
        C = self.num_channels
        mean, var = self.xp.reshape(cache.mean, (C,)), self.xp.reshape(cache.var, (C,))
        running_mean, running_var = update_running_stats(
            self.state["running_mean"], self.state["running_var"], mean, var,
            count=reduced_count(x.shape, cache.reduce_axes), momentum=self.momentum,
        )
        self.state = {"running_mean": running_mean, "running_var": running_var}
        return y, cache

    def _backward(self, dy: Array, cache: BatchNormCache) -> tuple[Array, dict[str, Array]]:
        dx, dgamma, dbeta = batch_norm_backward(dy, cache, path=self.compute_path())
        return dx, {"gamma": dgamma, "beta": dbeta}


# -- the fast path: the same checks, then the fused loops ----------------------------------------


@batch_norm_forward.fast
def _batch_norm_forward_fast(x: Array, gamma: Array, beta: Array, *,
                             eps: float = 1e-5) -> tuple[Array, BatchNormCache]:
    reduce_axes = non_channel_axes(x.ndim)
    gamma_c, beta_c = fast_channel_args(
        "batch_norm", x, gamma, beta, eps,
        check=lambda: check_count(reduced_count(x.shape, reduce_axes),
                                  what="batch normalization in training", shape=x.shape))
    k = kernels.bn_forward(x, gamma_c, beta_c, eps)
    return k.y, BatchNormCache(x_hat=k.x_hat, rstd=k.rstd, gamma=gamma_c, mean=k.mean,
                               var=k.var, reduce_axes=reduce_axes, x_dtype=x.dtype,
                               param_dtype=gamma.dtype)


@batch_norm_backward.fast
def _batch_norm_backward_fast(dy: Array, cache: BatchNormCache) -> tuple[Array, Array, Array]:
    check_cache(cache, BatchNormCache)
    dy_c = fast_backward_args("batch_norm_backward", dy, cache.x_hat, cache.rstd, cache.gamma,
                              per_sample=False)
    backward = kernels.bn_backward if cache.reduce_axes else kernels.eval_backward
    g = backward(dy_c, cache.x_hat, cache.rstd, cache.gamma)
    return fast_grads(g.dx, g.dgamma, g.dbeta, x_dtype=cache.x_dtype,
                      param_dtype=cache.param_dtype)


@batch_norm_eval_forward.fast
def _batch_norm_eval_forward_fast(
    x: Array, gamma: Array, beta: Array, running_mean: Array, running_var: Array, *,
    eps: float = 1e-5,
) -> tuple[Array, BatchNormCache]:
    _, xc, gamma_c, beta_c = prepare_channel_norm(x, gamma, beta, eps=eps)
    mu, var = frozen_statistics(running_mean, running_var, like=xc)  # (1, C, 1, 1)
    k = kernels.eval_forward(x, gamma_c, beta_c, mu, var, eps)
    return k.y, BatchNormCache(x_hat=k.x_hat, rstd=k.rstd, gamma=gamma_c, mean=mu, var=var,
                               reduce_axes=(), x_dtype=x.dtype, param_dtype=gamma.dtype)
