"""The Eq. (1) of Luo, Peng, Ren & Zhang's study of distinct normalizers (2018) beside the SN
journal version's Eq. (3), which refnorm implements (refnorm/errata/sn_distinct.py)."""

from __future__ import annotations

import numpy as np
import pytest

from refnorm.errata import sn_distinct
from refnorm.errata.findings import relative
from refnorm.norms.switchable_norm import (
    SCOPES,
    SwitchableOptions,
    ratios,
    scope_moments,
    switchable_norm_forward,
)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_study_form_differs_from_the_journal_form_only_between_scopes(seed):
    c = sn_distinct.compare(seed)
    # One-hot ratios: both divide by one scope's deviation; eps = 1e-12 against variances
    # >= ~1 moves the output by ~1e-12 relative, plus float64 rounding.
    assert c.one_hot < 1e-9, c
    # Soft ratios over scopes of deviations 1, 3 and 9: an average of deviations is not the
    # root of the average variance (measured 0.035-0.25 over seeds 0-5).
    assert c.soft > 1e-2, c
    # Jensen: the average of deviations lies strictly below the root of the average variance.
    assert c.jensen_gap > 0, c


def test_printed_eq1_with_equal_scopes_is_one_standardization():
    # N = C = 1: IN, LN and BN see the same values, so any ratios give (h - mu) / sigma.
    h = np.random.default_rng(0).standard_normal((1, 1, 8)) + 3
    y = sn_distinct.printed_eq1(h, np.array([0.3, -1.0, 2.0]), np.array([1.0, 0.0, -2.0]))
    np.testing.assert_allclose(y, (h - h.mean()) / h.std(), rtol=1e-13)


def test_markdown_table_has_both_rows():
    table = sn_distinct.to_markdown(sn_distinct.compare(0))
    assert table.count("\n") == 3 and "one-hot" in table and "soft" in table


def test_printed_eq1_is_the_formula_as_printed():
    """The verdicts hold for any soft ratios, so only the transcription itself shows it. Eq.
    (1) from numpy's moments: scopes (in, ln, bn) over axes (2), (1, 2), (0, 2), population
    deviations."""
    from refnorm.errata import sn_distinct

    rng = np.random.default_rng(3)
    h = np.array([1.0, 3.0, 9.0]).reshape(1, 3, 1) * rng.standard_normal((4, 3, 5)) + 12
    mean_logits, std_logits = np.array([2.0, -1.0, 0.5]), np.array([-1.5, 0.0, 1.0])
    lam_mu = np.exp(mean_logits) / np.exp(mean_logits).sum()
    lam_sigma = np.exp(std_logits) / np.exp(std_logits).sum()
    axes = [(2,), (1, 2), (0, 2)]
    mean = sum(w * h.mean(axis=ax, keepdims=True) for w, ax in zip(lam_mu, axes, strict=True))
    std = sum(w * h.std(axis=ax, keepdims=True) for w, ax in zip(lam_sigma, axes, strict=True))
    np.testing.assert_allclose(sn_distinct.printed_eq1(h, mean_logits, std_logits),
                               (h - mean) / std, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tied_ratios_remark_holds_only_for_one_hot_ratios(seed):
    """The study's remark after its Fig. 1: with lambda^mu = lambda^sigma, Eq. (1) equals
    sum_z lambda_z h^_z. One-hot: both are one scope's output; soft ratios over scopes of
    deviations 1, 3 and 9: one divisor for the whole mix is not a divisor per term (measured
    0.13-0.24 over seeds 0-3)."""
    r = sn_distinct.tied_ratios_remark(seed)
    assert r.one_hot < 1e-12, r
    assert r.soft > 0.05, r


def test_tied_ratios_remark_weighted_sum_written_out_for_one_channel():
    """The weighted sum the remark names, computed by hand for one (n, c) with the LN and BN
    statistics worked out over their own scopes, against the Eq. (1) value it is said to be."""
    rng = np.random.default_rng(5)
    h = np.array([1.0, 3.0, 9.0]).reshape(1, 3, 1) * rng.standard_normal((4, 3, 6)) + 12
    logits = np.array([0.2, -0.4, 0.9])
    w = np.exp(logits) / np.exp(logits).sum()
    n, c = 1, 2
    scopes = [h[n, c], h[n], h[:, c]]                                # IN, LN, BN values
    mus, sigmas = [v.mean() for v in scopes], [v.std() for v in scopes]
    by_hand = sum(wz * (h[n, c] - m) / s for wz, m, s in zip(w, mus, sigmas, strict=True))
    eq1 = (h[n, c] - np.dot(w, mus)) / np.dot(w, sigmas)
    np.testing.assert_allclose(sn_distinct.printed_eq1(h, logits, logits)[n, c], eq1,
                               rtol=1e-12)
    assert np.max(np.abs(by_hand - eq1)) > 0.05 * np.max(np.abs(eq1))


@pytest.mark.parametrize("seed", [0, 3])
def test_compare_measures_both_forms_with_the_same_control_parameters(seed, monkeypatch):
    """The soft figure is the study's Eq. (1) against the journal's Eq. (3) under the *same*
    mean and deviation control parameters (anything else also measures the means' mixing),
    and the Jensen gap is relative to the root of the mixed variance, as
    :class:`~refnorm.errata.sn_distinct.Comparison` states. Both recomputed from the input
    and the soft control parameters that compare hands to Eq. (1)."""
    seen = []
    original = sn_distinct.printed_eq1

    def spy(h, mean_logits, std_logits, *, hard=False):
        if not hard:
            seen.append((h.copy(), mean_logits.copy(), std_logits.copy()))
        return original(h, mean_logits, std_logits, hard=hard)

    monkeypatch.setattr(sn_distinct, "printed_eq1", spy)
    c = sn_distinct.compare(seed)
    (h, mean_logits, std_logits), = seen
    journal = switchable_norm_forward(h, np.ones(3), np.zeros(3), mean_logits, std_logits,
                                      eps=1e-12)[0]
    assert c.soft == pytest.approx(relative(original(h, mean_logits, std_logits), journal),
                                   rel=1e-12)
    _, var = scope_moments(h, SwitchableOptions())
    w = ratios(std_logits)
    root = np.sqrt(sum(w[i] * var[k] for i, k in enumerate(SCOPES)))
    average = sum(w[i] * np.sqrt(var[k]) for i, k in enumerate(SCOPES))
    assert c.jensen_gap == pytest.approx(float(np.min((root - average) / root)), rel=1e-12)
    assert 0 < c.jensen_gap < 1


def test_markdown_rows_carry_their_own_figures():
    c = sn_distinct.Comparison(one_hot=3.0e-12, soft=0.145, jensen_gap=0.0043)
    rows = sn_distinct.to_markdown(c).splitlines()[2:]
    assert rows == ["| one-hot (each scope in turn) | 3.0e-12 |",
                    "| soft (random control parameters) | 0.14 |"], rows
