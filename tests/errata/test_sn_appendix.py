"""Switchable Normalization Appendix A, Eq. (6)-(14): which printed formulas are right.

The verdicts are derived by hand (see refnorm/errata/sn_appendix.py and the errata page);
these tests hold the finite-difference measurements to them on several random problems.
"""

from __future__ import annotations

import numpy as np
import pytest

from refnorm.errata import sn_appendix
from refnorm.norms.switchable_norm import SwitchableOptions, scope_moments

AGREE = {"Eq. (6)", "Eq. (7)", "Eq. (8)", "Eq. (9)", "Eq. (10), scalar gamma",
         "Eq. (10)-(11), corrected", "Eq. (12)", "Eq. (13)", "Eq. (14)"}
DISAGREE = {"Eq. (10)", "Eq. (11)"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_printed_appendix_verdicts(seed):
    findings = {f.equation: f for f in sn_appendix.check_appendix(seed)}
    assert set(findings) == AGREE | DISAGREE
    for eq in AGREE:
        assert findings[eq].agrees and findings[eq].max_rel_error < 1e-6, findings[eq]
    for eq in DISAGREE:
        # A wrong formula is wrong by O(1), far from finite-difference noise.
        assert not findings[eq].agrees and findings[eq].max_rel_error > 0.1, findings[eq]


def test_markdown_table_lists_every_finding():
    findings = sn_appendix.check_appendix()
    table = sn_appendix.to_markdown(findings)
    assert table.count("\n") == len(findings) + 1
    assert table.count("**disagrees**") == len(DISAGREE)


def test_eq4_printed_form_fails_in_float32_and_stable_form_does_not():
    m = sn_appendix.check_eq4_float32(offset=1e4)
    # E[h^2] ~ 1e8 has float32 spacing 8: the printed form loses the unit variance entirely.
    assert m.paper_rel_error > 0.5
    # The stable form, with the IN means held as offsets (switchable_norm's "Large means"),
    # keeps the BN-scope variance to float32 rounding (1.2e-7 measured); the law of total
    # variance without the offsets rounds the IN means (2^-24 * 1e4 each) and gives ~5e-5.
    assert m.stable_rel_error < 1e-6


def test_printed_eq4_equals_the_stable_statistics_in_float64():
    # Exact arithmetic makes the two forms equal; float64 on data of size ~12 leaves
    # rounding of E[h^2] ~ 144 (ulp ~3e-14) relative to variances ~25: 1e-12 is a margin.
    rng = np.random.default_rng(0)
    h = 5 * rng.standard_normal((3, 4, 6)) + 12
    for correction in (0, 1):
        mu_p, var_p = sn_appendix.printed_eq4(h, in_correction=correction)
        mu, var = scope_moments(h, SwitchableOptions(in_correction=correction))
        for k in ("in", "ln", "bn"):
            np.testing.assert_allclose(mu_p[k], mu[k], rtol=1e-14)
            np.testing.assert_allclose(var_p[k], var[k], rtol=1e-12)


def test_printed_eq4_in_a_float32_forward_loses_the_variance():
    # What the reference would do with the printed statistics (lesson 03 shows it): mixing
    # mostly the BN scope of float32 data around 1e4, the output's variance is not 1.
    rng = np.random.default_rng(5)
    h = (1e4 + rng.standard_normal((8, 4, 64))).astype(np.float32)
    _, var = sn_appendix.printed_eq4(h)
    _, stable = scope_moments(h.astype(np.float64), SwitchableOptions())
    assert np.max(np.abs(var["bn"] - stable["bn"]) / stable["bn"]) > 0.05


def test_the_stable_eq4_is_measured_in_float32():
    """The errata table's second row is the law-of-total-variance form computed in float32:
    it carries float32's rounding (~1e-7 relative), neither nothing (a float64 computation
    against the float64 reference) nor the printed form's loss."""
    for offset in (1e3, 1e4, 1e5):
        m = sn_appendix.check_eq4_float32(offset=offset)
        assert 1e-9 < m.stable_rel_error < 1e-5, m
        assert m.paper_rel_error > 1e3 * m.stable_rel_error, m
