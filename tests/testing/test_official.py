"""The official SN and WS codes' formulas (from the conventions page), fingerprinted as what
they are."""

from __future__ import annotations

from refnorm.testing import assert_matches, fingerprint
from tests.testing.impls import NumpySN, official_ws_forward


def test_official_sn_code():
    report = fingerprint("sn", NumpySN(4, official=True))
    c = report.conventions
    assert (c["ratios"], c["in_variance"], c["eps_placement"]) == \
        ("separate", "unbiased", "inside_sqrt"), str(report)
    # momentum 0.997 on the old value, and the BN-scope variance (from unbiased IN
    # variances) without a further m/(m-1)
    assert (c["momentum_new_weight"], c["momentum_on"], c["running_var"]) == \
        (0.003, "old", "in_unbiased"), str(report)
    assert report.match is None
    assert "in_correction=1" in report.closest, str(report)


def test_official_ws_code():
    report = fingerprint("ws", official_ws_forward)
    c = report.conventions
    assert (c["std"], c["eps_placement"], c["eps"]) == ("unbiased", "added_to_std", 1e-5), \
        str(report)
    assert report.match == ("refnorm.weights.weight_standardization_forward(eps=1e-05, "
                            "eps_mode='add', correction=1)"), str(report)
    assert_matches("ws", official_ws_forward, correction=1)


def test_refnorm_sn_defaults_as_numpy():
    report = fingerprint("sn", NumpySN(4))
    c = report.conventions
    assert (c["in_variance"], c["running_var"], c["momentum_on"]) == \
        ("biased", "unbiased", "new"), str(report)
    assert report.match is not None and "in_correction=0" in report.match, str(report)
