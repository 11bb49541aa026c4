"""Normalization Propagation (Arpit, Zhou, Kota & Govindaraju, 2016), as written by
Gitman & Ginsburg (2017), §3.2.

NP is Weight Normalization followed by a ReLU whose output is re-normalized with the
moments of a rectified standard Gaussian: if z ~ N(0, 1), ReLU(z) has mean 1/sqrt(2 pi) and
standard deviation sqrt(1/2 (1 - 1/pi)). The combined convolution + ReLU update rule
(Gitman & Ginsburg's fifth display formula in refnorm's numbering, ``# GG Eq. (5)`` in the
code) is

    o_j = [ReLU(gamma_j W_j * x / (||W_j||_F + eps) + beta_j) - sqrt(1/(2 pi))]
          / sqrt(1/2 (1 - 1/pi))

so standard-normal inputs through a near-orthogonal (unit-norm-row) weight come out with
zero mean and unit variance again, layer after layer: the property NP is built on. The
constants assume gamma = 1 and beta = 0 (Gitman & Ginsburg point this out; TReLU is their
answer, :mod:`refnorm.weights.trelu`).

float16 inputs compute in float32 and return float16.

The re-normalized ReLU here (:func:`norm_prop_relu_forward`) is not the translated ReLU of
:mod:`refnorm.weights.trelu`: this one subtracts fixed constants after the ReLU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from refnorm.backend import Array, array_namespace, compute_dtype
from refnorm.core.checks import check_cache, check_float_array, check_like
from refnorm.layer import CheckCase
from refnorm.weights.base import apply_weights, apply_weights_backward
from refnorm.weights.weight_norm import WeightNorm, weight_norm_backward, weight_norm_forward

RELU_MEAN = 1.0 / math.sqrt(2.0 * math.pi)        # E[ReLU(z)], z ~ N(0, 1)
RELU_STD = math.sqrt(0.5 * (1.0 - 1.0 / math.pi))  # std[ReLU(z)], z ~ N(0, 1)


@dataclass(frozen=True)
class NormPropReLUCache:
    """What :func:`norm_prop_relu_forward` saves.

    Attributes
    ----------
    passed : array of bool, ``z.shape``
        Where ``z > 0`` (the ReLU's derivative is 1 / RELU_STD there, else 0).
    z_dtype : dtype of ``z`` (and of the returned gradient)
    """

    passed: Array
    z_dtype: Any


def norm_prop_relu_forward(z: Array) -> tuple[Array, NormPropReLUCache]:
    """(ReLU(z) - 1/sqrt(2 pi)) / sqrt(1/2 (1 - 1/pi)), elementwise.

    No ``path``: element-wise, a few numpy passes over ``z``; the layer's convolution, which
    dominates, takes the layer's path.

    Parameters
    ----------
    z : array, any shape
        The pre-activation (N, C_out, H, W) or (N, D_out).

    Returns
    -------
    y : array, ``z.shape``, dtype of ``z`` (float16 computes in float32)
    cache : NormPropReLUCache
    """
    xp = check_float_array("z", z)
    zc = xp.astype(z, compute_dtype(xp, z.dtype), copy=False)
    passed = zc > 0
    y = (xp.maximum(zc, xp.zeros_like(zc)) - RELU_MEAN) / RELU_STD   # GG Eq. (5); NaN stays NaN
    return xp.astype(y, z.dtype, copy=False), NormPropReLUCache(passed, z.dtype)


def norm_prop_relu_backward(dy: Array, cache: NormPropReLUCache) -> Array:
    """dz = dy / sqrt(1/2 (1 - 1/pi)) where z > 0, else 0 (0 at z = 0).

    No ``path``: element-wise, as :func:`norm_prop_relu_forward`.

    Parameters
    ----------
    dy : array, ``z.shape``
    cache : NormPropReLUCache

    Returns
    -------
    dz : array, ``z.shape``, dtype of ``z``
    """
    check_cache(cache, NormPropReLUCache)
    check_like("dy", dy, cache.passed.shape)
    xp = array_namespace(dy, cache.passed)
    dyc = xp.astype(dy, compute_dtype(xp, cache.z_dtype), copy=False)
    dz = xp.where(cache.passed, dyc / RELU_STD, xp.zeros_like(dyc))
    return xp.astype(dz, cache.z_dtype, copy=False)


class NormProp(WeightNorm):
    """Normalization Propagation: a weight-normalized convolution (or linear layer) with
    gain ``g`` (the formula's gamma) and bias ``b`` (beta), then the re-normalized ReLU.

    Arguments, parameters and :meth:`~refnorm.weights.weight_norm.WeightNorm.init_from_batch`
    as for :class:`~refnorm.weights.weight_norm.WeightNorm`; the data-dependent
    initialization standardizes what enters the ReLU.
    """

    check_cases = (
        CheckCase((2, 3, 5, 5), {"out_channels": 4, "kernel_size": 3, "padding": 1}),
        CheckCase((3, 5), {"out_channels": 4}),
    )

    def _forward(self, x: Array, training: bool) -> tuple[Array, Any]:
        w, w_cache = weight_norm_forward(self.params["v"], self.params["g"], eps=self.eps)
        z, op_cache = apply_weights(x, w, self.params.get("b"), self.geometry,  # GG Eq. (5)
                                    path=self.compute_path())
        y, relu_cache = norm_prop_relu_forward(z)                     # GG Eq. (5)
        return y, (w_cache, op_cache, relu_cache)

    def _backward(self, dy: Array, cache: Any) -> tuple[Array, dict[str, Array]]:
        w_cache, op_cache, relu_cache = cache
        dz = norm_prop_relu_backward(dy, relu_cache)
        dx, dw, db = apply_weights_backward(dz, op_cache, self.geometry, path=self.compute_path(),
                                            input_grad=self.input_grad)
        dv, dg = weight_norm_backward(dw, w_cache)
        grads = {"v": dv, "g": dg} if db is None else {"v": dv, "g": dg, "b": db}
        return dx, grads
