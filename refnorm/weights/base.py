"""What the weight-side methods share: the per-output-channel view and the layer wiring.

Every method here reparameterizes a weight tensor ``w`` of shape (C_out, ...) one output
channel at a time: it is viewed as (C_out, I), I = the number of weights feeding one output
channel (C_in * KH * KW for a convolution, D_in for a linear layer), transformed, and reshaped
back. The layers then run an ordinary convolution or linear map with the transformed weights
(:mod:`refnorm.nn`), so the backward is the op's backward followed by the reparameterization's.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from refnorm.backend import Array
from refnorm.layer import Layer
from refnorm.nn.conv import conv2d_backward, conv2d_forward
from refnorm.nn.linear import linear_backward, linear_forward


def per_output_view(xp: ModuleType, w: Array) -> Array:
    """``w`` of shape (C_out, ...) viewed as (C_out, I)."""
    return xp.reshape(w, (w.shape[0], -1))


class WeightLayer(Layer):
    """A convolution or linear layer whose weight is a function of its parameters.

    Parameters
    ----------
    in_channels, out_channels : int
        C_in (or D_in) and C_out (or D_out).
    kernel_size : int, pair of int, or None
        The convolution's kernel; ``None`` makes a linear layer on (N, D_in) inputs.
    stride, padding : int or pair
        The convolution's stride and zero padding (ignored for a linear layer).
    dtype, xp, seed : parameter dtype (float32 by default), array namespace (numpy by
        default), and the seed of the He-normal initialization of the raw weights ``v``.

    The raw weight parameter is named by the class attribute ``raw_name`` ("v" in
    Salimans & Kingma's notation; Weight Standardization calls it "w").

    Subclasses implement :meth:`weight` (parameters -> (w, cache)) and :meth:`weight_grads`
    (dw, cache -> parameter gradients), and may wrap the op's output with :meth:`post` /
    :meth:`post_backward`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any = None, *,
                 stride: Any = 1, padding: Any = 0, dtype: Any = None,
                 xp: ModuleType | None = None, seed: int = 0) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        self.xp = np if xp is None else xp
        self.dtype = self.xp.float32 if dtype is None else dtype
        self.kernel_size = None if kernel_size is None else _pair(kernel_size)
        self.stride, self.padding = stride, padding
        shape = (out_channels, in_channels) + (self.kernel_size or ())
        fan_in = int(np.prod(shape[1:]))
        v = np.random.default_rng(seed).standard_normal(shape) * np.sqrt(2.0 / fan_in)
        self.params = {self.raw_name: self.xp.asarray(v, dtype=self.dtype)}

    raw_name = "v"

    # -- to be provided by each method --------------------------------------------------------
    def weight(self) -> tuple[Array, Any]:
        raise NotImplementedError

    def weight_grads(self, dw: Array, cache: Any) -> dict[str, Array]:
        raise NotImplementedError

    def post(self, z: Array) -> tuple[Array, Any]:
        """What follows the op (identity by default): returns (y, cache)."""
        return z, None

    def post_backward(self, dy: Array, cache: Any) -> tuple[Array, dict[str, Array]]:
        """Backward of :meth:`post`: returns (dz, parameter gradients)."""
        return dy, {}

    def bias(self) -> Array | None:
        return None

    # -- the wiring ---------------------------------------------------------------------------
    def preactivation(self, x: Array) -> Array:
        """The op's output before :meth:`post` (no cache kept, nothing to backward)."""
        return self._op(x, self.weight()[0])[0]

    def _op(self, x: Array, w: Array) -> tuple[Array, Any]:
        if self.kernel_size is None:
            return linear_forward(x, w, self.bias())
        return conv2d_forward(x, w, self.bias(), stride=self.stride, padding=self.padding)

    def _forward(self, x: Array, training: bool) -> tuple[Array, Any]:
        w, w_cache = self.weight()
        z, op_cache = self._op(x, w)
        y, post_cache = self.post(z)
        return y, (w_cache, op_cache, post_cache)

    def _backward(self, dy: Array, cache: Any) -> tuple[Array, dict[str, Array]]:
        w_cache, op_cache, post_cache = cache
        dz, grads = self.post_backward(dy, post_cache)
        backward = linear_backward if self.kernel_size is None else conv2d_backward
        dx, dw, db = backward(dz, op_cache)
        grads = {**grads, **self.weight_grads(dw, w_cache)}
        if db is not None and "b" in self.params:
            grads["b"] = db
        return dx, grads


def _pair(k: Any) -> tuple[int, int]:
    if isinstance(k, int) and not isinstance(k, bool):
        return (k, k)
    if isinstance(k, tuple) and len(k) == 2 and all(isinstance(i, int) for i in k):
        return k
    raise ValueError(f"kernel_size must be an int, a pair of ints, or None; got {k!r}")
