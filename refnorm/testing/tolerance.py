"""The tolerances of :mod:`refnorm.testing` and refnorm's own outputs they bound.

refnorm's output is computed in float64 from the inputs as drawn (already rounded to the
dtype under test), so it is exact to about 1e-15 and the tolerance only has to cover the
rounding of the implementation under test, working in the compute dtype (float32 for
float16, as refnorm does; unit roundoff ``u``) and returning the dtype under test (unit
roundoff ``u_out``). Each bound is the classical worst case of the operations:

- a statistic over ``m`` values is a sum of ``m`` terms: relative error up to ``(m + 4) u``
  (naive summation ``(m - 1) u``, plus the subtraction, square, root and division);
- ``x - mean`` is off by up to ``K u max|x|`` in absolute terms, whatever the spread of
  the data; divided by the standard deviation this is ``K u max|x| rstd_max`` in
  ``x_hat`` (large offsets and tiny variances are ill-conditioned for *every*
  implementation, and the bound grows with them);
- ``|x_hat| <= sqrt(m)`` for any standardization, so products with ``x_hat`` are bounded;
- the returned value is rounded once more, ``u_out |y|``;
- below a dtype's smallest normal number ``tiny`` a rounding has no relative precision
  left: its result is off by up to half the subnormal spacing ``u tiny``, however small the
  value (a float16 ``gamma = 1e-7`` gives outputs that carry a few bits). Each output gets
  an absolute floor: one subnormal spacing of the returned dtype for its own rounding, plus
  one spacing of the compute dtype (and one of refnorm's float64, whose own result rounds
  there too) for every product or quotient that may underflow on the way, times the
  factor ``S`` by which the later operations multiply it: ``S_y = 3 + |gamma| + rstd +
  2 max|x|`` (``gamma (x - mu) rstd`` in any order), ``S_dx = (m + 4)(1 + rstd)
  (1 + |dy|)(2 + sqrt(m))`` (the backward's projection), and so on per output (see
  :func:`underflow_floors`). A whole spacing per rounding rather than half keeps the bound
  representable in float64 (half of float64's spacing, ``2**-1075``, is not).

These are bounds, not estimates: a correct implementation (pairwise or Welford sums) lands
orders of magnitude inside them, while a wrong convention (the variance estimator, where
eps goes, a one-pass variance at an offset) moves the output by a relative amount the
strategies make large (tiny variances, large offsets).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from refnorm.testing import reference
from refnorm.testing.strategies import Case

GRAD_NAMES = {m: ("dx",) + tuple("d" + p for p in reference.PARAM_NAMES[m])
              for m in reference.ACTIVATION_METHODS}
GRAD_NAMES.update(ws=("dw",), wn=("dv", "dg"))


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype an implementation is assumed to compute in: float32 for a narrower dtype
    (float16, as refnorm does), else ``dtype`` itself."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


def unit_roundoff(dtype: Any) -> tuple[float, float]:
    """(u of the compute dtype, u of the returned dtype); float16 computes in float32."""
    return (float(np.finfo(compute_dtype(dtype)).eps) / 2, float(np.finfo(dtype).eps) / 2)


def underflow_floors(dtype: Any, scales: dict[str, float]) -> dict[str, float]:
    """The absolute floor of each output's tolerance (module docstring, last item).

    Parameters
    ----------
    dtype : the dtype under test (returned by the implementation)
    scales : dict
        For each output, ``S``: the factor by which the operations after a product or a
        quotient multiply its error, summed over the products that may underflow.

    Returns
    -------
    dict
        ``spacing(dtype) + (spacing(compute dtype) + spacing(float64)) * S`` per output,
        where ``spacing`` is the dtype's subnormal spacing (``2 u tiny``, its smallest
        subnormal number): the returned value's own rounding, and the underflowing roundings
        of the implementation and of refnorm's float64 reference, each scaled by ``S``.
    """
    out = float(np.finfo(dtype).smallest_subnormal)
    inner = (float(np.finfo(compute_dtype(dtype)).smallest_subnormal)
             + float(np.finfo(np.float64).smallest_subnormal))
    return {k: out + inner * s for k, s in scales.items()}


def _amax(a: np.ndarray) -> float:
    return float(np.max(np.abs(a))) if a.size else 0.0


def tolerances(case: Case, outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """Absolute tolerance for each output of refnorm (``outputs``: ``"y"``, ``"dx"``...).

    The bounds are those of the module docstring, for the dtype of ``case.x``.
    """
    u, u_out = unit_roundoff(case.x.dtype)
    x = case.x.astype(np.float64)
    dy = case.dy.astype(np.float64)
    p = [a.astype(np.float64) for a in case.params]
    if case.method in ("ws", "wn"):
        return _weight_tolerances(case, x, p, dy, outputs, (u, u_out))
    m = x.size
    K = m + 4                                                    # summation bound, see above
    rstd_max = _rstd_max(case, x)
    gamma = _amax(p[0])
    err_xhat = K * u * (_amax(x) * rstd_max + math.sqrt(m))
    A = gamma * _amax(dy)
    per_channel = x.size / x.shape[1]
    tol = {
        "y": gamma * err_xhat,
        "dx": rstd_max * A * (K * u * (1 + math.sqrt(m)) ** 2
                              + 3 * err_xhat * (1 + math.sqrt(m))),
        "dgamma": per_channel * _amax(dy) * (err_xhat + K * u * math.sqrt(m)),
        "dbeta": per_channel * K * u * _amax(dy),
        # a logit gradient sums dy * (terms of x_hat and of x * rstd) over every element
        "dmean_logits": m * A * (err_xhat + K * u * math.sqrt(m)) * (1 + _amax(x) * rstd_max),
    }
    tol["dvar_logits"] = tol["dmean_logits"]
    sm, X, D = math.sqrt(m), _amax(x), _amax(dy)
    scale_dx = K * (1 + rstd_max) * (1 + D) * (2 + sm)
    floors = underflow_floors(case.x.dtype, {
        # gamma (x - mu) rstd in any order: (x - mu) rstd then times gamma, gamma (x - mu)
        # then times rstd, alpha = gamma rstd then times x - mu, or x alpha - mu alpha
        "y": 3 + gamma + rstd_max + 2 * X,
        # dx_hat = gamma * dy, its projection on (1, x_hat) and the products with rstd, in
        # any order (gamma * rstd / m first: its error times |dy| (2 + sqrt(m)) m)
        "dx": scale_dx,
        # per_channel products dy * x_hat, or dy * (x - mu) then times rstd
        "dgamma": per_channel * (2 + D + rstd_max),
        "dbeta": 1.0,                       # a sum of given values: no product underflows
        "dmean_logits": m * (1 + X * rstd_max) * scale_dx,
        "dvar_logits": m * (1 + X * rstd_max) * scale_dx,
    })
    return {k: tol[k] + 2 * u_out * _amax(v) + floors[k] for k, v in outputs.items()}


def _rstd_max(case: Case, x: np.ndarray) -> float:
    """1 / sqrt(smallest variance + eps) over the statistics (1 / sqrt(eps) for SN's mix)."""
    if case.method == "sn":
        return 1.0 / math.sqrt(case.eps)
    ids = reference.group_ids(case.method, x.shape, num_groups=case.num_groups).ravel()
    count = np.bincount(ids)
    mean = np.bincount(ids, x.ravel()) / count
    var = np.bincount(ids, (x.ravel() - mean[ids]) ** 2) / count
    return 1.0 / math.sqrt(float(np.min(var)) + case.eps)


def _weight_tolerances(case: Case, w: np.ndarray, p: list[np.ndarray], dy: np.ndarray,
                       outputs: dict[str, np.ndarray],
                       rounding: tuple[float, float]) -> dict[str, float]:
    """WS and WN: the same bounds per output channel, over I weights."""
    u, u_out = rounding
    ww = w.reshape(w.shape[0], -1)
    I = ww.shape[1]
    K = I + 4
    G = _amax(dy)
    if case.method == "ws":
        sigma = ww.std(axis=1)
        d_min = float(np.min(np.minimum(sigma + case.eps, np.sqrt(sigma**2 + case.eps))))
        err = K * u * (_amax(ww) / d_min + math.sqrt(I))
        tol = {"y": err,
               "dw": G / d_min * (K * u * (1 + math.sqrt(I)) ** 2
                                  + 3 * err * (1 + math.sqrt(I)))}
    else:
        n_min = float(np.min(np.sqrt(np.sum(ww**2, axis=1))))
        g = _amax(p[0])
        tol = {"y": K * u * g,
               "dv": 3 * K * u * g * 2 * math.sqrt(I) * G / (n_min + case.eps),
               "dg": 3 * K * u * I * G}
    sI, W = math.sqrt(I), _amax(ww)
    if case.method == "ws":                     # (w - mu) / d; dw as the activations' dx
        scales = {"y": 2.0, "dw": K * (1 + 1 / d_min) * (1 + G) * (2 + sI)}
    else:                   # v / n then times g, or g / n then times v; dv as WS's dw
        r = 1 / (n_min + case.eps)
        scales = {"y": 2 + g + W, "dv": K * (1 + g) * (1 + r) * (1 + G) * (2 + sI),
                  "dg": I * (2 + G + r)}
    floors = underflow_floors(case.x.dtype, scales)
    return {k: tol[k] + 2 * u_out * _amax(v) + floors[k] for k, v in outputs.items()}


def reference_outputs(case: Case, options: dict[str, Any],
                      with_grads: bool) -> dict[str, np.ndarray]:
    """refnorm's ``y`` (and gradients) on ``case``, computed in float64."""
    x = case.x.astype(np.float64)
    params = tuple(a.astype(np.float64) for a in case.params)
    y, cache = reference.forward(case.method, x, params, options)
    out = {"y": np.asarray(y)}
    if with_grads:
        grads = reference.backward(case.method, case.dy.astype(np.float64), cache)
        out.update(zip(GRAD_NAMES[case.method], grads, strict=True))
    return out


