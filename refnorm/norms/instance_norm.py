"""Instance Normalization (Ulyanov, Vedaldi & Lempitsky, 2016).

Statistics per sample and per channel over the spatial axes, as written in Luo et al.,
*Switchable Normalization* (journal version), Eq. (1)-(2) with ``I_in = {(i, j)}``:

    y = gamma * (x - mu_in) / sqrt(var_in + eps) + beta     mu_in, var_in of shape (N, C)

Undefined for (N, C) inputs (one value per statistic). Running statistics are optional and
off by default, as in PyTorch's ``InstanceNorm2d``: without them inference uses each
instance's own statistics, exactly as training does.

The fast path (:mod:`refnorm.dispatch`) is at the end of the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from refnorm.backend import Array, on_device
from refnorm.core import affine_backward, affine_forward, moments, reduced_count, standardize
from refnorm.core.checks import (
    check_bool,
    check_cache,
    check_count,
    check_momentum,
    prepare_channel_norm,
)
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
class InstanceNormCache:
    """What either Instance Normalization forward saves for :func:`instance_norm_backward`.

    Attributes
    ----------
    x_hat : array, (N, C, *spatial)
        The standardized input, in the compute dtype.
    rstd : array, (N, C, 1, ...) with instance statistics, (1, C, 1, ...) with running ones
        ``1 / sqrt(var + eps)``.
    gamma : array, (C,)
        The scale in the compute dtype.
    mean, var : arrays, same shape as ``rstd``
        The statistics used (instance statistics with the biased variance, or running ones);
        kept for the layer's running update and for inspection.
    reduce_axes : tuple of int
        (2, 3, ...) when the statistics came from ``x``; () with running statistics.
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
def instance_norm_forward(
    x: Array, gamma: Array, beta: Array, *, eps: float = 1e-5
) -> tuple[Array, InstanceNormCache]:
    """Instance Normalization with each instance's own statistics.

    Parameters
    ----------
    x : array, (N, C, *spatial) with at least one spatial axis and more than one
        spatial position
    gamma, beta : arrays, (C,)
    eps : float, > 0
    path : {"reference", "fast"}, optional
        Which implementation computes (:mod:`refnorm.dispatch`); default: the process-wide
        choice, else the reference.

    Returns
    -------
    y : array, ``x.shape``
    cache : InstanceNormCache; ``mean``, ``var`` of shape (N, C, 1, ...)
    """
    xp, xc, gamma_c, beta_c = prepare_channel_norm(x, gamma, beta, eps=eps, min_ndim=3)
    reduce_axes = tuple(range(2, x.ndim))                        # (2, 3, ...): spatial
    check_count(reduced_count(x.shape, reduce_axes),
                what="instance normalization", shape=x.shape)
    mu, var = moments(xc, reduce_axes)                           # (N, C, 1, 1)  SN Eq. (2)
    x_hat, rstd = standardize(xc, mu, var, eps=eps)              # (N, C, H, W)  SN Eq. (1)
    y = affine_forward(x_hat, gamma_c, beta_c)                   # (N, C, H, W)  SN Eq. (1)
    cache = InstanceNormCache(x_hat=x_hat, rstd=rstd, gamma=gamma_c, mean=mu, var=var,
                              reduce_axes=reduce_axes, x_dtype=x.dtype, param_dtype=gamma.dtype)
    return xp.astype(y, x.dtype, copy=False), cache


@dispatched
def instance_norm_eval_forward(
    x: Array,
    gamma: Array,
    beta: Array,
    running_mean: Array,
    running_var: Array,
    *,
    eps: float = 1e-5,
) -> tuple[Array, InstanceNormCache]:
    """Instance Normalization with running statistics (only when they are tracked).

    Parameters
    ----------
    x : array, (N, C, *spatial) with at least one spatial axis
    gamma, beta, running_mean, running_var : arrays, (C,)
    eps : float, > 0
    path : {"reference", "fast"}, optional
        As in :func:`instance_norm_forward`.

    Returns
    -------
    y : array, ``x.shape``
    cache : InstanceNormCache with ``reduce_axes=()``
    """
    xp, xc, gamma_c, beta_c = prepare_channel_norm(x, gamma, beta, eps=eps, min_ndim=3)
    mu, var = frozen_statistics(running_mean, running_var, like=xc)  # (1, C, 1, 1)
    x_hat, rstd = standardize(xc, mu, var, eps=eps)              # (N, C, H, W)
    y = affine_forward(x_hat, gamma_c, beta_c)                   # (N, C, H, W)
    cache = InstanceNormCache(x_hat=x_hat, rstd=rstd, gamma=gamma_c, mean=mu, var=var,
                              reduce_axes=(), x_dtype=x.dtype, param_dtype=gamma.dtype)
    return xp.astype(y, x.dtype, copy=False), cache


@dispatched
def instance_norm_backward(dy: Array, cache: InstanceNormCache) -> tuple[Array, Array, Array]:
    """Closed-form backward of either Instance Normalization forward.

    With instance statistics, per (n, c) over the spatial axes (2, 3, ...),
    ``dx = rstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat))`` with
    ``dx_hat = gamma * dy``; with running statistics, ``dx = rstd * dx_hat``. ``path`` as in
    :func:`instance_norm_forward`.

    Returns
    -------
    dx : array, (N, C, *spatial)
    dgamma, dbeta : arrays, (C,)
    """
    check_cache(cache, InstanceNormCache)
    xp, dy_c = upstream(dy, cache.x_hat)
    dx_hat, dgamma, dbeta = affine_backward(dy_c, cache.x_hat, cache.gamma)  # (N,C,H,W), (C,)x2
    if cache.reduce_axes:                                        # (2, 3): instance statistics
        dx = standardize_backward(dx_hat, cache.x_hat, cache.rstd, cache.reduce_axes)
    else:                                                        # running statistics
        dx = dx_hat * cache.rstd
    return cast_grads(xp, dx, dgamma, dbeta, x_dtype=cache.x_dtype, param_dtype=cache.param_dtype)


