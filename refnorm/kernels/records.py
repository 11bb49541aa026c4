"""The named records the kernels return, one per kind of result.

Each holds the fields of the reference cache it stands for, under the cache's names, so that
the dispatching function builds the cache by keyword (``BatchNormCache(x_hat=k.x_hat, ...)``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

Array = Any


class Normalized(NamedTuple):
    """A BN, IN, LN or GN forward: ``y`` in the dtype of ``x``, the rest in the compute dtype.

    ``mean``, ``var`` and ``rstd`` have the reference cache's shapes: (1, C, 1, ...) for BN,
    (N, C, 1, ...) for IN, (N, 1, 1, ...) for LN, (N, G, 1, 1, ...) for GN (the grouped view).
    """

    y: Array
    x_hat: Array
    mean: Array
    var: Array
    rstd: Array


class AffineGrads(NamedTuple):
    """A normalizer's backward: ``dx`` (compute dtype), ``dgamma`` and ``dbeta`` (C,)."""

    dx: Array
    dgamma: Array
    dbeta: Array


class SwitchableNormalized(NamedTuple):
    """An SN forward on the (N, C, S) view.

    ``h`` is the input in the compute dtype, ``x_hat`` the normalized input, ``rstd`` the
    mixed variance's ``1 / sqrt(var + eps)`` (broadcastable to (N, C, 1)); ``mu`` and ``var``
    map every scope ("in", "ln", "bn") to its statistics, (N, C, 1), (N, 1, 1), (1, C, 1),
    and ``offset`` to its mean minus ``mu["in"]``, unrounded, (N, C, 1) each
    (:class:`refnorm.norms.switchable_norm.ScopeStatistics`).
    """

    y: Array
    h: Array
    x_hat: Array
    rstd: Array
    mu: dict[str, Array]
    offset: dict[str, Array]
    var: dict[str, Array]


class SwitchableGrads(NamedTuple):
    """An SN backward: ``dx`` (N, C, S), ``dgamma``, ``dbeta`` (C,), the logit gradients (K,)."""

    dx: Array
    dgamma: Array
    dbeta: Array
    dmean_logits: Array
    dvar_logits: Array


class ConvForward(NamedTuple):
    """A convolution's forward: ``y`` and the cache's ``cols`` and ``w_mat``."""

    y: Array
    cols: Array
    w_mat: Array


class ConvGrads(NamedTuple):
    """A convolution's backward: ``dx`` (None when not asked for), ``dw`` (C_out, C_in, KH, KW)
    and ``db`` (C_out,) (None without a bias)."""

    dx: Array | None
    dw: Array
    db: Array | None


class MaxPooled(NamedTuple):
    """A max pooling forward: ``y`` and the cache's ``argmax`` (C, N * H_out * W_out)."""

    y: Array
    argmax: Array


class WeightStandardized(NamedTuple):
    """A Weight Standardization forward: ``w_hat`` (C_out, I), ``denom`` and ``kappa``
    (C_out, 1), in the compute dtype (the cache's fields)."""

    w_hat: Array
    denom: Array
    kappa: Array
