"""Fast CPU paths: numba kernels with the reference's math, tested equal to it.

:mod:`refnorm.kernels.norms` holds the normalizers (BN, IN, LN, GN, SN forward and backward),
:mod:`refnorm.kernels.nn` the convolution, max pooling and ReLU backward,
:mod:`refnorm.kernels._loops` the loops themselves. The functions take and return numpy
arrays with plain signatures; each names the reference function it equals. The first call of
each loop compiles it (cached on disk afterwards).

Idle OpenMP threads sleep rather than spin: ``OMP_WAIT_POLICY=PASSIVE`` unless the
environment says otherwise, set here before numba starts its thread pool. With the default
(active) policy, the training step of ``refnorm bench`` took 400-600 ms instead of 30 ms on
the 2-core machine while other processes ran (a spinning thread holds a core that a
descheduled peer needs at the next barrier).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# ruff: noqa: E402  (the policy must be set before numba is imported)

from refnorm.kernels.nn import (
    col2im,
    conv_backward,
    conv_forward,
    im2col,
    max_pool_backward,
    max_pool_forward,
    relu_backward,
)
from refnorm.kernels.norms import (
    bn_backward,
    bn_forward,
    gn_backward,
    gn_forward,
    in_backward,
    in_forward,
    ln_backward,
    ln_forward,
    sn_backward,
    sn_forward,
)

__all__ = [
    "bn_backward",
    "bn_forward",
    "col2im",
    "conv_backward",
    "conv_forward",
    "gn_backward",
    "gn_forward",
    "im2col",
    "in_backward",
    "in_forward",
    "ln_backward",
    "ln_forward",
    "max_pool_backward",
    "max_pool_forward",
    "relu_backward",
    "sn_backward",
    "sn_forward",
]
