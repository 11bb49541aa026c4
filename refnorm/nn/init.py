"""Weight initialization for the network layers (:mod:`refnorm.nn` and :mod:`refnorm.weights`).

He, Zhang, Ren & Sun, *Delving Deep into Rectifiers* (2015), §2.2: for a layer followed by a
ReLU, weights drawn from ``normal(0, sqrt(2 / fan_in))`` keep the variance of the activations
constant from layer to layer; ``fan_in`` is the number of inputs of one output unit
(C_in KH KW for a convolution, D_in for a linear layer).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from refnorm.backend import Array, on_device
from refnorm.core.checks import check_param_dtype, check_positive_int, is_int


def he_normal(
    shape: tuple[int, ...], *, fan_in: int, seed: int, xp: ModuleType, dtype: Any,
    device: Any = None,
) -> Array:
    """He/Kaiming-normal weights: ``normal(0, std)``, ``std = sqrt(2 / fan_in)``.

    Drawn in float64 by ``numpy.random.default_rng(seed)`` whatever the namespace, so a seed
    gives the same weights on every backend and device, then converted once to ``xp``,
    ``dtype`` and ``device`` (one host-to-device copy, at construction only).

    Parameters
    ----------
    shape : tuple of int
        (C_out, C_in, KH, KW) for a convolution, (D_out, D_in) for a linear layer.
    fan_in : int, >= 1
        Inputs of one output unit: C_in KH KW, or D_in.
    seed : int, >= 0
    xp : module
        The array namespace of the result.
    dtype : dtype
        A real floating dtype of ``xp``.
    device : device of ``xp``, optional
        Where the result is created; ``None``: the namespace's default (numpy's host, CuPy's
        current GPU).

    Returns
    -------
    w : array, ``shape``
    """
    if not is_int(seed):
        raise TypeError(f"seed must be an int; got {type(seed).__name__}")
    if seed < 0:  # numpy's "expected non-negative integer" would not name it
        raise ValueError(f"seed must be >= 0; got {seed}")
    fan_in = check_positive_int("fan_in", fan_in)
    dtype = check_param_dtype(xp, dtype)
    w = np.random.default_rng(seed).standard_normal(shape) * np.sqrt(2.0 / fan_in)
    return xp.asarray(w, dtype=dtype, **on_device(device))
