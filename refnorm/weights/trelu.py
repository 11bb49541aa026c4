"""Weight Normalization with translated ReLU (Xiang & Li, 2017), as written by
Gitman & Ginsburg (2017), §3.2.

Each layer normalizes its filters to unit norm, with no gain and no bias, and replaces the
ReLU by a translated ReLU with a learned threshold alpha_j per output channel (Gitman &
Ginsburg's sixth display formula in refnorm's numbering, ``# GG Eq. (6)`` in the code):

    o_j = TReLU_alpha_j(W_j * x / (||W_j||_F + eps)),  TReLU_a(z) := ReLU(z - a) + a

Scale gamma and bias beta are applied only to the output of the network's last layer,
``o_last = gamma * x_last + beta`` (their seventh; a per-channel affine layer the model adds,
:class:`refnorm.train.model.ChannelAffine`).

float16 inputs compute in float32 and return float16.

Not to be confused with Normalization Propagation's re-normalized ReLU
(:mod:`refnorm.weights.norm_prop`), which subtracts fixed rectified-Gaussian constants: the
translated ReLU learns where it bends and passes values above the threshold unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from refnorm.backend import Array, array_namespace, compute_dtype, on_device
from refnorm.core.affine import channel_view, non_channel_axes
from refnorm.core.checks import (
    check_cache,
    check_channel_param,
    check_eps,
    check_float_array,
    check_like,
    check_ndim,
)
from refnorm.layer import CheckCase, Layer
from refnorm.nn.init import he_normal
from refnorm.weights.base import apply_weights, apply_weights_backward, weight_geometry
from refnorm.weights.weight_norm import weight_norm_backward, weight_norm_forward


@dataclass(frozen=True)
class TranslatedReLUCache:
    """What :func:`translated_relu_forward` saves.

    Attributes
    ----------
    passed : array of bool, (N, C, *spatial)
        Where the input passed the threshold, ``z > alpha``.
    z_dtype, alpha_dtype : dtypes
        The dtypes ``dz`` and ``dalpha`` are returned in.
    """

    passed: Array
    z_dtype: Any
    alpha_dtype: Any


def translated_relu_forward(z: Array, alpha: Array) -> tuple[Array, TranslatedReLUCache]:
    """TReLU_alpha(z) = ReLU(z - alpha) + alpha = max(z, alpha), alpha per channel.

    No ``path``: element-wise, a few numpy passes over ``z``; the layer's convolution, which
    dominates, takes the layer's path.

    Parameters
    ----------
    z : array, (N, C, *spatial)
    alpha : array, (C,)

    Returns
    -------
    y : array, ``z.shape``, dtype of ``z`` (float16 computes in float32)
    cache : TranslatedReLUCache
    """
    xp = check_float_array("z", z)
    check_ndim("z", z, min_ndim=2, layout="(N, C, *spatial)")
    check_channel_param("alpha", alpha, z.shape[1], axis="z's channel axis")
    array_namespace(z, alpha)  # one namespace for both
    dtype = compute_dtype(xp, z.dtype)
    zc = xp.astype(z, dtype, copy=False)                           # (N, C, *spatial)
    a = channel_view(xp.astype(alpha, dtype, copy=False), z.ndim)  # (1, C, 1, 1)
    passed = zc > a
    y = xp.maximum(zc, xp.zeros_like(zc) + a)                      # GG Eq. (6); NaN stays NaN
    return xp.astype(y, z.dtype, copy=False), TranslatedReLUCache(passed, z.dtype, alpha.dtype)


def translated_relu_backward(dy: Array, cache: TranslatedReLUCache) -> tuple[Array, Array]:
    """dz = dy where z > alpha, else 0; dalpha = sum of dy where z <= alpha (per channel).

    At z = alpha exactly the derivative goes to alpha (the ReLU's 0 at 0).

    No ``path``: element-wise, as :func:`translated_relu_forward`.

    Parameters
    ----------
    dy : array, (N, C, *spatial)
    cache : TranslatedReLUCache

    Returns
    -------
    dz : array, (N, C, *spatial), dtype of ``z``
    dalpha : array, (C,), dtype of ``alpha``
    """
    check_cache(cache, TranslatedReLUCache)
    check_like("dy", dy, cache.passed.shape)
    xp = array_namespace(dy, cache.passed)
    dyc = xp.astype(dy, compute_dtype(xp, cache.z_dtype), copy=False)
    dz = xp.where(cache.passed, dyc, xp.zeros_like(dyc))                     # (N, C, *spatial)
    dalpha = xp.sum(dyc - dz, axis=non_channel_axes(dy.ndim))                # (C,)
    return (xp.astype(dz, cache.z_dtype, copy=False),
            xp.astype(dalpha, cache.alpha_dtype, copy=False))


class TReLUWeightNorm(Layer):
    """Unit-norm filters (Weight Normalization without gain or bias), then the translated ReLU.

    Parameters
    ----------
    in_channels, out_channels : int
        C_in (or D_in) and C_out (or D_out).
    kernel_size : int, pair of int, or None
        The convolution's kernel; ``None`` makes a linear layer on (N, D_in) inputs.
    stride, padding : int or pair of int
        The convolution's stride and zero padding (unused by a linear layer).
    eps : float, default 1e-5
    dtype, xp, device : where the parameters live (:class:`~refnorm.layer.Layer`)
    seed : int, default 0
        Seeds the He-normal draw of ``v`` (:func:`refnorm.nn.init.he_normal`).

    Learned parameters
    ------------------
    v : (C_out, C_in, KH, KW) or (D_out, D_in), He-normal
    alpha : (C_out,), zeros
    """

    check_cases = (
        CheckCase((2, 3, 5, 5), {"out_channels": 4, "kernel_size": 3, "padding": 1}),
        CheckCase((3, 5), {"out_channels": 4}),
    )

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any = None, *,
                 stride: Any = 1, padding: Any = 0, eps: float = 1e-5, dtype: Any = None,
                 xp: ModuleType | None = None, device: Any = None, seed: int = 0) -> None:
        super().__init__(dtype=dtype, xp=xp, device=device)
        self.geometry = weight_geometry(in_channels, out_channels, kernel_size,
                                        stride=stride, padding=padding)
        check_eps(eps, xp=self.xp, dtype=compute_dtype(self.xp, self.dtype))
        self.eps = eps
        self.params = {
            "v": he_normal(self.geometry.weight_shape, fan_in=self.geometry.fan_in, seed=seed,
                           xp=self.xp, dtype=self.dtype, device=self.device),
            "alpha": self.xp.zeros((self.geometry.out_channels,), dtype=self.dtype,
                                   **on_device(self.device)),
        }

    def _forward(self, x: Array, training: bool) -> tuple[Array, Any]:
        unit_gain = self.xp.ones_like(self.params["alpha"])           # (C_out,)
        w, w_cache = weight_norm_forward(self.params["v"], unit_gain, eps=self.eps)
        z, op_cache = apply_weights(x, w, None, self.geometry, path=self.compute_path())
        y, relu_cache = translated_relu_forward(z, self.params["alpha"])  # GG Eq. (6)
        return y, (w_cache, op_cache, relu_cache)

    def _backward(self, dy: Array, cache: Any) -> tuple[Array, dict[str, Array]]:
        w_cache, op_cache, relu_cache = cache
        dz, dalpha = translated_relu_backward(dy, relu_cache)
        dx, dw, _ = apply_weights_backward(dz, op_cache, self.geometry,  # no bias
                                           path=self.compute_path(), input_grad=self.input_grad)
        dv, _ = weight_norm_backward(dw, w_cache)  # the gain is fixed at 1: no gradient kept
        return dx, {"v": dv, "alpha": dalpha}
