"""Fast paths: numba kernels with the reference's math, tested equal to it.

- :mod:`refnorm.kernels.norms` — the normalizers (BN, IN, LN, GN, SN forward and backward) on
  numpy arrays, on the CPU;
- :mod:`refnorm.kernels.nn` — the convolution (with its ``im2col`` and ``col2im``), max
  pooling, ReLU forward and backward and Weight Standardization on the CPU;
- :mod:`refnorm.kernels.blocks` — the convolution's samples in blocks on helper threads;
- :mod:`refnorm.kernels._loops` — the CPU loops themselves (``numba.njit``);
- :mod:`refnorm.kernels.cuda` and :mod:`refnorm.kernels._cuda_loops` — BN, IN, LN, GN and SN
  on CuPy arrays, written with ``numba.cuda`` (tested under numba's CUDA simulator).

The functions take and return arrays with plain signatures; each names the reference function
it equals and returns a named record (:mod:`refnorm.kernels.records`) where the result has
several fields (``relu_forward``: a plain ``(y, positive)`` pair), else one array (``im2col``,
``col2im``, ``max_pool_backward``, ``relu_backward``, ``ws_backward``). Importing this package
imports no numba: the loops are imported on the first kernel call, and each loop compiles on
its first call (cached on disk afterwards). The public functions of :mod:`refnorm.norms`,
:mod:`refnorm.nn` and :mod:`refnorm.weights` (Weight Standardization) reach them by import,
through :func:`refnorm.dispatch.dispatched`.

Idle OpenMP threads sleep rather than spin: ``OMP_WAIT_POLICY=PASSIVE`` unless the
environment says otherwise, set here before numba starts its thread pool. With the default
(active) policy, the training step of ``refnorm bench`` took 400-600 ms instead of 30 ms on
the 2-core machine while other processes ran (a spinning thread holds a core that a
descheduled peer needs at the next barrier).
"""

import functools
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# ruff: noqa: E402  (the policy is set before anything below can import numba)

from refnorm.kernels.nn import (
    col2im,
    conv_backward,
    conv_forward,
    im2col,
    max_pool_backward,
    max_pool_forward,
    relu_backward,
    relu_forward,
    ws_backward,
    ws_forward,
)
from refnorm.kernels.norms import (
    bn_backward,
    bn_forward,
    eval_backward,
    eval_forward,
    gn_backward,
    gn_forward,
    in_backward,
    in_forward,
    ln_backward,
    ln_forward,
    sn_backward,
    sn_forward,
)


@functools.cache
def numba_installed() -> bool:
    """Whether numba imports (the CPU kernels need it); imports it on the first call."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = [
    "bn_backward",
    "bn_forward",
    "col2im",
    "conv_backward",
    "conv_forward",
    "eval_backward",
    "eval_forward",
    "gn_backward",
    "gn_forward",
    "im2col",
    "in_backward",
    "in_forward",
    "ln_backward",
    "ln_forward",
    "max_pool_backward",
    "max_pool_forward",
    "numba_installed",
    "relu_backward",
    "relu_forward",
    "sn_backward",
    "sn_forward",
    "ws_backward",
    "ws_forward",
]
