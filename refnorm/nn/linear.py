"""A fully connected (linear) layer: ``y = x w^T + b``.

For x (N, D_in), w (D_out, D_in) and b (D_out,) (PyTorch's weight layout, one row of ``w``
per output unit):

    y  = x w^T + b          (N, D_out)
    dx = dy w               (N, D_in)
    dw = dy^T x             (D_out, D_in)
    db = sum_n dy[n]        (D_out,)
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

from refnorm.backend import Array, array_namespace, compute_dtype, on_device
from refnorm.core.checks import (
    check_bias,
    check_bool,
    check_cache,
    check_like,
    check_positive_int,
    check_rank,
)
from refnorm.layer import CheckCase, Layer
from refnorm.nn.init import he_normal


@dataclass(frozen=True)
class LinearCache:
    """What :func:`linear_forward` saves for :func:`linear_backward`.

    Attributes
    ----------
    x : array, (N, D_in)
        A copy of the input in the compute dtype (``dw = dy^T x``).
    w : array, (D_out, D_in)
        A copy of the weights in the compute dtype (``dx = dy w``).
    has_bias : bool
        Whether the forward added a bias (the backward then returns ``db``, else ``None``).
    x_dtype, w_dtype, b_dtype : dtypes
        The dtypes ``dx``, ``dw`` and ``db`` are returned in (``b_dtype`` None without bias).
    """

    x: Array
    w: Array
    has_bias: bool
    x_dtype: Any
    w_dtype: Any
    b_dtype: Any


def linear_forward(
    x: Array, w: Array, b: Array | None = None
) -> tuple[Array, LinearCache]:
    """``y = x w^T + b``.

    No ``path``: the work is one matrix product (two in the backward), which numpy already
    hands to BLAS; a kernel would call the same BLAS.

    Parameters
    ----------
    x : array, (N, D_in)
        Real floating; float16 computes in float32 and returns float16.
    w : array, (D_out, D_in)
        Real floating, cast to the compute dtype of ``x``.
    b : array, (D_out,), optional
        ``None`` for no bias.

    Returns
    -------
    y : array, (N, D_out), dtype of ``x``
    cache : LinearCache

    Raises
    ------
    ValueError
        If ``x`` or ``w`` is not 2-D, ``w.shape[1] != x.shape[1]`` or ``b`` is not (D_out,).
    TypeError
        For non-floating arrays or arrays from different namespaces.
    """
    xp = check_rank("x", x, layout="(N, D_in)")
    check_rank("w", w, layout="(D_out, D_in)")
    D_out, D_in = w.shape
    if x.shape[1] != D_in:
        raise ValueError(
            f"x must have D_in = w.shape[1] = {D_in} features on axis 1 to match w of shape "
            f"{tuple(w.shape)}; got x of shape {tuple(x.shape)}"
        )
    check_bias(b, D_out, axis_name="D_out")
    array_namespace(x, w, b)  # one namespace for all three
    dtype = compute_dtype(xp, x.dtype)
    # Copies, not views: the cache must not change if the caller changes x or w in place.
    xc = xp.astype(x, dtype, copy=True)
    wc = xp.astype(w, dtype, copy=True)
    y = xp.matmul(xc, wc.T)                                       # (N, D_out)
    if b is not None:
        y = y + xp.astype(b, dtype, copy=False)                   # (N, D_out)
    cache = LinearCache(
        x=xc, w=wc, has_bias=b is not None, x_dtype=x.dtype, w_dtype=w.dtype,
        b_dtype=None if b is None else b.dtype,
    )
    return xp.astype(y, x.dtype, copy=False), cache


def linear_backward(dy: Array, cache: LinearCache) -> tuple[Array, Array, Array | None]:
    """Backward of :func:`linear_forward`.

    No ``path``: two matrix products and a sum, which numpy already hands to BLAS (see
    :func:`linear_forward`).

    Parameters
    ----------
    dy : array, (N, D_out)
        Upstream gradient.
    cache : LinearCache

    Returns
    -------
    dx : array, (N, D_in), dtype of ``x``
    dw : array, (D_out, D_in), dtype of ``w``
    db : array, (D_out,), dtype of ``b``; ``None`` if the forward had no bias
    """
    check_cache(cache, LinearCache)
    check_like("dy", dy, (cache.x.shape[0], cache.w.shape[0]))
    xp = array_namespace(dy, cache.x)
    dy_c = xp.astype(dy, cache.x.dtype, copy=False)
    dx = xp.matmul(dy_c, cache.w)                                 # (N, D_in)
    dw = xp.matmul(dy_c.T, cache.x)                               # (D_out, D_in)
    db = None
    if cache.has_bias:
        db = xp.astype(xp.sum(dy_c, axis=0), cache.b_dtype, copy=False)  # (D_out,)
    return (
        xp.astype(dx, cache.x_dtype, copy=False),
        xp.astype(dw, cache.w_dtype, copy=False),
        db,
    )


class Linear(Layer):
    """A fully connected layer with He-normal weights and a zero bias.

    Parameters
    ----------
    in_features : int
        D_in, the size of the input's axis 1 (first, as for every registered layer).
    out_features : int
        D_out.
    bias : bool, default True
        Whether the layer has the parameter ``b``.
    dtype, xp, device : where the parameters live (:class:`~refnorm.layer.Layer`)
    seed : int, default 0
        Seeds ``numpy.random.default_rng`` for the weights.

    Learned parameters
    ------------------
    w : (D_out, D_in), ``normal(0, sqrt(2 / D_in))`` (He et al., 2015)
    b : (D_out,), zeros; present only with ``bias=True``
    """

    check_cases = (
        CheckCase((4, 5), {"out_features": 3}),
        CheckCase((1, 7), {"out_features": 2}),
        CheckCase((6, 1), {"out_features": 4}),
    )

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        dtype: Any = None,
        xp: ModuleType | None = None,
        device: Any = None,
        seed: int = 0,
    ) -> None:
        super().__init__(dtype=dtype, xp=xp, device=device)
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        bias = check_bool("bias", bias)
        self.params = {"w": he_normal((out_features, in_features), fan_in=in_features,
                                      seed=seed, xp=self.xp,
                                      device=self.device, dtype=self.dtype)}
        if bias:
            self.params["b"] = self.xp.zeros((out_features,), dtype=self.dtype,
                                             **on_device(self.device))

    def _forward(self, x: Array, training: bool) -> tuple[Array, LinearCache]:
        return linear_forward(x, self.params["w"], self.params.get("b"))

    def _backward(self, dy: Array, cache: LinearCache) -> tuple[Array, dict[str, Array]]:
        dx, dw, db = linear_backward(dy, cache)
        grads = {"w": dw} if db is None else {"w": dw, "b": db}
        return dx, grads