class InstanceNorm(ChannelNorm):
    """Instance Normalization layer.

    Parameters
    ----------
    num_channels : int
    eps : float, default 1e-5
    track_running_stats : bool, default False
        Keep running averages (of the batch-mean of the instance means and of the unbiased
        instance variances, as PyTorch does) and use them at inference.
    momentum : float, default 0.1
        Weight of the new batch, used only with ``track_running_stats``.
    dtype, xp, device : see :class:`~refnorm.layer.Layer`
    """

    check_cases = (
        CheckCase((3, 4, 5, 5)),
        CheckCase((2, 3, 7)),
        CheckCase((3, 4, 5, 5), {"track_running_stats": True}, training=False),
    )

    def __init__(
        self,
        num_channels: int,
        *,
        eps: float = 1e-5,
        track_running_stats: bool = False,
        momentum: float = 0.1,
        dtype: Any = None,
        xp: ModuleType | None = None,
        device: Any = None,
    ) -> None:
        super().__init__(num_channels, eps=eps, dtype=dtype, xp=xp, device=device)
        check_momentum(momentum)
        self.track_running_stats = check_bool("track_running_stats", track_running_stats)
        self.momentum = momentum
        if self.track_running_stats:
            where = on_device(self.device)
            self.state = {
                "running_mean": self.xp.zeros((num_channels,), dtype=self.dtype, **where),
                "running_var": self.xp.ones((num_channels,), dtype=self.dtype, **where),
            }

    def _forward(self, x: Array, training: bool) -> tuple[Array, InstanceNormCache]:
        gamma, beta = self.params["gamma"], self.params["beta"]
        if not training and self.track_running_stats:
            stats = (self.state["running_mean"], self.state["running_var"])
            return instance_norm_eval_forward(x, gamma, beta, *stats, eps=self.eps,
                                              path=self.compute_path())
        y, cache = instance_norm_forward(x, gamma, beta, eps=self.eps, path=self.compute_path())
        if training and self.track_running_stats:
            xp, C = self.xp, self.num_channels
            mean = xp.mean(xp.reshape(cache.mean, (-1, C)), axis=0)  # (C,) mean over N
            var = xp.mean(xp.reshape(cache.var, (-1, C)), axis=0)    # (C,) mean over N
            running_mean, running_var = update_running_stats(
                self.state["running_mean"], self.state["running_var"], mean, var,
                count=reduced_count(x.shape, cache.reduce_axes), momentum=self.momentum,
            )
            self.state = {"running_mean": running_mean, "running_var": running_var}
        return y, cache

    def _backward(self, dy: Array, cache: InstanceNormCache) -> tuple[Array, dict[str, Array]]:
        dx, dgamma, dbeta = instance_norm_backward(dy, cache, path=self.compute_path())
        return dx, {"gamma": dgamma, "beta": dbeta}


# -- the fast path: the same checks, then the fused loops ----------------------------------------


@instance_norm_forward.fast
def _instance_norm_forward_fast(x: Array, gamma: Array, beta: Array, *,
                                eps: float = 1e-5) -> tuple[Array, InstanceNormCache]:
    reduce_axes = tuple(range(2, x.ndim))
    gamma_c, beta_c = fast_channel_args(
        "instance_norm", x, gamma, beta, eps, min_ndim=3,
        check=lambda: check_count(reduced_count(x.shape, reduce_axes),
                                  what="instance normalization", shape=x.shape))
    k = kernels.in_forward(x, gamma_c, beta_c, eps)
    return k.y, InstanceNormCache(x_hat=k.x_hat, rstd=k.rstd, gamma=gamma_c, mean=k.mean,
                                  var=k.var, reduce_axes=reduce_axes, x_dtype=x.dtype,
                                  param_dtype=gamma.dtype)


@instance_norm_backward.fast
def _instance_norm_backward_fast(dy: Array, cache: InstanceNormCache) -> tuple[Array, Array, Array]:
    check_cache(cache, InstanceNormCache)
    dy_c = fast_backward_args("instance_norm_backward", dy, cache.x_hat, cache.rstd,
                              cache.gamma, per_sample=bool(cache.reduce_axes))
    backward = kernels.in_backward if cache.reduce_axes else kernels.eval_backward
    g = backward(dy_c, cache.x_hat, cache.rstd, cache.gamma)
    return fast_grads(g.dx, g.dgamma, g.dbeta, x_dtype=cache.x_dtype,
                      param_dtype=cache.param_dtype)


@instance_norm_eval_forward.fast
def _instance_norm_eval_forward_fast(
    x: Array, gamma: Array, beta: Array, running_mean: Array, running_var: Array, *,
    eps: float = 1e-5,
) -> tuple[Array, InstanceNormCache]:
    _, xc, gamma_c, beta_c = prepare_channel_norm(x, gamma, beta, eps=eps, min_ndim=3)
    mu, var = frozen_statistics(running_mean, running_var, like=xc)  # (1, C, 1, 1)
    k = kernels.eval_forward(x, gamma_c, beta_c, mu, var, eps)
    return k.y, InstanceNormCache(x_hat=k.x_hat, rstd=k.rstd, gamma=gamma_c, mean=mu, var=var,
                                  reduce_axes=(), x_dtype=x.dtype, param_dtype=gamma.dtype)
