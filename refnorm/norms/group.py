"""Group Normalization (Wu & He, 2018).

The C channels are split into G groups of C/G consecutive channels; statistics are taken per
sample and per group over the group's channels and the spatial axes:

    x viewed as (N, G, C/G, *spatial), mu and var over axes (2, 3, ...)  # shape (N, G, 1, ...)
    y = gamma * (x - mu) / sqrt(var + eps) + beta                       # gamma, beta per channel

G = 1 is Layer Normalization and G = C is Instance Normalization (the tests hold both). The
Weight Standardization paper (Qiao et al.) pairs it with WS for micro-batch training.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from refnorm.backend import Array
from refnorm.core import affine_forward, moments, reduced_count, standardize
from refnorm.core.checks import check_count, prepare_channel_norm
from refnorm.norms.base import ChannelNorm, CheckCase, NormCache, channel_norm_backward, check_cache


@dataclass(frozen=True)
class GroupNormCache(NormCache):
    """A :class:`~refnorm.norms.base.NormCache` from a Group Normalization forward.

    ``view_shape`` is (N, G, C/G, *spatial); ``mean``/``var``/``rstd`` have shape
    (N, G, 1, ...) and ``reduce_axes`` is (2, 3, ...) of that view.
    """


def check_groups(num_groups: object, num_channels: int) -> None:
    """Check that ``num_groups`` is a positive int dividing ``num_channels``."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        raise TypeError(f"num_groups must be an int; got {type(num_groups).__name__}")
    if num_groups < 1 or num_channels % num_groups:
        raise ValueError(
            f"num_groups must be a positive divisor of the number of channels C={num_channels}; "
            f"got num_groups={num_groups}"
        )


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

    Returns
    -------
    y : array, ``x.shape``
    cache : GroupNormCache
    """
    xp, xc, gamma_c, beta_c = prepare_channel_norm(x, gamma, beta, eps=eps)
    N, C = x.shape[:2]
    check_groups(num_groups, C)
    view_shape = (N, num_groups, C // num_groups) + tuple(x.shape[2:])
    reduce_axes = tuple(range(2, len(view_shape)))               # (2, 3, ...): C/G and spatial
    check_count(reduced_count(view_shape, reduce_axes),
                what="group normalization", shape=x.shape)
    xg = xp.reshape(xc, view_shape)                              # (N, G, C/G, H, W)
    mu, var = moments(xg, reduce_axes)                           # (N, G, 1, 1, 1)
    x_hat_g, rstd = standardize(xg, mu, var, eps=eps)            # (N, G, C/G, H, W)
    x_hat = xp.reshape(x_hat_g, x.shape)                         # (N, C, H, W)
    y = affine_forward(x_hat, gamma_c, beta_c)                   # (N, C, H, W)
    cache = GroupNormCache(
        x_hat=x_hat, rstd=rstd, gamma=gamma_c, mean=mu, var=var,
        view_shape=view_shape, reduce_axes=reduce_axes, batch_stats=True,
        x_dtype=x.dtype, param_dtype=gamma.dtype,
    )
    return xp.astype(y, x.dtype, copy=False), cache


def group_norm_backward(dy: Array, cache: GroupNormCache) -> tuple[Array, Array, Array]:
    """Closed-form backward of :func:`group_norm_forward`, taken in the grouped view.

    Returns
    -------
    dx : array, (N, C, *spatial)
    dgamma, dbeta : arrays, (C,)
    """
    check_cache(cache, GroupNormCache)
    return channel_norm_backward(dy, cache)


class GroupNorm(ChannelNorm):
    """Group Normalization layer (same computation in training and at inference).

    Parameters
    ----------
    num_channels : int
    num_groups : int, default 32
        G, a divisor of ``num_channels`` (32 is the GN paper's default; smaller networks
        need a smaller G).
    eps : float, default 1e-5
    dtype, xp : see :class:`~refnorm.norms.base.ChannelNorm`
    """

    check_cases = (
        CheckCase((2, 6, 4, 4), {"num_groups": 3}),
        CheckCase((3, 8), {"num_groups": 2}),
        CheckCase((2, 4, 3, 3), {"num_groups": 1}),
        CheckCase((2, 4, 3, 3), {"num_groups": 4}),
    )
    backward_fn = staticmethod(group_norm_backward)

    def __init__(
        self,
        num_channels: int,
        *,
        num_groups: int = 32,
        eps: float = 1e-5,
        dtype: Any = None,
        xp: ModuleType | None = None,
    ) -> None:
        super().__init__(num_channels, eps=eps, dtype=dtype, xp=xp)
        check_groups(num_groups, num_channels)
        self.num_groups = num_groups

    def _forward(self, x: Array, training: bool) -> tuple[Array, GroupNormCache]:
        gamma, beta = self.params["gamma"], self.params["beta"]
        return group_norm_forward(x, gamma, beta, num_groups=self.num_groups, eps=self.eps)
