"""Weight Normalization (Salimans & Kingma, 2016), as written by Gitman & Ginsburg (2017), §3.2.

Each output channel j of a convolution or linear layer uses the weight (§3.2's formula,
unnumbered there; refnorm numbers Gitman & Ginsburg's display formulas in order of
appearance, and this is their (3), ``# GG Eq. (3)`` in the code)

    W_j = g_j * V_j / (||V_j||_F + eps)           o_j = W_j * x + b_j

so that the direction (V_j) and the length (g_j) of the filter are learned separately; eps
sits outside the norm, as in Gitman & Ginsburg's formula. With N = ||V_j|| and
v_j = V_j / N, G = dL/dW_j:

    dL/dg_j = <G, V_j> / (N + eps)
    dL/dV_j = g_j / (N + eps) * (G - <G, v_j> v_j * N / (N + eps))

so <V_j, dL/dV_j> = g_j <G, V_j> eps / (N + eps)^2: the gradient is orthogonal to V_j up to
the eps term (exactly so for eps -> 0), which is what keeps ||V|| from shrinking under SGD.

A zero filter (N = 0) has W_j = 0 for any g_j; the gradient above has the finite limit
dL/dV_j = g_j G / eps, dL/dg_j = 0 (the projection term vanishes as N -> 0), which refnorm
returns; it never divides by N.

float16 weights compute in float32 (the squared norm of a float16 filter overflows once
||V_j|| > 256) and return float16. A squared norm that overflows the compute dtype (float32
filters of norm beyond 1.8e19) is refused with a ``ValueError``: it would make W_j = 0.

Salimans & Kingma's data-dependent initialization sets g and b from one batch so that the
pre-activations start with zero mean and unit variance per channel
(:meth:`WeightNorm.init_from_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from refnorm.backend import Array, array_namespace, compute_dtype, on_device
from refnorm.core.affine import non_channel_axes
from refnorm.core.checks import (
    check_bool,
    check_cache,
    check_channel_param,
    check_eps,
    check_float_array,
    check_like,
)
from refnorm.core.moments import moments
from refnorm.layer import CheckCase, Layer
from refnorm.nn.init import he_normal
from refnorm.weights.base import (
    apply_weights,
    apply_weights_backward,
    per_output_view,
    weight_geometry,
)


@dataclass(frozen=True)
class WeightNormCache:
    """What :func:`weight_norm_forward` saves, in the compute dtype.

    Attributes
    ----------
    v : array, (C_out, I)
        The raw weights, per output channel (for dL/dg).
    v_unit : array, (C_out, I)
        V_j / ||V_j||, zero for a zero filter.
    norm : array, (C_out, 1)
        ||V_j||_F.
    g : array, (C_out,)
    eps : float
    shape : tuple of int
        The weight shape (C_out, ...).
    v_dtype, g_dtype : dtypes
        The dtypes ``dv`` and ``dg`` are returned in.
    """

    v: Array
    v_unit: Array
    norm: Array
    g: Array
    eps: float
    shape: tuple[int, ...]
    v_dtype: Any
    g_dtype: Any


def weight_norm_forward(v: Array, g: Array, *, eps: float = 1e-5) -> tuple[Array, WeightNormCache]:
    """W_j = g_j V_j / (||V_j||_F + eps) for every output channel j.

    No ``path``: it acts on the weights (C_out x I values, whatever the batch), a few numpy
    passes; the layer's convolution, which dominates, takes the layer's path.

    Parameters
    ----------
    v : array, (C_out, ...)
        Raw weights (C_out, C_in, KH, KW) or (D_out, D_in).
    g : array, (C_out,)
        Lengths.
    eps : float, > 0

    Returns
    -------
    w : array, ``v.shape``, dtype of ``v`` (float16 computes in float32)
    cache : WeightNormCache
    """
    xp, vc, gc = _prepare(v, g, eps)
    eps = float(eps)  # a numpy scalar would promote float32 (and is refused by array_api_strict)
    vv = per_output_view(xp, vc)                                   # (C_out, I)
    with np.errstate(over="ignore"):  # an overflow raises just below
        norm = xp.sqrt(xp.sum(vv * vv, axis=1, keepdims=True))     # (C_out, 1)  ||V_j||
    _check_norm_finite(norm, vv)
    safe = xp.where(norm > 0, norm, xp.ones_like(norm))            # (C_out, 1)
    v_unit = xp.where(norm > 0, vv / safe, xp.zeros_like(vv))      # (C_out, I)
    w = vv * (xp.reshape(gc, (-1, 1)) / (norm + eps))              # (C_out, I)  GG Eq. (3)
    cache = WeightNormCache(vv, v_unit, norm, gc, eps, tuple(v.shape), v.dtype, g.dtype)
    return xp.astype(xp.reshape(w, v.shape), v.dtype, copy=False), cache


def _check_norm_finite(norm: Array, vv: Array) -> None:
    """Refuse a squared norm that overflowed (inf) from a finite filter: W_j would silently be
    0 and its gradient NaN (a NaN in ``v`` propagates as NaN instead, in its own filter only,
    so a non-finite filter elsewhere in ``v`` does not excuse an overflow)."""
    xp = array_namespace(norm, vv)
    overflowed = xp.isinf(norm) & xp.all(xp.isfinite(vv), axis=1, keepdims=True)  # (C_out, 1)
    if bool(xp.any(overflowed)):
        largest = float(xp.max(xp.where(overflowed, xp.abs(vv), xp.zeros_like(vv))))
        remedy = ("rescale v" if xp.isdtype(vv.dtype, xp.float64)
                  else "compute in float64 or rescale v")
        raise ValueError(f"the squared norm of a filter of v overflows {vv.dtype} (|v| up to "
                         f"{largest:.3g}); {remedy}")


def weight_norm_backward(dw: Array, cache: WeightNormCache) -> tuple[Array, Array]:
    """Gradients of :func:`weight_norm_forward`.

    No ``path``: as :func:`weight_norm_forward`, it acts on the weights only.

    Parameters
    ----------
    dw : array, ``v.shape``
        dL/dW.
    cache : WeightNormCache

    Returns
    -------
    dv : array, ``v.shape``, dtype of ``v``
    dg : array, (C_out,), dtype of ``g``
    """
    check_cache(cache, WeightNormCache)
    check_like("dw", dw, cache.shape)
    xp = array_namespace(dw, cache.v)
    G = per_output_view(xp, xp.astype(dw, cache.v.dtype, copy=False))   # (C_out, I)
    n, eps = cache.norm, cache.eps                                      # (C_out, 1)
    dg = xp.sum(G * cache.v, axis=1) / xp.reshape(n + eps, (-1,))       # (C_out,)
    along = xp.sum(G * cache.v_unit, axis=1, keepdims=True)             # (C_out, 1)
    scale = xp.reshape(cache.g, (-1, 1)) / (n + eps)                    # (C_out, 1)
    dv = scale * (G - along * cache.v_unit * (n / (n + eps)))           # (C_out, I)
    return (xp.astype(xp.reshape(dv, cache.shape), cache.v_dtype, copy=False),
            xp.astype(dg, cache.g_dtype, copy=False))


def _prepare(v: Array, g: Array, eps: float) -> tuple[ModuleType, Array, Array]:
    """Check the arguments of :func:`weight_norm_forward`; cast them to the compute dtype."""
    xp = check_float_array("v", v)
    if v.ndim < 2:
        raise ValueError(f"v must have shape (C_out, ...) with at least 2 dimensions; "
                         f"got shape {tuple(v.shape)}")
    if v.shape[0] == 0:
        raise ValueError(f"v must have at least one output channel (C_out >= 1); got shape "
                         f"{tuple(v.shape)}")
    check_channel_param("g", g, v.shape[0], axis="v's output axis (axis 0)")
    array_namespace(v, g)  # one namespace for both
    dtype = compute_dtype(xp, v.dtype)
    check_eps(eps, xp=xp, dtype=dtype)
    # Copies: the cache keeps them, and the caller may change v or g in place before backward.
    return xp, xp.astype(v, dtype, copy=True), xp.astype(g, dtype, copy=True)


class WeightNorm(Layer):
    """A weight-normalized convolution (or linear layer with ``kernel_size=None``).

    Parameters
    ----------
    in_channels, out_channels : int
        C_in (or D_in) and C_out (or D_out).
    kernel_size : int, pair of int, or None
        The convolution's kernel; ``None`` makes a linear layer on (N, D_in) inputs.
    stride, padding : int or pair of int
        The convolution's stride and zero padding (unused by a linear layer).
    bias : bool, default True
        Whether the layer has the parameter ``b`` (:meth:`init_from_batch` needs it).
    eps : float, default 1e-5
    dtype, xp, device : where the parameters live (:class:`~refnorm.layer.Layer`)
    seed : int, default 0
        Seeds the He-normal draw of ``v`` (:func:`refnorm.nn.init.he_normal`).

    Learned parameters
    ------------------
    v : (C_out, C_in, KH, KW) or (D_out, D_in), He-normal
    g : (C_out,), ones
    b : (C_out,), zeros; present only with ``bias=True``

    ``o = W(v, g) * x + b``.
    """

    check_cases: ClassVar[tuple[CheckCase, ...]] = (
        CheckCase((2, 3, 5, 5), {"out_channels": 4, "kernel_size": 3, "padding": 1}),
        CheckCase((3, 5), {"out_channels": 4}),
        CheckCase((2, 2, 4, 4), {"out_channels": 3, "kernel_size": 2, "stride": 2,
                                 "bias": False}),
    )

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any = None, *,
                 stride: Any = 1, padding: Any = 0, bias: bool = True, eps: float = 1e-5,
                 dtype: Any = None, xp: ModuleType | None = None, device: Any = None,
                 seed: int = 0) -> None:
        super().__init__(dtype=dtype, xp=xp, device=device)
        self.geometry = weight_geometry(in_channels, out_channels, kernel_size,
                                        stride=stride, padding=padding)
        has_bias = check_bool("bias", bias)
        check_eps(eps, xp=self.xp, dtype=compute_dtype(self.xp, self.dtype))
        self.eps = eps
        C, where = self.geometry.out_channels, on_device(self.device)
        self.params = {
            "v": he_normal(self.geometry.weight_shape, fan_in=self.geometry.fan_in, seed=seed,
                           xp=self.xp, dtype=self.dtype, device=self.device),
            "g": self.xp.ones((C,), dtype=self.dtype, **where),
        }
        if has_bias:
            self.params["b"] = self.xp.zeros((C,), dtype=self.dtype, **where)

    def _forward(self, x: Array, training: bool) -> tuple[Array, Any]:
        w, w_cache = weight_norm_forward(self.params["v"], self.params["g"], eps=self.eps)
        y, op_cache = apply_weights(x, w, self.params.get("b"), self.geometry,  # GG Eq. (3)
                                    path=self.compute_path())
        return y, (w_cache, op_cache)

    def _backward(self, dy: Array, cache: Any) -> tuple[Array, dict[str, Array]]:
        w_cache, op_cache = cache
        dx, dw, db = apply_weights_backward(dy, op_cache, self.geometry, path=self.compute_path(),
                                            input_grad=self.input_grad)
        dv, dg = weight_norm_backward(dw, w_cache)
        grads = {"v": dv, "g": dg} if db is None else {"v": dv, "g": dg, "b": db}
        return dx, grads

    def preactivation(self, x: Array) -> Array:
        """``W(v, g) * x + b`` without keeping a cache (for NP: what enters its ReLU).

        Parameters
        ----------
        x : array, (N, C_in, H, W) or (N, D_in)

        Returns
        -------
        t : array, (N, C_out, H_out, W_out) or (N, D_out)
        """
        w, _ = weight_norm_forward(self.params["v"], self.params["g"], eps=self.eps)
        return apply_weights(x, w, self.params.get("b"), self.geometry, path=self.compute_path())[0]

    def init_from_batch(self, x: Array) -> None:
        """Salimans & Kingma's data-dependent initialization from one batch ``x``.

        With g = 1 and b = 0 the pre-activation is t = (V / (||V|| + eps)) * x; per output
        channel, over the batch and spatial axes, set g = 1 / std(t) and b = -mean(t) / std(t),
        so that this batch's pre-activations have zero mean and unit variance. (For NP the
        pre-activation is what goes into its ReLU, which is what NP's constants assume.)
        Everything is checked before anything changes: a call that raises leaves the layer
        as it was. A successful call drops the saved cache (:meth:`~refnorm.layer.Layer.reset`).

        Parameters
        ----------
        x : array, (N, C_in, H, W) or (N, D_in)

        Raises
        ------
        ValueError
            If the layer has no bias, or a channel's pre-activation is constant over the
            batch (max = min) or not finite (NaN in the batch or the weights), or g or b
            would overflow the parameters' dtype.
        """
        if "b" not in self.params:
            raise ValueError("init_from_batch sets the bias: build the layer with bias=True")
        xp, C = self.xp, self.geometry.out_channels
        unit_gain = xp.ones_like(self.params["g"])                  # (C,)
        direction, _ = weight_norm_forward(self.params["v"], unit_gain, eps=self.eps)
        t = apply_weights(x, direction, None, self.geometry,
                          path=self.compute_path())[0]  # (N, C, H, W) or (N, C)
        t = xp.astype(t, compute_dtype(xp, t.dtype), copy=False)
        axes = non_channel_axes(t.ndim)
        mean, var = moments(t, axes)                                # (1, C, 1, 1) each
        mean, std = xp.reshape(mean, (C,)), xp.sqrt(xp.reshape(var, (C,)))  # (C,)
        if not bool(xp.all(xp.isfinite(mean) & xp.isfinite(std))):
            raise ValueError("init_from_batch: a channel's pre-activation has a NaN or infinite "
                             "mean or std over the batch (a non-finite input or weight); use a "
                             "finite batch")
        # Constant where max == min, whatever std rounding leaves (moments gives a constant
        # group the mean it holds, hence std 0, in float32 and float64).
        if bool(xp.any((xp.max(t, axis=axes) == xp.min(t, axis=axes)) | (std == 0))):
            raise ValueError("init_from_batch: a channel's pre-activation is constant over the "
                             "batch (std 0); use a batch with varied inputs")
        g, b = self.params["g"], self.params["b"]
        new_g, new_b = 1.0 / std, -mean / std                       # (C,) each
        if bool(xp.any(new_g > xp.finfo(g.dtype).max)
                or xp.any(xp.abs(new_b) > xp.finfo(b.dtype).max)):
            raise ValueError(f"init_from_batch: a channel's pre-activation varies too little "
                             f"over the batch for {g.dtype}: g = 1/std or b = -mean/std "
                             f"overflows it (smallest std {float(xp.min(std)):.3g}); use a "
                             f"batch of larger inputs")
        self.params["g"], self.params["b"] = xp.astype(new_g, g.dtype), xp.astype(new_b, b.dtype)
        self.reset()  # nothing to backward through: the parameters changed
