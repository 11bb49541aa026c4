"""Layer Normalization (Ba, Kiros & Hinton, 2016).

Statistics per sample over the channel and spatial axes, as written in Luo et al.,
*Switchable Normalization* (journal version), Eq. (1)-(2) with ``I_ln = {(c, i, j)}``:

    y = gamma * (x - mu_ln) / sqrt(var_ln + eps) + beta     mu_ln, var_ln of shape (N,)

``gamma`` and ``beta`` are per channel, (C,), as in the SN and GN papers. For an (N, D)
input this is Ba et al.'s per-unit gain and bias; PyTorch's ``nn.LayerNorm`` over
(C, H, W) instead learns one gain per element (see the conventions page).

The fast path (:mod:`refnorm.dispatch`) is at the end of the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refnorm.backend import Array
from refnorm.core import affine_backward, affine_forward, moments, reduced_count, standardize
from refnorm.core.checks import check_cache, check_count, prepare_channel_norm
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
class LayerNormCache:
    """What :func:`layer_norm_forward` saves for :func:`layer_norm_backward`.

    Attributes
    ----------
    x_hat : array, (N, C, *spatial)
        The standardized input, in the compute dtype.
    rstd : array, (N, 1, 1, ...)
        ``1 / sqrt(var + eps)`` per sample.
    gamma : array, (C,)
        The scale in the compute dtype.
    mean, var : arrays, (N, 1, 1, ...)
        Each sample's statistics (biased variance), kept for inspection.
    x_dtype, param_dtype : dtypes
        The dtypes ``dx`` and ``dgamma``/``dbeta`` are returned in.
    """

    x_hat: Array
    rstd: Array
    gamma: Array
    mean: Array
    var: Array
    x_dtype: Any
    param_dtype: Any


@dispatched
def layer_norm_forward(
    x: Array, gamma: Array, beta: Array, *, eps: float = 1e-5
) -> tuple[Array, LayerNormCache]:
    """Layer Normalization: each sample normalized over all its channels and positions.

    Parameters
    ----------
    x : array, (N, C, *spatial)
    gamma, beta : arrays, (C,)
    eps : float, > 0
    path : {"reference", "fast"}, optional
        Which implementation computes (:mod:`refnorm.dispatch`); default: the process-wide
        choice, else the reference.

    Returns
    -------
    y : array, ``x.shape``
    cache : LayerNormCache
    """
    xp, xc, gamma_c, beta_c = prepare_channel_norm(x, gamma, beta, eps=eps)
    reduce_axes = tuple(range(1, x.ndim))                        # (1, 2, ...): C and spatial
    check_count(reduced_count(x.shape, reduce_axes),
                what="layer normalization", shape=x.shape)
    mu, var = moments(xc, reduce_axes)                           # (N, 1, 1, 1)  SN Eq. (2)
    x_hat, rstd = standardize(xc, mu, var, eps=eps)              # (N, C, H, W)  SN Eq. (1)
    y = affine_forward(x_hat, gamma_c, beta_c)                   # (N, C, H, W)  SN Eq. (1)
    cache = LayerNormCache(x_hat=x_hat, rstd=rstd, gamma=gamma_c, mean=mu, var=var,
                           x_dtype=x.dtype, param_dtype=gamma.dtype)
    return xp.astype(y, x.dtype, copy=False), cache


@dispatched
def layer_norm_backward(dy: Array, cache: LayerNormCache) -> tuple[Array, Array, Array]:
    """Closed-form backward of :func:`layer_norm_forward`.

    Per sample over the axes (1, 2, ...), ``dx = rstd * (dx_hat - mean(dx_hat) - x_hat *
    mean(dx_hat * x_hat))`` with ``dx_hat = gamma * dy``. ``path`` as in
    :func:`layer_norm_forward`.

    Returns
    -------
    dx : array, (N, C, *spatial)
    dgamma, dbeta : arrays, (C,)
    """
    check_cache(cache, LayerNormCache)
    xp, dy_c = upstream(dy, cache.x_hat)
    dx_hat, dgamma, dbeta = affine_backward(dy_c, cache.x_hat, cache.gamma)  # (N,C,H,W), (C,)x2
    reduce_axes = tuple(range(1, dy_c.ndim))                     # (1, 2, 3): C and spatial
    dx = standardize_backward(dx_hat, cache.x_hat, cache.rstd, reduce_axes)
    return cast_grads(xp, dx, dgamma, dbeta, x_dtype=cache.x_dtype, param_dtype=cache.param_dtype)


class LayerNorm(ChannelNorm):
    """Layer Normalization layer (same computation in training and at inference).

    Parameters
    ----------
    num_channels : int
    eps : float, default 1e-5
    dtype, xp, device : see :class:`~refnorm.layer.Layer`
    """

    check_cases = (CheckCase((3, 4, 5, 5)), CheckCase((5, 6)), CheckCase((2, 3, 4, 3, 2)))

    def _forward(self, x: Array, training: bool) -> tuple[Array, LayerNormCache]:
        gamma, beta = self.params["gamma"], self.params["beta"]
        return layer_norm_forward(x, gamma, beta, eps=self.eps, path=self.compute_path())

    def _backward(self, dy: Array, cache: LayerNormCache) -> tuple[Array, dict[str, Array]]:
        dx, dgamma, dbeta = layer_norm_backward(dy, cache, path=self.compute_path())
        return dx, {"gamma": dgamma, "beta": dbeta}


# -- the fast path: the same checks, then the fused loops ----------------------------------------


@layer_norm_forward.fast
def _layer_norm_forward_fast(x: Array, gamma: Array, beta: Array, *,
                             eps: float = 1e-5) -> tuple[Array, LayerNormCache]:
    gamma_c, beta_c = fast_channel_args(
        "layer_norm", x, gamma, beta, eps,
        check=lambda: check_count(reduced_count(x.shape, tuple(range(1, x.ndim))),
                                  what="layer normalization", shape=x.shape))
    k = kernels.ln_forward(x, gamma_c, beta_c, eps)
    return k.y, LayerNormCache(x_hat=k.x_hat, rstd=k.rstd, gamma=gamma_c, mean=k.mean,
                               var=k.var, x_dtype=x.dtype, param_dtype=gamma.dtype)


@layer_norm_backward.fast
def _layer_norm_backward_fast(dy: Array, cache: LayerNormCache) -> tuple[Array, Array, Array]:
    check_cache(cache, LayerNormCache)
    dy_c = fast_backward_args("layer_norm_backward", dy, cache.x_hat, cache.rstd, cache.gamma,
                              per_sample=True, groups=1)
    g = kernels.ln_backward(dy_c, cache.x_hat, cache.rstd, cache.gamma)
    return fast_grads(g.dx, g.dgamma, g.dbeta, x_dtype=cache.x_dtype,
                      param_dtype=cache.param_dtype)
