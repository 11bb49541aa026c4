"""Weight Standardization (Qiao, Wang, Liu, Shen & Yuille, 2019), §2, Eq. (2)-(9).

Each output channel's weights are standardized before the convolution:

    mu_c = mean_j W_cj,  sigma_c = sqrt(mean_j (W_cj - mu_c)^2)            # Eq. (4)
    W^_c = (W_c - mu_c) / (sigma_c + eps)                                   # Eq. (2)
    y = W^ * x                                                              # Eq. (3)

with no affine transform on W^ (the paper's choice: a BN or GN layer follows). The paper
splits the map in two steps for its analysis, centring and scaling,

    W._c = W_c - (1/I) 1 <1, W_c>                                           # Eq. (5)
    W^_c = W._c / sqrt((1/I) <1, W._c^2>)                                   # Eq. (6)

and, with eps = 0, back-propagates through them as

    dL/dW._c = (1/sigma_c) (dL/dW^_c - (1/I) <W^_c, dL/dW^_c> W^_c)         # Eq. (8)
    dL/dW_c  = dL/dW._c - (1/I) 1 <1, dL/dW._c>                             # Eq. (9)

refnorm's backward is Eq. (8)-(9) for the eps the forward uses: with d = sigma + eps (the
paper's Eq. 2, the default), d = sqrt(sigma^2 + eps) (``eps_mode="sqrt"``), and with the
official code's unbiased sigma (``correction=1``, ``I - 1`` in Eq. 4),

    dL/dW._c = (1/d) (dL/dW^_c - kappa <W^_c, dL/dW^_c> W^_c),
    kappa = d / (sigma (I - correction))   for d = sigma + eps,
    kappa = 1 / (I - correction)           for d = sqrt(sigma^2 + eps),

which is Eq. (8) for eps = 0 and correction = 0. A constant filter (sigma_c = 0)
standardizes to zero; with d = sigma + eps the projection term's limit as sigma -> 0 is 0
(it scales as sigma / (sigma + eps)), so dL/dW._c = dL/dW^_c / eps there, finite.

float16 weights compute in float32 and return float16.

The fast path (:mod:`refnorm.dispatch`) is at the end of the file: the same checks, then one
compiled pass per direction (:func:`refnorm.kernels.nn.ws_forward`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from refnorm.backend import Array, array_namespace, compute_dtype, on_device
from refnorm.core.checks import (
    check_bool,
    check_cache,
    check_eps,
    check_float_array,
    check_like,
    check_once,
    is_int,
)
from refnorm.core.moments import check_variance_finite
from refnorm.dispatch import dispatched
from refnorm.kernels import nn as kernels
from refnorm.layer import CheckCase, Layer
from refnorm.nn.init import he_normal
from refnorm.weights.base import (
    apply_weights,
    apply_weights_backward,
    per_output_view,
    weight_geometry,
)

EPS_MODES = ("add", "sqrt")


@dataclass(frozen=True)
class WeightStandardizationCache:
    """What :func:`weight_standardization_forward` saves, per output channel.

    Attributes
    ----------
    w_hat : array, (C_out, I)
        The standardized weights W^.
    denom : array, (C_out, 1)
        d = sigma + eps or sqrt(sigma^2 + eps).
    kappa : array, (C_out, 1)
        The projection coefficient of the generalized Eq. (8) (see the module docstring).
    shape : tuple of int
    w_dtype : dtype of ``w`` (and of the returned gradient)
    """

    w_hat: Array
    denom: Array
    kappa: Array
    shape: tuple[int, ...]
    w_dtype: Any


@dispatched
def weight_standardization_forward(
    w: Array, *, eps: float = 1e-5, eps_mode: str = "add", correction: int = 0
) -> tuple[Array, WeightStandardizationCache]:
    """Standardize each output channel's weights, Eq. (2)-(6).

    Parameters
    ----------
    w : array, (C_out, ...)
        (C_out, C_in, KH, KW) or (D_out, D_in); I = prod(shape[1:]) weights per channel.
    eps : float, > 0
    eps_mode : {"add", "sqrt"}
        "add": W^ = (W - mu) / (sigma + eps), the paper's Eq. (2) (default);
        "sqrt": W^ = (W - mu) / sqrt(sigma^2 + eps), as activation normalizers place it.
    correction : {0, 1}
        0: sigma with 1/I, the paper's Eq. (4); 1: 1/(I - 1), the official code's
        ``torch.std`` (unbiased).
    path : {"reference", "fast"}, optional
        Which implementation computes (:mod:`refnorm.dispatch`); default: the process-wide
        choice, else the reference. The work is C_out x I values whatever the batch: the fast
        path saves the dozen numpy calls (and their allocations) of each training step.

    Returns
    -------
    w_hat : array, ``w.shape``, dtype of ``w``
    cache : WeightStandardizationCache
    """
    xp, wc, I = _check(w, eps, eps_mode, correction)
    eps = float(eps)  # a numpy scalar would promote float32 (and is refused by array_api_strict)
    ww = per_output_view(xp, wc)                                   # (C_out, I)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow raises just below
        mu = xp.mean(ww, axis=1, keepdims=True)                    # (C_out, 1)  Eq. (4)
        w_dot = ww - mu                                            # (C_out, I)  Eq. (5)
        sq = xp.sum(w_dot * w_dot, axis=1, keepdims=True)          # (C_out, 1)
        sigma = xp.sqrt(sq / (I - correction))                     # (C_out, 1)  Eq. (4)
    check_variance_finite(sigma, ww, name="w")  # a sum beyond the dtype: refused, not w_hat = 0
    if eps_mode == "add":
        denom = sigma + eps                                        # Eq. (2)
        safe = xp.where(sigma > 0, sigma, xp.ones_like(sigma))
        kappa = xp.where(sigma > 0, denom / (safe * (I - correction)), xp.zeros_like(sigma))
    else:
        denom = xp.sqrt(sigma * sigma + eps)
        kappa = xp.ones_like(sigma) / (I - correction)
    w_hat = w_dot / denom                                          # (C_out, I)  Eq. (2), (6)
    cache = WeightStandardizationCache(w_hat, denom, kappa, tuple(w.shape), w.dtype)
    return xp.astype(xp.reshape(w_hat, w.shape), w.dtype, copy=False), cache


@dispatched
def weight_standardization_backward(dw_hat: Array, cache: WeightStandardizationCache) -> Array:
    """Gradient with respect to ``w`` from the gradient with respect to W^, Eq. (8)-(9).

    Parameters
    ----------
    dw_hat : array, ``w.shape``
        dL/dW^.
    cache : WeightStandardizationCache
    path : {"reference", "fast"}, optional
        As in :func:`weight_standardization_forward`.

    Returns
    -------
    dw : array, ``w.shape``, dtype of ``w``
    """
    check_cache(cache, WeightStandardizationCache)
    check_like("dw_hat", dw_hat, cache.shape)
    xp = array_namespace(dw_hat, cache.w_hat)
    g = per_output_view(xp, xp.astype(dw_hat, cache.w_hat.dtype, copy=False))  # (C_out, I)
    along = xp.sum(cache.w_hat * g, axis=1, keepdims=True)                   # <W^, g>
    dw_dot = (g - cache.kappa * along * cache.w_hat) / cache.denom           # Eq. (8)
    dw = dw_dot - xp.mean(dw_dot, axis=1, keepdims=True)                     # Eq. (9)
    return xp.astype(xp.reshape(dw, cache.shape), cache.w_dtype, copy=False)


def _check(w: Array, eps: float, eps_mode: str, correction: int) -> tuple[ModuleType, Array, int]:
    """Check the arguments of :func:`weight_standardization_forward`.

    Returns the namespace, ``w`` in the compute dtype and I, the weights per output channel.
    """
    xp = check_float_array("w", w)
    if w.ndim < 2:
        raise ValueError(f"w must have shape (C_out, ...) with at least 2 dimensions; "
                         f"got shape {tuple(w.shape)}")
    dtype = compute_dtype(xp, w.dtype)
    _check_options(eps, eps_mode, correction, xp=xp, dtype=dtype)
    I = math.prod(w.shape[1:])
    _check_fan_in(I, tuple(w.shape))
    return xp, xp.astype(w, dtype, copy=False), I


def _check_options(eps: float, eps_mode: str, correction: int, *, xp: ModuleType,
                   dtype: Any) -> None:
    check_eps(eps, xp=xp, dtype=dtype)
    if eps_mode not in EPS_MODES:
        raise ValueError(f"eps_mode must be one of {EPS_MODES}; got {eps_mode!r}")
    if not is_int(correction):
        raise TypeError(f"correction must be an int (0 or 1); got {type(correction).__name__}")
    if correction not in (0, 1):
        raise ValueError(f"correction must be 0 or 1; got {correction!r}")


def _check_fan_in(I: int, shape: tuple[int, ...]) -> None:
    if I < 2:
        raise ValueError(f"weight standardization needs more than 1 weight per output "
                         f"channel (its output would be 0); w of shape {shape} has {I}")


class WeightStandardization(Layer):
    """A convolution (or linear layer with ``kernel_size=None``) with standardized weights.

    Parameters
    ----------
    in_channels, out_channels : int
        C_in (or D_in) and C_out (or D_out); C_in KH KW (or D_in) must be at least 2.
    kernel_size : int, pair of int, or None
        The convolution's kernel; ``None`` makes a linear layer on (N, D_in) inputs.
    stride, padding : int or pair of int
        The convolution's stride and zero padding (unused by a linear layer).
    bias : bool, default False
        Whether the layer has the parameter ``b`` (the paper's layer has none: BN or GN
        follows).
    eps, eps_mode, correction
        As in :func:`weight_standardization_forward`.
    dtype, xp, device : where the parameters live (:class:`~refnorm.layer.Layer`)
    seed : int, default 0
        Seeds the He-normal draw of ``w`` (:func:`refnorm.nn.init.he_normal`).

    Learned parameters
    ------------------
    w : (C_out, C_in, KH, KW) or (D_out, D_in), He-normal (the paper's W, standardized in
        every forward)
    b : (C_out,), zeros; present only with ``bias=True``
    """

    check_cases = (
        CheckCase((2, 3, 5, 5), {"out_channels": 4, "kernel_size": 3, "padding": 1}),
        CheckCase((3, 5), {"out_channels": 4, "bias": True}),
        CheckCase((2, 2, 4, 4), {"out_channels": 3, "kernel_size": 2, "stride": 2,
                                 "eps_mode": "sqrt", "correction": 1}),
    )

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any = None, *,
                 stride: Any = 1, padding: Any = 0, bias: bool = False, eps: float = 1e-5,
                 eps_mode: str = "add", correction: int = 0, dtype: Any = None,
                 xp: ModuleType | None = None, device: Any = None, seed: int = 0) -> None:
        super().__init__(dtype=dtype, xp=xp, device=device)
        self.geometry = weight_geometry(in_channels, out_channels, kernel_size,
                                        stride=stride, padding=padding)
        has_bias = check_bool("bias", bias)
        _check_options(eps, eps_mode, correction, xp=self.xp,
                       dtype=compute_dtype(self.xp, self.dtype))
        _check_fan_in(self.geometry.fan_in, self.geometry.weight_shape)
        self.eps, self.eps_mode, self.correction = eps, eps_mode, int(correction)
        self.params = {"w": he_normal(self.geometry.weight_shape, fan_in=self.geometry.fan_in,
                                      seed=seed, xp=self.xp, dtype=self.dtype,
                                      device=self.device)}
        if has_bias:
            self.params["b"] = self.xp.zeros((self.geometry.out_channels,), dtype=self.dtype,
                                             **on_device(self.device))

    def _forward(self, x: Array, training: bool) -> tuple[Array, Any]:
        w_hat, w_cache = weight_standardization_forward(
            self.params["w"], eps=self.eps, eps_mode=self.eps_mode, correction=self.correction,
            path=self.compute_path())
        y, op_cache = apply_weights(x, w_hat, self.params.get("b"), self.geometry,  # Eq. (3)
                                    path=self.compute_path())
        return y, (w_cache, op_cache)

    def _backward(self, dy: Array, cache: Any) -> tuple[Array, dict[str, Array]]:
        w_cache, op_cache = cache
        dx, dw_hat, db = apply_weights_backward(dy, op_cache, self.geometry,
                                                path=self.compute_path(),
                                                input_grad=self.input_grad)
        dw = weight_standardization_backward(dw_hat, w_cache, path=self.compute_path())
        return dx, ({"w": dw} if db is None else {"w": dw, "b": db})


# -- the fast path: the same checks, then one compiled pass ---------------------------------------


@weight_standardization_forward.fast
def _weight_standardization_forward_fast(
    w: Array, *, eps: float = 1e-5, eps_mode: str = "add", correction: int = 0
) -> tuple[Array, WeightStandardizationCache]:
    check_once(lambda: ("weight_standardization", type(w), w.shape, w.dtype, type(eps), eps,
                        type(eps_mode), eps_mode, type(correction), correction),
               lambda: _check(w, eps, eps_mode, correction))
    k = kernels.ws_forward(w, eps, eps_mode, correction)
    w_hat = k.w_hat.reshape(w.shape)
    cache = WeightStandardizationCache(k.w_hat, k.denom, k.kappa, tuple(w.shape), w.dtype)
    return (w_hat if w_hat.dtype == w.dtype else w_hat.astype(w.dtype)), cache


def _check_geometry(cache: WeightStandardizationCache) -> None:
    """The fast backward's check that the cache's arrays have the forward's shapes: its loop
    reads ``denom`` and ``kappa`` at every row of ``w_hat``, so a cache built or edited by hand
    with fewer (the reference broadcasts a (1, 1) one) would make it read outside them."""
    C_out = cache.shape[0] if len(cache.shape) >= 2 else -1
    I = math.prod(cache.shape[1:])
    for name, a, shape in (("w_hat", cache.w_hat, (C_out, I)), ("denom", cache.denom, (C_out, 1)),
                           ("kappa", cache.kappa, (C_out, 1))):
        if not (isinstance(a, np.ndarray) and a.dtype in (np.float32, np.float64)
                and a.shape == shape):
            raise ValueError(
                f"weight_standardization_backward: the cache's {name} has shape "
                f"{getattr(a, 'shape', None)} and dtype {getattr(a, 'dtype', None)}, where the "
                f"forward makes {shape} float32 or float64 for weights of shape "
                f"{cache.shape}; the fast path reads only caches its forward made")


@weight_standardization_backward.fast
def _weight_standardization_backward_fast(dw_hat: Array,
                                          cache: WeightStandardizationCache) -> Array:
    check_cache(cache, WeightStandardizationCache)
    check_once(lambda: ("dw_hat", type(dw_hat), dw_hat.shape, dw_hat.dtype, cache.shape),
               lambda: check_like("dw_hat", dw_hat, cache.shape))
    check_once(lambda: ("ws cache", cache.shape, *((type(a), a.shape, a.dtype) for a in (
        cache.w_hat, cache.denom, cache.kappa))), lambda: _check_geometry(cache))
    dw = kernels.ws_backward(dw_hat, cache.w_hat, cache.denom, cache.kappa).reshape(cache.shape)
    return dw if dw.dtype == cache.w_dtype else dw.astype(cache.w_dtype)
