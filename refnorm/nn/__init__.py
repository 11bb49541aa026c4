"""What the tiny conv-net needs: convolution, linear map, ReLU, pooling and the loss.

Each operation is a pair of pure functions, ``*_forward(x, ...) -> (y, cache)`` and
``*_backward(dy, cache)``, and a :class:`~refnorm.layer.Layer` object:

- :mod:`~refnorm.nn.conv` — :func:`conv2d_forward` by :func:`im2col` and a matmul, its
  adjoint :func:`col2im`, the layer :class:`Conv2d` (registered as ``"conv"``);
- :mod:`~refnorm.nn.linear` — :func:`linear_forward`, :class:`Linear` (``"linear"``);
- :mod:`~refnorm.nn.activations` — :func:`relu_forward`, :class:`ReLU`;
- :mod:`~refnorm.nn.pooling` — max, average and global average pooling;
- :mod:`~refnorm.nn.loss` — :func:`softmax_cross_entropy` and its backward.

Importing this package registers ``"conv"`` and ``"linear"``, so that
``refnorm.build("conv", C_in, C_out, kernel_size)`` and ``refnorm gradcheck conv`` work.
The parameter-free layers are not registered.
"""

from refnorm.nn.activations import ReLU, ReLUCache, relu_backward, relu_forward
from refnorm.nn.conv import (
    Conv2d,
    Conv2dCache,
    Window,
    col2im,
    conv2d_backward,
    conv2d_forward,
    im2col,
    sliding_window,
)
from refnorm.nn.init import he_normal
from refnorm.nn.linear import Linear, LinearCache, linear_backward, linear_forward
from refnorm.nn.loss import (
    SoftmaxCrossEntropyCache,
    softmax_cross_entropy,
    softmax_cross_entropy_backward,
)
from refnorm.nn.pooling import (
    AvgPool2d,
    GlobalAvgPool,
    GlobalAvgPoolCache,
    MaxPool2d,
    MaxPool2dCache,
    PoolCache,
    avg_pool2d_backward,
    avg_pool2d_forward,
    global_avg_pool_backward,
    global_avg_pool_forward,
    max_pool2d_backward,
    max_pool2d_forward,
)

__all__ = [
    "AvgPool2d",
    "Conv2d",
    "Conv2dCache",
    "GlobalAvgPool",
    "GlobalAvgPoolCache",
    "Linear",
    "LinearCache",
    "MaxPool2d",
    "MaxPool2dCache",
    "PoolCache",
    "ReLU",
    "ReLUCache",
    "SoftmaxCrossEntropyCache",
    "Window",
    "avg_pool2d_backward",
    "avg_pool2d_forward",
    "col2im",
    "conv2d_backward",
    "conv2d_forward",
    "global_avg_pool_backward",
    "global_avg_pool_forward",
    "he_normal",
    "im2col",
    "linear_backward",
    "linear_forward",
    "max_pool2d_backward",
    "max_pool2d_forward",
    "relu_backward",
    "relu_forward",
    "sliding_window",
    "softmax_cross_entropy",
    "softmax_cross_entropy_backward",
]
