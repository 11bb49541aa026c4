"""How accurate SN is at a large mean, and the bound it is held to.

Data: ``x = mean + 1e-3 randn`` rounded to the dtype, at mean 1e4; in float32 the spread is
about one ulp of the mean (2^-10 ~ 9.8e-4), where a mean rounded to float32 is off by as much
as the spread itself.

Truth: the float64 reference on the same values minus the mean. Subtracting 1e4 is exact
(the values share the mean's exponent), and every output and gradient of SN is invariant to a
constant added to ``x`` (the ratios sum to 1), so the truth is computed where no mean can
cost anything.

Error of an output: ``max|got - truth| / scale``, the scale being the size of the terms the
output is made of (as tests/kernels/helpers.rel_err measures): ``max|y|`` for y;
``max|gamma| max(rstd) max|dy|`` for dx; per channel ``sum|dy x_hat|`` and ``sum|dy|`` for
dgamma and dbeta; for the control parameters, ``w_k sum_nc |dL/dmu (mu_k - mu_mix)|`` (the
mean ratios' gradient is ``w_k sum_nc dL/dmu (mu_k - mu_mix)``) and
``w'_k sum_nc |dL/dsigma^2 sigma_k^2|``. A relative error of the output itself would say
nothing where those terms cancel.

The bound, for each output ``q`` and a unit roundoff ``u`` of the dtype (2^-24, 2^-53)::

    error(q) <= max(e_K(q), e_0(q)) + 3 u + u64 |mean| max(rstd)

- ``e_K(q)``: the largest error of the BN, IN, LN and GN kernels on the same data, measured
  by :func:`kernels_error`. They widen to float64 and round data, cache and outputs once, and
  lose nothing to the mean: this is "the BN kernels' error". The control parameters have no
  BN counterpart; theirs is dgamma's, likewise a sum over the data of a gradient times a
  statistic.
- ``e_0(q)``: the error of the same SN path on the same deviations at mean 0, where no mean
  can cost anything. For the fast path
  it is at the kernels' level; for the reference, which computes in float32, it is what
  float32 arithmetic costs that code anyway.
- ``3 u``: SN carries the mean through three kinds of values that BN has not, each rounded to
  the dtype once: the ratios (a softmax in the dtype), the scopes' mean offsets and their
  variances. Each enters the output through a mixture or a sum over the scopes, whose
  weights sum to 1, so each adds at most one rounding relative to the terms of the output.
- ``u64 |mean| max(rstd)``: the kernels and SN's fast path normalize with one float64 mean per
  plane, rounded once, ``u64 |mean|`` off on the scale of ``x``; SN's mixed mean is another
  number than BN's mean and may round the other way: one such rounding on the normalized
  scale. Negligible in float32 (1e-9); in float64 at this mean it is the kernels' error too.

Computed without the scopes' mean offsets, the float32 errors at this mean were 1e5 to 1e7
times this bound (y 0.05, the mean ratios' gradient O(1)).
"""

from __future__ import annotations

import numpy as np

from refnorm.norms import switchable_norm as sn
from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward
from refnorm.norms.group_norm import group_norm_backward, group_norm_forward
from refnorm.norms.instance_norm import instance_norm_backward, instance_norm_forward
from refnorm.norms.layer_norm import layer_norm_backward, layer_norm_forward

MEAN, SPREAD = 1e4, 1e-3
UNIT_ROUNDOFF = {np.float32: 2.0 ** -24, np.float64: 2.0 ** -53}
OUTPUTS = ("y", "dx", "dgamma", "dbeta", "dmean_logits", "dvar_logits")
KERNELS = {
    "bn": (lambda x, g, b, **kw: batch_norm_forward(x, g, b, **kw), batch_norm_backward),
    "in": (lambda x, g, b, **kw: instance_norm_forward(x, g, b, **kw), instance_norm_backward),
    "ln": (lambda x, g, b, **kw: layer_norm_forward(x, g, b, **kw), layer_norm_backward),
    "gn": (lambda x, g, b, **kw: group_norm_forward(x, g, b, num_groups=1, **kw),
           group_norm_backward),
}


def case(shape, dtype, seed):
    """``(x, deviations, params, dy)``: x at :data:`MEAN`, ``deviations = x - MEAN`` exactly,
    ``params = (gamma, beta, mean_logits, var_logits)``, all in ``dtype``."""
    rng = np.random.default_rng(seed)
    x = (MEAN + SPREAD * rng.standard_normal(shape)).astype(dtype)
    deviations = (x.astype(np.float64) - MEAN).astype(dtype)
    assert np.array_equal(deviations.astype(np.float64), x.astype(np.float64) - MEAN)
    C = shape[1]
    params = tuple(p.astype(dtype) for p in (1 + 0.5 * rng.standard_normal(C),
                                             rng.standard_normal(C), rng.standard_normal(3),
                                             rng.standard_normal(3)))
    return x, deviations, params, rng.standard_normal(shape).astype(dtype)


