"""Layer Normalization on (N, D) inputs: Ba et al.'s per-unit gain and bias."""

from __future__ import annotations

import numpy as np

import refnorm


def test_feature_vectors_are_normalized_per_sample():
    rng = np.random.default_rng(0)
    x = 4 * rng.standard_normal((5, 7)) - 3
    gamma, beta = rng.standard_normal(7), rng.standard_normal(7)
    y, _ = refnorm.layer_norm_forward(x, gamma, beta, eps=1e-5)
    mu = x.mean(axis=1, keepdims=True)
    sigma2 = x.var(axis=1, keepdims=True)
    np.testing.assert_allclose(y, gamma * (x - mu) / np.sqrt(sigma2 + 1e-5) + beta, rtol=1e-12)


def test_samples_are_independent():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 2, 2))
    y, _ = refnorm.layer_norm_forward(x, np.ones(3), np.zeros(3))
    y0, _ = refnorm.layer_norm_forward(x[:1], np.ones(3), np.zeros(3))
    np.testing.assert_array_equal(y[:1], y0)
