"""Layer Normalization (Ba, Kiros & Hinton, 2016).

Statistics per sample over the channel and spatial axes, as written in Luo et al.,
*Switchable Normalization* (journal version), Eq. (1)-(2) with ``I_ln = {(c, i, j)}``:

    y = gamma * (x - mu_ln) / sqrt(var_ln + eps) + beta     mu_ln, var_ln of shape (N,)

``gamma`` and ``beta`` are per channel, (C,), as in the SN and GN papers. For an (N, D)
input this is Ba et al.'s per-unit gain and bias; PyTorch's ``nn.LayerNorm`` over
(C, H, W) instead learns one gain per element (see the conventions page).
"""

from __future__ import annotations

from dataclasses import dataclass

from refnorm.backend import Array
from refnorm.core import affine_forward, moments, reduced_count, standardize
from refnorm.core.checks import check_count, prepare_channel_norm
from refnorm.norms.base import ChannelNorm, CheckCase, NormCache, channel_norm_backward, check_cache


@dataclass(frozen=True)
class LayerNormCache(NormCache):
    """A :class:`~refnorm.norms.base.NormCache` from a Layer Normalization forward.

    ``mean``/``var``/``rstd`` have shape (N, 1, 1, ...); ``reduce_axes`` is (1, 2, ...).
    """


def layer_norm_forward(
    x: Array, gamma: Array, beta: Array, *, eps: float = 1e-5
) -> tuple[Array, LayerNormCache]:
    """Layer Normalization: each sample normalized over all its channels and positions.

    Parameters
    ----------
    x : array, (N, C, *spatial)
    gamma, beta : arrays, (C,)
    eps : float, > 0

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
    y = affine_forward(x_hat, gamma_c, beta_c)                   # (N, C, H, W)
    cache = LayerNormCache(
        x_hat=x_hat, rstd=rstd, gamma=gamma_c, mean=mu, var=var,
        view_shape=tuple(x.shape), reduce_axes=reduce_axes, batch_stats=True,
        x_dtype=x.dtype, param_dtype=gamma.dtype,
    )
    return xp.astype(y, x.dtype, copy=False), cache


def layer_norm_backward(dy: Array, cache: LayerNormCache) -> tuple[Array, Array, Array]:
    """Closed-form backward of :func:`layer_norm_forward`.

    Returns
    -------
    dx : array, (N, C, *spatial)
    dgamma, dbeta : arrays, (C,)
    """
    check_cache(cache, LayerNormCache)
    return channel_norm_backward(dy, cache)


class LayerNorm(ChannelNorm):
    """Layer Normalization layer (same computation in training and at inference).

    Parameters
    ----------
    num_channels : int
    eps : float, default 1e-5
    dtype, xp : see :class:`~refnorm.norms.base.ChannelNorm`
    """

    check_cases = (CheckCase((3, 4, 5, 5)), CheckCase((5, 6)), CheckCase((2, 3, 4, 3, 2)))
    backward_fn = staticmethod(layer_norm_backward)

    def _forward(self, x: Array, training: bool) -> tuple[Array, LayerNormCache]:
        return layer_norm_forward(x, self.params["gamma"], self.params["beta"], eps=self.eps)