def _error(got, want, scale: float) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / scale)


def _affine_scales(dy, x_hat, gamma, rstd, y, axes) -> dict[str, float]:
    return {"y": float(np.max(np.abs(y))),
            "dx": float(np.max(np.abs(gamma)) * np.max(rstd) * np.max(np.abs(dy))),
            "dgamma": float(np.max(np.sum(np.abs(dy * x_hat), axis=axes))),
            "dbeta": float(np.max(np.sum(np.abs(dy), axis=axes)))}


def sn_truth(deviations, params, dy, options):
    """The float64 reference on the deviations: ``(outputs, scales)``, dicts by output name;
    ``scales["rstd"]`` is the largest ``rstd``."""
    p64 = [np.asarray(p, np.float64) for p in params]
    y, cache = sn.switchable_norm_forward(np.asarray(deviations, np.float64), *p64,
                                          options=options)
    grads = sn.switchable_norm_backward(np.asarray(dy, np.float64), cache)
    dy_v = np.asarray(dy, np.float64).reshape(cache.h.shape)
    scales = _affine_scales(dy_v, cache.x_hat, p64[0].reshape(1, -1, 1), cache.rstd, y, (0, 2))
    scales["rstd"] = float(np.max(cache.rstd))
    _, dvar, dmu = sn.statistic_gradients(dy_v, cache)
    scopes, w, w_var = options.scopes, cache.w_mean, cache.w_var
    mu_mix = sum(w[i] * cache.mu[k] for i, k in enumerate(scopes))      # no large mean here
    scales["dmean_logits"] = max(float(w[i] * np.sum(np.abs(dmu * (cache.mu[k] - mu_mix))))
                                 for i, k in enumerate(scopes))
    scales["dvar_logits"] = max(float(w_var[i] * np.sum(np.abs(dvar * cache.var[k])))
                                for i, k in enumerate(scopes))
    return dict(zip(OUTPUTS, (y, *grads), strict=True)), scales


def errors(got: dict, deviations, params, dy, options) -> dict[str, float]:
    """The error of each output in ``got`` (a dict by output name, on ``x`` or on the
    deviations themselves); ``"rstd"``: the largest ``rstd``, which :func:`bound` needs."""
    truth, scales = sn_truth(deviations, params, dy, options)
    return {**{q: _error(got[q], truth[q], scales[q]) for q in OUTPUTS},
            "rstd": scales["rstd"]}


def sn_error(x, deviations, params, dy, options, *, path) -> dict[str, float]:
    """SN's error on ``x`` by ``path`` (both pure functions), per output (:func:`errors`)."""
    y, cache = sn.switchable_norm_forward(x, *params, options=options, path=path)
    got = dict(zip(OUTPUTS, (y, *sn.switchable_norm_backward(dy, cache, path=path)),
                   strict=True))
    return errors(got, deviations, params, dy, options)


def kernels_error(x, deviations, params, dy) -> dict[str, float]:
    """The largest error of the BN, IN, LN and GN kernels on ``x``, per output; the control
    parameters take dgamma's (see the module docstring)."""
    gamma, beta = params[:2]
    g64, b64, dy64 = (np.asarray(a, np.float64) for a in (gamma, beta, dy))
    axes = (0, *range(2, x.ndim))
    worst = dict.fromkeys(OUTPUTS[:4], 0.0)
    for forward, backward in KERNELS.values():
        y_true, cache = forward(np.asarray(deviations, np.float64), g64, b64)
        scales = _affine_scales(dy64, cache.x_hat, g64.reshape((1, -1) + (1,) * (x.ndim - 2)),
                                cache.rstd, y_true, axes)
        truth = dict(zip(OUTPUTS[:4], (y_true, *backward(dy64, cache)), strict=True))
        y, fast_cache = forward(x, gamma, beta, path="fast")
        got = dict(zip(OUTPUTS[:4], (y, *backward(dy, fast_cache, path="fast")), strict=True))
        for q in worst:
            worst[q] = max(worst[q], _error(got[q], truth[q], scales[q]))
    return {**worst, "dmean_logits": worst["dgamma"], "dvar_logits": worst["dgamma"]}


def bound(kernels: dict[str, float], at_zero: dict[str, float], dtype) -> dict[str, float]:
    """``max(e_K, e_0) + 3 u + u64 |mean| max(rstd)`` per output (derived in the module
    docstring); ``at_zero`` is :func:`sn_error`'s result at mean 0."""
    u = UNIT_ROUNDOFF[dtype]
    mean_rounding = UNIT_ROUNDOFF[np.float64] * MEAN * at_zero["rstd"]
    return {q: max(kernels[q], at_zero[q]) + 3 * u + mean_rounding for q in OUTPUTS}


def failures(errors: dict[str, float], limits: dict[str, float]) -> list[str]:
    """The outputs whose error exceeds its limit, each with both numbers."""
    return [f"{q}: {errors[q]:.3g} > {limits[q]:.3g}" for q in OUTPUTS if errors[q] > limits[q]]
