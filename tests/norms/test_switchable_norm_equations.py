"""Switchable Normalization's equations one by one (Luo et al., journal version): the
functions that compute Eq. (3), (5), (6)-(8) and (12)-(14), each against an independent
formula or finite differences, as the docs' equations page cites them.

The whole backward is checked against finite differences in test_switchable_norm.py; these
checks name the step of Appendix A that would be wrong.
"""

from __future__ import annotations

import numpy as np
import pytest

from refnorm.gradcheck import check_vjp
from refnorm.norms.switchable_norm import (
    SwitchableOptions,
    mix,
    ratio_gradients,
    ratios,
    statistic_gradients,
    switchable_norm_forward,
)

FD_TOLERANCE = 1e-6  # the suite's gradcheck tolerance (finite-difference noise is ~1e-8)


def _problem(seed: int, shape=(4, 3, 3, 2)):
    rng = np.random.default_rng(seed)
    x = 5 * rng.standard_normal(shape) + 12
    C = shape[1]
    return (x, 1 + 0.5 * rng.standard_normal(C), 0.5 * rng.standard_normal(C),
            rng.standard_normal(3), rng.standard_normal(3))


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_is_eq3_with_the_direct_statistics_of_each_scope(seed):
    x, gamma, beta, mean_logits, var_logits = _problem(seed)
    # Eq. (2) over each scope's pixels, straight from x (not through Eq. 4's IN moments)
    axes = {"in": (2, 3), "ln": (1, 2, 3), "bn": (0, 2, 3)}
    w, w_prime = _softmax(mean_logits), _softmax(var_logits)                   # Eq. (5)
    mu = sum(w[i] * x.mean(axis=axes[k], keepdims=True) for i, k in enumerate(axes))
    var = sum(w_prime[i] * x.var(axis=axes[k], keepdims=True) for i, k in enumerate(axes))
    c = (1, -1, 1, 1)
    expected = gamma.reshape(c) * (x - mu) / np.sqrt(var + 1e-5) + beta.reshape(c)  # Eq. (3)
    y, _ = switchable_norm_forward(x, gamma, beta, mean_logits, var_logits, eps=1e-5)
    # Two summation orders over at most 24 values of size ~20 (var ~25): the outputs, of
    # size ~3, agree to a few hundred float64 roundings.
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-12)


def test_ratios_are_the_softmax_of_eq5():
    for logits in (np.array([0.0, 0.0, 0.0]), np.array([-3.0, 0.5, 2.0]),
                   np.array([700.0, 699.0, 0.0])):  # e^700 overflows unless shifted first
        w = ratios(logits)
        shifted = logits - logits.max()
        np.testing.assert_allclose(w, np.exp(shifted) / np.exp(shifted).sum(), rtol=1e-15)
        assert abs(w.sum() - 1) < 1e-15 and np.all((w >= 0) & (w <= 1))
    np.testing.assert_array_equal(ratios(np.array([0.1, 2.0, -1.0]), hard=True), [0, 1, 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_statistic_gradients_match_finite_differences(seed):
    # Eq. (6)-(8) take h~, the mixed sigma^2 and the mixed mu as independent variables of
    # h^ = gamma h~ + beta, h~ = (h - mu) / sqrt(sigma^2 + eps). One function of all three:
    # y = gamma (t + (h - mu) / sqrt(sigma^2 + eps)) + beta at t = 0, whose vjp in t is
    # dL/dh~ (Eq. 6) and in sigma^2 and mu is Eq. (7) and (8).
    x, gamma, beta, mean_logits, var_logits = _problem(seed)
    eps = 1e-5
    _, cache = switchable_norm_forward(x, gamma, beta, mean_logits, var_logits, eps=eps)
    scopes = SwitchableOptions().scopes
    h = cache.h                                                           # (N, C, S)
    g, b = gamma.reshape(1, -1, 1), beta.reshape(1, -1, 1)

    def f(t, var, mu):
        return g * (t + (h - mu) / np.sqrt(var + eps)) + b

    def vjp(dy, t, var, mu):
        dx_tilde, dvar, dmu = statistic_gradients(dy, cache)
        return {"t": dx_tilde, "var": dvar, "mu": dmu}

    inputs = {"t": np.zeros(h.shape), "var": mix(cache.w_var, cache.var, scopes),
              "mu": mix(cache.w_mean, cache.mu, scopes)}
    for name, err in check_vjp(f, vjp, inputs, seed=seed).items():
        assert err.max_rel_error < FD_TOLERANCE, (name, err)


@pytest.mark.parametrize("K", [1, 2, 3])
def test_ratio_gradients_are_the_softmax_jacobian(K):
    # Eq. (12)-(14): S_k is dL/dw_k (mu = sum_k w_k mu_k gives dL/dw_k = sum dL/dmu mu_k),
    # so dL/dlambda is the softmax's Jacobian applied to S. Finite differences of the
    # softmax itself, with a random upstream gradient standing for S.
    rng = np.random.default_rng(K)
    lam = 2 * rng.standard_normal(K)

    def f(lam):
        return ratios(lam)

    def vjp(dy, lam):
        return {"lam": ratio_gradients(ratios(lam), [np.asarray(s) for s in dy])}

    err = check_vjp(f, vjp, {"lam": lam}, seed=K)["lam"]
    assert err.max_rel_error < FD_TOLERANCE, err
    np.testing.assert_array_equal(ratio_gradients(ratios(lam), list(lam), hard=True),
                                  np.zeros(K))
