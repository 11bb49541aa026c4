"""Normalization Propagation (Arpit, Zhou, Kota & Govindaraju, 2016), as written by
Gitman & Ginsburg (2017), §3.2.

NP is Weight Normalization followed by a ReLU whose output is re-normalized with the
moments of a rectified standard Gaussian: if z ~ N(0, 1), ReLU(z) has mean 1/sqrt(2 pi) and
standard deviation sqrt(1/2 (1 - 1/pi)). The combined convolution + ReLU update rule is

    o_j = [ReLU(gamma_j W_j * x / (||W_j||_F + eps) + beta_j) - sqrt(1/(2 pi))]
          / sqrt(1/2 (1 - 1/pi))

so standard-normal inputs through a near-orthogonal (unit-norm-row) weight come out with
zero mean and unit variance again, layer after layer: the property NP is built on. The
constants assume gamma = 1 and beta = 0 (Gitman & Ginsburg point this out; TReLU is their
answer, :mod:`refnorm.weights.trelu`).

The re-normalized ReLU here (:func:`norm_prop_relu_forward`) is not the translated ReLU of
:mod:`refnorm.weights.trelu`: this one subtracts fixed constants after the ReLU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from refnorm.backend import Array, array_namespace
from refnorm.core.checks import check_float_array, check_like
from refnorm.layer import CheckCase
from refnorm.weights.weight_norm import WeightNorm

RELU_MEAN = 1.0 / math.sqrt(2.0 * math.pi)        # E[ReLU(z)], z ~ N(0, 1)
RELU_STD = math.sqrt(0.5 * (1.0 - 1.0 / math.pi))  # std[ReLU(z)], z ~ N(0, 1)


@dataclass(frozen=True)
class NormPropReLUCache:
    """The pre-activation ``z``, for the ReLU's derivative."""

    z: Array


def norm_prop_relu_forward(z: Array) -> tuple[Array, NormPropReLUCache]:
    """(ReLU(z) - 1/sqrt(2 pi)) / sqrt(1/2 (1 - 1/pi)), elementwise."""
    xp = check_float_array("z", z)
    y = (xp.where(z > 0, z, xp.zeros_like(z)) - RELU_MEAN) / RELU_STD
    return y, NormPropReLUCache(z)


def norm_prop_relu_backward(dy: Array, cache: NormPropReLUCache) -> Array:
    """dz = dy / sqrt(1/2 (1 - 1/pi)) where z > 0, else 0 (0 at z = 0)."""
    check_like("dy", dy, cache.z.shape)
    xp = array_namespace(dy, cache.z)
    return xp.where(cache.z > 0, dy / RELU_STD, xp.zeros_like(dy))


class NormProp(WeightNorm):
    """Normalization Propagation: a weight-normalized convolution (or linear layer) with
    gain ``g`` (the formula's gamma) and bias ``b`` (beta), then the re-normalized ReLU.

    Arguments as for :class:`~refnorm.weights.weight_norm.WeightNorm`.
    """

    check_cases = (
        CheckCase((2, 3, 5, 5), {"out_channels": 4, "kernel_size": 3, "padding": 1}),
        CheckCase((3, 5), {"out_channels": 4}),
    )

    def post(self, z: Array) -> tuple[Array, Any]:
        return norm_prop_relu_forward(z)

    def post_backward(self, dy: Array, cache: Any) -> tuple[Array, dict[str, Array]]:
        return norm_prop_relu_backward(dy, cache), {}
