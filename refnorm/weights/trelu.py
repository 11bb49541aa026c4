"""Weight Normalization with translated ReLU (Xiang & Li, 2017), as written by
Gitman & Ginsburg (2017), §3.2.

Each layer normalizes its filters to unit norm, with no gain and no bias, and replaces the
ReLU by a translated ReLU with a learned threshold alpha_j per output channel:

    o_j = TReLU_alpha_j(W_j * x / (||W_j||_F + eps)),  TReLU_a(z) := ReLU(z - a) + a

Scale gamma and bias beta are applied only to the output of the network's last layer,
``o_last = gamma * x_last + beta`` (a per-channel affine layer the model adds; see
:func:`refnorm.core.affine_forward`).

Not to be confused with Normalization Propagation's re-normalized ReLU
(:mod:`refnorm.weights.norm_prop`), which subtracts fixed rectified-Gaussian constants: the
translated ReLU learns where it bends and passes values above the threshold unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refnorm.backend import Array, array_namespace
from refnorm.core.affine import channel_view, non_channel_axes
from refnorm.core.checks import check_channel_param, check_eps, check_float_array, check_like
from refnorm.layer import CheckCase
from refnorm.weights.base import WeightLayer
from refnorm.weights.weight_norm import WeightNormCache, weight_norm_backward, weight_norm_forward


@dataclass(frozen=True)
class TranslatedReLUCache:
    """Where the input passed the threshold: ``z > alpha``, (N, C, *spatial)."""

    passed: Array


def translated_relu_forward(z: Array, alpha: Array) -> tuple[Array, TranslatedReLUCache]:
    """TReLU_alpha(z) = ReLU(z - alpha) + alpha = max(z, alpha), alpha per channel.

    Parameters
    ----------
    z : array, (N, C, *spatial)
    alpha : array, (C,)
    """
    xp = check_float_array("z", z)
    check_channel_param("alpha", alpha, z.shape[1])
    a = channel_view(alpha, z.ndim)                                # (1, C, 1, 1)
    passed = z > a
    return xp.where(passed, z, xp.zeros_like(z) + a), TranslatedReLUCache(passed)


def translated_relu_backward(dy: Array, cache: TranslatedReLUCache) -> tuple[Array, Array]:
    """dz = dy where z > alpha, else 0; dalpha = sum of dy where z <= alpha (per channel).

    At z = alpha exactly the derivative goes to alpha (the ReLU's 0 at 0).
    """
    check_like("dy", dy, cache.passed.shape)
    xp = array_namespace(dy)
    dz = xp.where(cache.passed, dy, xp.zeros_like(dy))
    dalpha = xp.sum(dy - dz, axis=non_channel_axes(dy.ndim))       # (C,)
    return dz, dalpha


class TReLUWeightNorm(WeightLayer):
    """Unit-norm filters (Weight Normalization without gain or bias), then the translated ReLU.

    Params: ``v`` (C_out, C_in, KH, KW) He-normal, ``alpha`` (C_out,) zeros. Other arguments
    as for :class:`~refnorm.weights.base.WeightLayer`, plus ``eps`` (default 1e-5).
    """

    check_cases = (
        CheckCase((2, 3, 5, 5), {"out_channels": 4, "kernel_size": 3, "padding": 1}),
        CheckCase((3, 5), {"out_channels": 4}),
    )

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any = None, *,
                 eps: float = 1e-5, **kw: Any) -> None:
        super().__init__(in_channels, out_channels, kernel_size, **kw)
        check_eps(eps)
        self.eps = eps
        self.params["alpha"] = self.xp.zeros((out_channels,), dtype=self.dtype)

    def weight(self) -> tuple[Array, WeightNormCache]:
        v = self.params["v"]
        ones = self.xp.ones((v.shape[0],), dtype=v.dtype)
        return weight_norm_forward(v, ones, eps=self.eps)

    def weight_grads(self, dw: Array, cache: WeightNormCache) -> dict[str, Array]:
        dv, _ = weight_norm_backward(dw, cache)  # the gain is fixed at 1: no gradient kept
        return {"v": dv}

    def post(self, z: Array) -> tuple[Array, Any]:
        return translated_relu_forward(z, self.params["alpha"])

    def post_backward(self, dy: Array, cache: Any) -> tuple[Array, dict[str, Array]]:
        dz, dalpha = translated_relu_backward(dy, cache)
        return dz, {"alpha": dalpha}
