"""refnorm: a numpy-first reference of normalization methods for deep networks.

Every method is a pair of pure functions ``*_forward(x, gamma, beta, *, eps, ...) ->
(y, cache)`` and ``*_backward(dy, cache)``, plus a layer object built by name::

    import refnorm
    layer = refnorm.build("gn", 64, num_groups=32)
    y = layer.forward(x, training=True)
    dx = layer.backward(dy)          # fills layer.grads

Importing refnorm needs numpy only; numba is imported on the first call of the fast path
(:mod:`refnorm.dispatch`, :mod:`refnorm.kernels`); CuPy, MPI, hypothesis (for
:mod:`refnorm.testing`) and Jupyter are optional.
"""

from refnorm import gradcheck, inference, nn, norms, sync, weights
from refnorm.inference import batch_average
from refnorm.norms import *  # noqa: F403  (the public functions and layers)
from refnorm.norms import __all__ as _norms_all
from refnorm.registry import build, names

__version__ = "0.1.0"

__all__ = ["batch_average", "build", "gradcheck", "inference", "names", "nn", "norms", "sync",
           "weights", *_norms_all]
