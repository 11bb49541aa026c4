"""What the kernel tests share: drawn inputs, the error measure and its tolerances.

Error measure: normwise relative, ``max|got - want| / max|want|``. Elementwise relative
error is meaningless where an output crosses zero (x_hat, dx); normwise error is what a
backward-stable computation guarantees, and it is what a wrong formula breaks by O(1).

Tolerances (``want`` is always the reference in float64 on the same input values):

- float64: ``1e-12 * kappa``. Standardization has condition number
  ``kappa = 1 + max|mean| / min sqrt(var + eps)`` with respect to relative perturbations of
  ``x``: both the reference and the kernel round ``x - mean`` with errors of order
  ``eps64 * |mean|``, so no correct implementation can agree better than ``eps64 * kappa``.
  1e-12 is 4500 ulp, room for the different summation orders over up to ~1e4 terms;
  for unit-offset data kappa is a few and the tolerance is about 1e-12.
- float32: ``2e-6``, 16 float32 ulp, without kappa: the kernels widen float32 to float64
  before any arithmetic and round once when storing, so their error is the final rounding of
  each output (and of the float32 cache fields a backward is given), amplified by the few
  terms of ``dx``. The float32 BN, IN, LN and GN *references* miss this bound by orders of
  magnitude on 1e4-offset data (a float32 mean has an error of about 1e-3); SN's reference
  holds its means relative to a shift and stays near it (tests/norms/large_mean.py).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from refnorm.kernels import norms as kernel_norms

RTOL64 = 1e-12
RTOL32 = 2e-6


def rel_err(got, want, scale: float = 0.0) -> float:
    """``max|got - want| / max(max|want|, scale)`` (absolute error if both are zero).

    ``scale`` is the size of the terms an output is a sum of, where that sum can cancel: a
    backward-stable ``dx`` is accurate relative to ``|gamma * rstd * dy|``, not to ``|dx|``,
    which is ~0 when, e.g., a statistic has two values (``dy`` then lies in the span of 1 and
    ``x_hat`` and every term cancels).
    """
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(float(np.max(np.abs(want))) if want.size else 0.0, scale)
    err = np.max(np.abs(got - want)) if want.size else 0.0
    return float(err / scale) if scale > 0 else float(err)


def tolerance(dtype, kappa: float = 1.0) -> float:
    """The tolerance for ``dtype`` (see the module docstring)."""
    return RTOL64 * kappa if dtype == np.float64 else RTOL32


def kappa_of(mean, var, eps: float) -> float:
    """``1 + max|mean| / min sqrt(var + eps)``: the conditioning of standardization."""
    return 1.0 + float(np.max(np.abs(mean)) / np.min(np.sqrt(np.asarray(var) + eps)))


def assert_close(name: str, got, want, dtype, kappa: float = 1.0, scale: float = 0.0) -> None:
    """Assert ``rel_err(got, want, scale) <= tolerance(dtype, kappa)``."""
    err, tol = rel_err(got, want, scale), tolerance(dtype, kappa)
    assert err <= tol, f"{name}: normwise relative error {err:.3g} > {tol:.3g} ({dtype.__name__})"


@contextlib.contextmanager
def chunking(layout):
    """Force a work layout of the normalizer kernels, ``layout = (unit_path, limits, stream)``.

    ``unit_path`` "always" runs one task per statistic, "never" planes cut into chunks and
    merged; ``limits = (min_chunk, max_chunk)`` makes those chunks small so that small drawn
    arrays exercise several chunks per plane (``None`` keeps the defaults); ``stream`` writes
    every output with the non-temporal stores of refnorm.kernels._simd, whatever its size
    (their unaligned head, vector middle and tail all run on small arrays).
    """
    unit_path, limits, stream = layout
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(kernel_norms, "UNIT_PATH", unit_path))
        stack.enter_context(mock.patch.object(kernel_norms, "STREAM_FROM",
                                              0 if stream else kernel_norms.STREAM_FROM))
        if limits is not None:
            stack.enter_context(mock.patch.object(kernel_norms, "MIN_CHUNK", limits[0]))
            stack.enter_context(mock.patch.object(kernel_norms, "MAX_CHUNK", limits[1]))
        yield


CHUNKING = st.tuples(
    st.sampled_from([("always", None), ("never", None), ("never", (1, 2)), ("never", (1, 3)),
                     ("never", (2, 5))]),
    st.booleans(),
).map(lambda drawn: (*drawn[0], drawn[1]))


def _spread(shape) -> np.ndarray:
    """A fixed standard-normal pattern added to every drawn input so that no statistic is
    degenerate (all-equal values make x_hat pure rounding noise and any relative measure
    meaningless); the drawn part varies and shrinks on top of it."""
    return np.random.default_rng(sum(shape) * 131 + len(shape)).standard_normal(shape)


@st.composite
def activations(draw, *, shape, offsets=(0.0, 1e4)):
    """An input of ``shape``: ``offset + spread + drawn`` in a drawn dtype and memory layout.

    Layouts: C-contiguous; every other channel of a twice-as-wide array (non-contiguous);
    the batch and last axes reversed (negative strides).

    Returns
    -------
    x : array, ``shape``, float32 or float64
    """
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    offset = draw(st.sampled_from(offsets))
    layout = draw(st.sampled_from(["contiguous", "strided", "reversed"]))
    wide = (shape[0], 2 * shape[1]) + tuple(shape[2:])
    drawn = draw(arrays(np.float64, wide,
                        elements=st.floats(-2, 2, allow_nan=False, allow_subnormal=False)))
    base = (offset + _spread(wide) + drawn).astype(dtype)
    if layout == "contiguous":
        return np.ascontiguousarray(base[:, :shape[1]])
    if layout == "strided":
        return base[:, ::2]
    return base[::-1, :shape[1]][..., ::-1]


def params(C: int, dtype, seed: int):
    """gamma (C,) around 1 with mixed signs and beta (C,)."""
    rng = np.random.default_rng(seed)
    gamma = (rng.standard_normal(C) + 1.0).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    return gamma, beta


def upstream(shape, dtype, seed: int) -> np.ndarray:
    """A random upstream gradient (never all ones), ``shape``."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def sn_reference(x, gamma, beta, logits, *, eps, scopes, in_correction, hard=False,
                 population=None, scope_correction=0):
    """The reference SN forward and compact backward for the kernel tests, in one place.

    The only code that knows the reference SN signature (being refactored): returns
    ``(y, cache, backward, logit_scale)`` with ``backward(dy) -> (dx, dgamma, dbeta, dml,
    dvl)`` and ``logit_scale(dy) -> (mean, var)``, the size of the terms of each logit
    gradient: ``w_k sum |dL/dmu (mu_k - mu_mix)|`` for the means (their gradient is
    ``w_k sum dL/dmu (mu_k - mu_mix)``, whatever the mean of the data) and
    ``w'_k sum |dL/dsigma^2 sigma_k^2|`` for the variances, the largest over k.
    ``population``: given BN-scope (mean, var), (C,) each: the inference forward.
    """
    from refnorm.norms import switchable_norm as sn

    options = sn.SwitchableOptions(scopes=tuple(scopes), in_correction=in_correction, hard=hard,
                                   scope_correction=scope_correction)
    if population is None:
        y, cache = sn.switchable_norm_forward(x, gamma, beta, *logits, eps=eps, options=options)
    else:
        y, cache = sn.switchable_norm_eval_forward(x, gamma, beta, *logits, *population, eps=eps,
                                                   options=options)

    def logit_scale(dy):
        _, dvar, dmu = sn.statistic_gradients(dy.reshape(cache.h.shape), cache)
        w, w_var, offset = cache.w_mean, cache.w_var, cache.offset
        mix = sum(w[i] * offset[k] for i, k in enumerate(scopes))
        return (max(float(w[i] * np.sum(np.abs(dmu * (offset[k] - mix))))
                    for i, k in enumerate(scopes)),
                max(float(w_var[i] * np.sum(np.abs(dvar * cache.var[k])))
                    for i, k in enumerate(scopes)))

    return y, cache, lambda dy: sn.switchable_norm_backward_compact(dy, cache), logit_scale
