"""What every activation normalizer shares: the cache, the backward, the layer interface.

A method file (``batch.py``, ``group.py``, ...) spells out its own reduction axes and reshape
in its forward; everything after the statistics is the same for all of them and lives here:

- :class:`NormCache` — what a forward saves for its backward;
- :func:`channel_norm_backward` — affine backward, then the closed-form standardize
  backward (or, with frozen statistics, just the scale by ``rstd``);
- :class:`ChannelNorm` — the layer base of these methods (the interface itself is
  :class:`refnorm.layer.Layer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from refnorm.backend import Array, array_namespace
from refnorm.core import affine_backward, affine_forward, standardize, standardize_backward
from refnorm.core.affine import channel_view
from refnorm.core.checks import check_cache, check_channel_param, check_like, prepare_channel_norm
from refnorm.layer import CheckCase, Layer


@dataclass(frozen=True)
class NormCache:
    """What a channel normalizer's forward saves for its backward.

    Attributes
    ----------
    x_hat : array, (N, C, *spatial)
        The standardized input, in the compute dtype. Saved instead of ``x`` because the
        closed-form backward needs ``x_hat`` and never ``x - mu``.
    rstd : array, ``view_shape`` with the reduction axes set to 1
        ``1 / sqrt(var + eps)``. Saved instead of ``std`` because the backward multiplies by
        it; no division and no second square root.
    gamma : array, (C,)
        The scale, in the compute dtype (``dx_hat = dy * gamma``).
    mean, var : arrays, same shape as ``rstd``
        The statistics used (batch or running). Not needed by the backward; kept for the
        running-statistics update and for inspection.
    view_shape : tuple of int
        The shape ``x`` was viewed in to take statistics: ``x.shape`` itself, or for Group
        Normalization ``(N, G, C // G, *spatial)``.
    reduce_axes : tuple of int
        The axes of ``view_shape`` the statistics were taken over.
    batch_stats : bool
        True if the statistics were computed from ``x`` (training); False if they were
        frozen inputs (running statistics at inference), in which case ``x`` reaches them
        through no path and ``dx = dy * gamma * rstd``.
    x_dtype, param_dtype : dtypes
        The dtypes ``dx`` and ``dgamma``/``dbeta`` are returned in.
    """

    x_hat: Array
    rstd: Array
    gamma: Array
    mean: Array
    var: Array
    view_shape: tuple[int, ...]
    reduce_axes: tuple[int, ...]
    batch_stats: bool
    x_dtype: Any
    param_dtype: Any


def channel_norm_backward(dy: Array, cache: NormCache) -> tuple[Array, Array, Array]:
    """Backward of any channel normalizer from its :class:`NormCache`.

    Parameters
    ----------
    dy : array, (N, C, *spatial)
        Upstream gradient.

    Returns
    -------
    dx : array, (N, C, *spatial), dtype of ``x``
    dgamma, dbeta : arrays, (C,), dtype of ``gamma``
    """
    check_like("dy", dy, cache.x_hat.shape)
    xp = array_namespace(dy, cache.x_hat)
    dy_c = xp.astype(dy, cache.x_hat.dtype, copy=False)
    dx_hat, dgamma, dbeta = affine_backward(dy_c, cache.x_hat, cache.gamma)
    if cache.batch_stats:
        dx_hat_v = xp.reshape(dx_hat, cache.view_shape)
        x_hat_v = xp.reshape(cache.x_hat, cache.view_shape)
        dx_v = standardize_backward(dx_hat_v, x_hat_v, cache.rstd, cache.reduce_axes)
        dx = xp.reshape(dx_v, cache.x_hat.shape)
    else:
        dx = dx_hat * cache.rstd
    return (
        xp.astype(dx, cache.x_dtype, copy=False),
        xp.astype(dgamma, cache.param_dtype, copy=False),
        xp.astype(dbeta, cache.param_dtype, copy=False),
    )


def frozen_norm_forward(
    x: Array, gamma: Array, beta: Array, stats: tuple[Array, Array], *, eps: float,
    cache_type: type[NormCache],
) -> tuple[Array, NormCache]:
    """Normalize with given per-channel statistics (running mean and variance) at inference.

    Parameters
    ----------
    x : array, (N, C, *spatial)
    gamma, beta : arrays, (C,)
    stats : pair of arrays, (C,) each
        ``(running_mean, running_var)``; the variance must be non-negative.
    eps : float
    cache_type : the method's :class:`NormCache` subclass

    Returns
    -------
    y : array, (N, C, *spatial)
    cache : ``cache_type`` with ``batch_stats=False``
    """
    xp, xc, gamma_c, beta_c = prepare_channel_norm(x, gamma, beta, eps=eps)
    running_mean, running_var = stats
    check_channel_param("running_mean", running_mean, x.shape[1])
    check_channel_param("running_var", running_var, x.shape[1])
    if bool(xp.any(running_var < 0)):
        raise ValueError("running_var must be >= 0 everywhere; got a negative entry")
    mu = channel_view(xp.astype(running_mean, xc.dtype), x.ndim)   # (1, C, 1, 1)
    var = channel_view(xp.astype(running_var, xc.dtype), x.ndim)   # (1, C, 1, 1)
    x_hat, rstd = standardize(xc, mu, var, eps=eps)                 # (N, C, H, W)
    y = affine_forward(x_hat, gamma_c, beta_c)
    cache = cache_type(
        x_hat=x_hat, rstd=rstd, gamma=gamma_c, mean=mu, var=var,
        view_shape=tuple(x.shape), reduce_axes=(), batch_stats=False,
        x_dtype=x.dtype, param_dtype=gamma.dtype,
    )
    return xp.astype(y, x.dtype, copy=False), cache


class ChannelNorm(Layer):
    """Base of the activation normalizers: per-channel ``gamma`` (ones) and ``beta`` (zeros).

    Parameters
    ----------
    num_channels : int
        C, the size of the input's axis 1.
    eps : float
        Added to the variance inside the square root.
    dtype : dtype, default float32
        Dtype of the parameters and state.
    xp : module, default numpy
        Array namespace the parameters live in.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        eps: float = 1e-5,
        dtype: Any = None,
        xp: ModuleType | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int):
            raise TypeError(f"num_channels must be an int; got {type(num_channels).__name__}")
        if num_channels < 1:
            raise ValueError(f"num_channels must be >= 1; got {num_channels}")
        self.xp = np if xp is None else xp
        self.dtype = self.xp.float32 if dtype is None else dtype
        if not self.xp.isdtype(self.dtype, "real floating"):
            raise TypeError(f"dtype must be a real floating dtype; got {self.dtype}")
        self.num_channels = num_channels
        self.eps = eps
        self.params = {
            "gamma": self.xp.ones((num_channels,), dtype=self.dtype),
            "beta": self.xp.zeros((num_channels,), dtype=self.dtype),
        }

    def _backward(self, dy: Array, cache: NormCache) -> tuple[Array, dict[str, Array]]:
        dx, dgamma, dbeta = type(self).backward_fn(dy, cache)
        return dx, {"gamma": dgamma, "beta": dbeta}

    # The pure backward of the method (set by each subclass as a staticmethod).
    backward_fn: ClassVar[Any]


__all__ = [
    "ChannelNorm",
    "CheckCase",
    "Layer",
    "NormCache",
    "channel_norm_backward",
    "check_cache",
    "frozen_norm_forward",
]
