"""Weight Normalization (Salimans & Kingma, 2016), as written by Gitman & Ginsburg (2017), §3.2.

Each output channel j of a convolution or linear layer uses the weight

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

Salimans & Kingma's data-dependent initialization sets g and b from one batch so that the
pre-activations start with zero mean and unit variance per channel
(:meth:`WeightNorm.init_from_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from refnorm.backend import Array, array_namespace
from refnorm.core.checks import check_channel_param, check_eps, check_float_array, check_like
from refnorm.layer import CheckCase
from refnorm.weights.base import WeightLayer, per_output_view


@dataclass(frozen=True)
class WeightNormCache:
    """What :func:`weight_norm_forward` saves.

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
    """

    v: Array
    v_unit: Array
    norm: Array
    g: Array
    eps: float
    shape: tuple[int, ...]


def weight_norm_forward(v: Array, g: Array, *, eps: float = 1e-5) -> tuple[Array, WeightNormCache]:
    """W_j = g_j V_j / (||V_j||_F + eps) for every output channel j.

    Parameters
    ----------
    v : array, (C_out, ...)
        Raw weights (C_out, C_in, KH, KW) or (D_out, D_in).
    g : array, (C_out,)
        Lengths.
    eps : float, > 0

    Returns
    -------
    w : array, ``v.shape``
    cache : WeightNormCache
    """
    xp = _check(v, g, eps)
    vv = per_output_view(xp, v)                                   # (C_out, I)
    norm = xp.sqrt(xp.sum(vv * vv, axis=1, keepdims=True))         # (C_out, 1)
    safe = xp.where(norm > 0, norm, xp.ones_like(norm))
    v_unit = xp.where(norm > 0, vv / safe, xp.zeros_like(vv))      # (C_out, I)
    w = xp.reshape(vv * (xp.reshape(g, (-1, 1)) / (norm + eps)), v.shape)
    return w, WeightNormCache(vv, v_unit, norm, g, eps, tuple(v.shape))


def weight_norm_backward(dw: Array, cache: WeightNormCache) -> tuple[Array, Array]:
    """Gradients of :func:`weight_norm_forward`: (dv of ``v.shape``, dg of shape (C_out,))."""
    check_like("dw", dw, cache.shape)
    xp = array_namespace(dw, cache.v)
    G = per_output_view(xp, dw)                                    # (C_out, I)
    n, eps = cache.norm, cache.eps                                 # (C_out, 1)
    dg = xp.sum(G * cache.v, axis=1) / xp.reshape(n + eps, (-1,))  # (C_out,)
    along = xp.sum(G * cache.v_unit, axis=1, keepdims=True)        # (C_out, 1)
    scale = xp.reshape(cache.g, (-1, 1)) / (n + eps)               # (C_out, 1)
    dv = scale * (G - along * cache.v_unit * (n / (n + eps)))      # (C_out, I)
    return xp.reshape(dv, cache.shape), dg


def _check(v: Array, g: Array, eps: float) -> ModuleType:
    xp = check_float_array("v", v)
    if v.ndim < 2:
        raise ValueError(f"v must have shape (C_out, ...) with at least 2 dimensions; "
                         f"got shape {tuple(v.shape)}")
    check_channel_param("g", g, v.shape[0])
    check_eps(eps)
    return xp


class WeightNorm(WeightLayer):
    """A weight-normalized convolution (or linear layer with ``kernel_size=None``).

    Params: ``v`` (C_out, C_in, KH, KW) He-normal, ``g`` (C_out,) ones, ``b`` (C_out,) zeros
    (with ``bias=True``). ``o = W(v, g) * x + b``. See :class:`~refnorm.weights.base.WeightLayer`
    for the other arguments.
    """

    check_cases = (
        CheckCase((2, 3, 5, 5), {"out_channels": 4, "kernel_size": 3, "padding": 1}),
        CheckCase((3, 5), {"out_channels": 4}),
        CheckCase((2, 2, 4, 4), {"out_channels": 3, "kernel_size": 2, "stride": 2,
                                 "bias": False}),
    )

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any = None, *,
                 bias: bool = True, eps: float = 1e-5, **kw: Any) -> None:
        super().__init__(in_channels, out_channels, kernel_size, **kw)
        check_eps(eps)
        self.eps = eps
        self.params["g"] = self.xp.ones((out_channels,), dtype=self.dtype)
        if bias:
            self.params["b"] = self.xp.zeros((out_channels,), dtype=self.dtype)

    def weight(self) -> tuple[Array, WeightNormCache]:
        return weight_norm_forward(self.params["v"], self.params["g"], eps=self.eps)

    def weight_grads(self, dw: Array, cache: WeightNormCache) -> dict[str, Array]:
        dv, dg = weight_norm_backward(dw, cache)
        return {"v": dv, "g": dg}

    def bias(self) -> Array | None:
        return self.params.get("b")

    def init_from_batch(self, x: Array) -> None:
        """Salimans & Kingma's data-dependent initialization from one batch ``x``.

        With g = 1 and b = 0 the pre-activation is t = (V / (||V|| + eps)) * x; per output
        channel, over the batch and spatial axes, set g = 1 / std(t) and b = -mean(t) / std(t),
        so that this batch's pre-activations have zero mean and unit variance. (For NP the
        pre-activation is what goes into its ReLU, which is what NP's constants assume.)

        Raises
        ------
        ValueError
            If a channel's pre-activation is constant over the batch (std 0).
        """
        xp = self.xp
        C = self.params["g"].shape[0]
        self.params["g"] = xp.ones((C,), dtype=self.dtype)
        if "b" not in self.params:
            raise ValueError("init_from_batch sets the bias: build the layer with bias=True")
        self.params["b"] = xp.zeros((C,), dtype=self.dtype)
        t = self.preactivation(x)                                   # (N, C, H, W) or (N, C)
        axes = (0,) + tuple(range(2, t.ndim))
        mean = xp.mean(t, axis=axes)                                # (C,)
        std = xp.sqrt(xp.mean((t - xp.reshape(mean, (1, C) + (1,) * (t.ndim - 2))) ** 2,
                              axis=axes))                           # (C,)
        if bool(xp.any(std == 0)):
            raise ValueError("init_from_batch: a channel's pre-activation is constant over the "
                             "batch (std 0); use a batch with varied inputs")
        self.params["g"] = xp.astype(1.0 / std, self.dtype)
        self.params["b"] = xp.astype(-mean / std, self.dtype)
        self._cache = None  # nothing to backward through: the parameters changed
