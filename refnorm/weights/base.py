"""What the weight-side layers share: the per-output-channel view and the op they feed.

Every method here reparameterizes a weight tensor ``w`` of shape (C_out, ...) one output
channel at a time: it is viewed as (C_out, I), I = the number of weights feeding one output
channel (C_in * KH * KW for a convolution, D_in for a linear layer), transformed, and reshaped
back. The layers then run an ordinary convolution or linear map with the transformed weights
(:mod:`refnorm.nn`), so their backward is that op's backward followed by the
reparameterization's. This module holds those shared pieces as plain functions, which each
layer's ``_forward`` and ``_backward`` call explicitly:

- :func:`per_output_view` — (C_out, ...) viewed as (C_out, I);
- :class:`WeightGeometry` and :func:`weight_geometry` — the checked channel counts, kernel,
  stride and padding of a layer, and the shape and fan-in of its raw weights;
- :func:`apply_weights` and :func:`apply_weights_backward` — the convolution (or linear map)
  with given weights, and its backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from refnorm.backend import Array
from refnorm.core.checks import as_pair, check_positive_int
from refnorm.nn.conv import Conv2dCache, conv2d_backward, conv2d_forward
from refnorm.nn.linear import LinearCache, linear_backward, linear_forward


def per_output_view(xp: ModuleType, w: Array) -> Array:
    """``w`` of shape (C_out, ...) viewed as (C_out, I), I = prod(shape[1:])."""
    return xp.reshape(w, (w.shape[0], math.prod(w.shape[1:])))  # -1 fails for C_out = 0


@dataclass(frozen=True)
class WeightGeometry:
    """The op a weight-side layer runs: a convolution, or a linear map without a kernel.

    Attributes
    ----------
    in_channels, out_channels : int
        C_in (or D_in) and C_out (or D_out).
    kernel_size : pair of int, or None
        (KH, KW) of the convolution; ``None`` for a linear layer on (N, D_in) inputs.
    stride, padding : pair of int
        The convolution's stride and zero padding (unused by a linear layer).
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int] | None
    stride: tuple[int, int]
    padding: tuple[int, int]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """(C_out, C_in, KH, KW) for a convolution, (D_out, D_in) for a linear layer."""
        return (self.out_channels, self.in_channels) + (self.kernel_size or ())

    @property
    def fan_in(self) -> int:
        """I, the inputs of one output unit: C_in KH KW, or D_in."""
        return math.prod(self.weight_shape[1:])


def weight_geometry(in_channels: Any, out_channels: Any, kernel_size: Any = None, *,
                    stride: Any = 1, padding: Any = 0) -> WeightGeometry:
    """Check a weight-side layer's constructor arguments (as :mod:`refnorm.nn` checks its own).

    Parameters
    ----------
    in_channels, out_channels : int
        Python or numpy integers ``>= 1``.
    kernel_size : int, pair of int, or None
        ``None`` makes a linear layer.
    stride : int or pair of int, ``>= 1``
    padding : int or pair of int, ``>= 0``

    Raises
    ------
    TypeError
        If a count is not an int, or ``kernel_size``, ``stride`` or ``padding`` is neither an
        int nor a pair of ints.
    ValueError
        If a count or a kernel size is below 1, a stride below 1 or a padding below 0.
    """
    return WeightGeometry(
        in_channels=check_positive_int("in_channels", in_channels),
        out_channels=check_positive_int("out_channels", out_channels),
        kernel_size=None if kernel_size is None else as_pair("kernel_size", kernel_size,
                                                             minimum=1),
        stride=as_pair("stride", stride, minimum=1),
        padding=as_pair("padding", padding, minimum=0),
    )


def apply_weights(x: Array, w: Array, b: Array | None, geometry: WeightGeometry, *,
                  path: str | None = None) -> tuple[Array, Conv2dCache | LinearCache]:
    """Run the layer's op with the (reparameterized) weights ``w``.

    Parameters
    ----------
    x : array, (N, C_in, H, W), or (N, D_in) for a linear layer
    w : array, ``geometry.weight_shape``
    b : array, (C_out,), or None
    geometry : WeightGeometry
    path : {"reference", "fast"}, optional
        The convolution's implementation (:mod:`refnorm.dispatch`).

    Returns
    -------
    y : array, (N, C_out, H_out, W_out) or (N, D_out)
    cache : Conv2dCache or LinearCache
        For :func:`apply_weights_backward` with the same ``geometry``.
    """
    if geometry.kernel_size is None:
        return linear_forward(x, w, b)
    return conv2d_forward(x, w, b, stride=geometry.stride, padding=geometry.padding, path=path)


def apply_weights_backward(dy: Array, cache: Any, geometry: WeightGeometry, *,
                           path: str | None = None,
                           input_grad: bool = True) -> tuple[Array | None, Array, Array | None]:
    """Backward of :func:`apply_weights`: ``(dx, dw, db)``, ``db`` None without a bias.

    ``input_grad=False`` lets the convolution skip ``dx`` (None; a linear map computes it
    anyway, one small product). The op's own backward checks that ``cache`` is its cache (a
    linear layer's cache given to a convolution's backward is refused by name).
    """
    if geometry.kernel_size is None:
        return linear_backward(dy, cache)
    return conv2d_backward(dy, cache, input_grad=input_grad, path=path)
