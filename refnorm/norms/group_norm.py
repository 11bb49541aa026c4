"""Group Normalization (Wu & He, 2018).

The C channels are split into G groups of C/G consecutive channels; statistics are taken per
sample and per group over the group's channels and the spatial axes:

    x viewed as (N, G, C/G, *spatial), mu and var over axes (2, 3, ...)  # shape (N, G, 1, ...)
    y = gamma * (x - mu) / sqrt(var + eps) + beta                       # gamma, beta per channel

G = 1 is Layer Normalization and G = C is Instance Normalization (the tests hold both). The
Weight Standardization paper (Qiao et al.) pairs it with WS for micro-batch training.

The fast path (:mod:`refnorm.dispatch`) is at the end of the file.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from refnorm.backend import Array
from refnorm.core import affine_backward, affine_forward, moments, reduced_count, standardize
from refnorm.core.checks import check_cache, check_count, is_int, prepare_channel_norm
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
    upstream,
)


@dataclass(frozen=True)
class GroupNormCache:
    """What :func:`group_norm_forward` saves for :func:`group_norm_backward`.

    Attributes
    ----------
    x_hat : array, (N, C, *spatial)
        The standardized input, in the compute dtype.
    rstd : array, (N, G, 1, 1, ...)
        ``1 / sqrt(var + eps)`` per sample and group, in the grouped view.
    gamma : array, (C,)
        The scale in the compute dtype.
    mean, var : arrays, (N, G, 1, 1, ...)
        Each group's statistics (biased variance), kept for inspection.
    num_groups : int
        G: the backward views ``x_hat`` as (N, G, C/G, *spatial) again.
    x_dtype, param_dtype : dtypes
        The dtypes ``dx`` and ``dgamma``/``dbeta`` are returned in.
    """

    x_hat: Array
    rstd: Array
    gamma: Array
    mean: Array
    var: Array
    num_groups: int
    x_dtype: Any
    param_dtype: Any


def check_groups(num_groups: object, num_channels: int) -> int:
    """Check that ``num_groups`` is a positive int (``numpy.integer`` too) dividing
    ``num_channels``; return it as an int."""
    if not is_int(num_groups):
        raise TypeError(f"num_groups must be an int; got {type(num_groups).__name__}")
    G = operator.index(num_groups)
    if G < 1 or num_channels % G:
        raise ValueError(
            f"num_groups must be a positive divisor of the number of channels C={num_channels}; "
            f"got num_groups={G}"
        )
    return G


@dispatched
def group_norm_forward(
    x: Array, gamma: Array, beta: Array, *, num_groups: int, eps: float = 1e-5
) -> tuple[Array, GroupNormCache]:
    """Group Normalization.

    Parameters
    ----------
    x : array, (N, C, *spatial)
    gamma, beta : arrays, (C,)
    num_groups : int
        G, a divisor of C.
    eps : float, > 0
    path : {"reference", "fast"}, optional
        Which implementation computes (:mod:`refnorm.dispatch`); default: the process-wide
        choice, else the reference.

    Returns
    -------
    y : array, ``x.shape``
    cache : GroupNormCache
    """
    xp, xc, gamma_c, beta_c = prepare_channel_norm(x, gamma, beta, eps=eps)
    N, C = x.shape[:2]
    num_groups = check_groups(num_groups, C)
    view_shape = (N, num_groups, C // num_groups) + tuple(x.shape[2:])
    reduce_axes = tuple(range(2, len(view_shape)))               # (2, 3, ...): C/G and spatial
    check_count(reduced_count(view_shape, reduce_axes),
                what="group normalization", shape=x.shape)
    xg = xp.reshape(xc, view_shape)                              # (N, G, C/G, H, W)
    mu, var = moments(xg, reduce_axes)                           # (N, G, 1, 1, 1)
    x_hat_g, rstd = standardize(xg, mu, var, eps=eps)            # (N, G, C/G, H, W)
    x_hat = xp.reshape(x_hat_g, x.shape)                         # (N, C, H, W)
    y = affine_forward(x_hat, gamma_c, beta_c)                   # (N, C, H, W)
    cache = GroupNormCache(x_hat=x_hat, rstd=rstd, gamma=gamma_c, mean=mu, var=var,
                           num_groups=num_groups, x_dtype=x.dtype, param_dtype=gamma.dtype)
    return xp.astype(y, x.dtype, copy=False), cache


@dispatched
def group_norm_backward(dy: Array, cache: GroupNormCache) -> tuple[Array, Array, Array]:
    """Closed-form backward of :func:`group_norm_forward`, taken in the grouped view.

    Per sample and group, over the group's channels and the spatial axes (2, 3, ... of the
    view (N, G, C/G, *spatial)), ``dx = rstd * (dx_hat - mean(dx_hat) - x_hat *
    mean(dx_hat * x_hat))`` with ``dx_hat = gamma * dy`` (gamma per channel, before the view).
    ``path`` as in :func:`group_norm_forward`.

    Returns
    -------
    dx : array, (N, C, *spatial)
    dgamma, dbeta : arrays, (C,)
    """
    check_cache(cache, GroupNormCache)
    xp, dy_c = upstream(dy, cache.x_hat)
    dx_hat, dgamma, dbeta = affine_backward(dy_c, cache.x_hat, cache.gamma)  # (N,C,H,W), (C,)x2
    N, C = dy_c.shape[:2]
    view_shape = (N, cache.num_groups, C // cache.num_groups) + tuple(dy_c.shape[2:])
    reduce_axes = tuple(range(2, len(view_shape)))               # (2, 3, 4): C/G and spatial
    dx_g = standardize_backward(xp.reshape(dx_hat, view_shape),  # (N, G, C/G, H, W)
                                xp.reshape(cache.x_hat, view_shape), cache.rstd, reduce_axes)
    dx = xp.reshape(dx_g, dy_c.shape)                            # (N, C, H, W)
    return cast_grads(xp, dx, dgamma, dbeta, x_dtype=cache.x_dtype, param_dtype=cache.param_dtype)


class GroupNorm(ChannelNorm):
    """Group Normalization layer (same computation in training and at inference).

    Parameters
    ----------
    num_channels : int
    num_groups : int, default 32
        G, a divisor of ``num_channels`` (32 is the GN paper's default; smaller networks
        need a smaller G).
    eps : float, default 1e-5
    dtype, xp, device : see :class:`~refnorm.layer.Layer`
    """

    check_cases = (
        CheckCase((2, 6, 4, 4), {"num_groups": 3}),
        CheckCase((3, 8), {"num_groups": 2}),
        CheckCase((2, 4, 3, 3), {"num_groups": 1}),
        CheckCase((2, 4, 3, 3), {"num_groups": 4}),
    )

    def __init__(
        self,
        num_channels: int,
        *,
        num_groups: int = 32,
        eps: float = 1e-5,
        dtype: Any = None,
        xp: ModuleType | None = None,
        device: Any = None,
    ) -> None:
        super().__init__(num_channels, eps=eps, dtype=dtype, xp=xp, device=device)
        self.num_groups = check_groups(num_groups, num_channels)

    def _forward(self, x: Array, training: bool) -> tuple[Array, GroupNormCache]:
        gamma, beta = self.params["gamma"], self.params["beta"]
        return group_norm_forward(x, gamma, beta, num_groups=self.num_groups, eps=self.eps,
                                  path=self.compute_path())

    def _backward(self, dy: Array, cache: GroupNormCache) -> tuple[Array, dict[str, Array]]:
        dx, dgamma, dbeta = group_norm_backward(dy, cache, path=self.compute_path())
        return dx, {"gamma": dgamma, "beta": dbeta}


# -- the fast path: the same checks, then the fused loops ----------------------------------------


@group_norm_forward.fast
def _group_norm_forward_fast(x: Array, gamma: Array, beta: Array, *, num_groups: int,
                             eps: float = 1e-5) -> tuple[Array, GroupNormCache]:
    def check() -> None:
        G = check_groups(num_groups, x.shape[1])
        view_shape = (x.shape[0], G, x.shape[1] // G) + tuple(x.shape[2:])
        check_count(reduced_count(view_shape, tuple(range(2, len(view_shape)))),
                    what="group normalization", shape=x.shape)

    gamma_c, beta_c = fast_channel_args("group_norm", x, gamma, beta, eps, hyper=(num_groups,),
                                        check=check)
    G = int(num_groups)
    k = kernels.gn_forward(x, gamma_c, beta_c, eps, G)
    return k.y, GroupNormCache(x_hat=k.x_hat, rstd=k.rstd, gamma=gamma_c, mean=k.mean,
                               var=k.var, num_groups=G, x_dtype=x.dtype,
                               param_dtype=gamma.dtype)


@group_norm_backward.fast
def _group_norm_backward_fast(dy: Array, cache: GroupNormCache) -> tuple[Array, Array, Array]:
    check_cache(cache, GroupNormCache)
    dy_c = fast_backward_args("group_norm_backward", dy, cache.x_hat, cache.rstd, cache.gamma,
                              per_sample=True, groups=cache.num_groups)
    g = kernels.gn_backward(dy_c, cache.x_hat, cache.rstd, cache.gamma)
    return fast_grads(g.dx, g.dgamma, g.dbeta, x_dtype=cache.x_dtype,
                      param_dtype=cache.param_dtype)
