"""The official SN and WS codes' formulas (from the conventions page), fingerprinted as what
they are."""

from __future__ import annotations

import numpy as np

import refnorm
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


def test_the_closest_options_follow_the_probed_in_variance_whatever_the_residuals(
        monkeypatch):
    """When no candidate matches, the closest is the first, which follows the conventions
    the probes found (unbiased IN here), even where the other one has a smaller residual."""
    from refnorm.testing import fingerprint, probes
    from tests.testing.impls import NumpySN

    def verify(impl, method, shape, options, rng, dtype=np.float64):
        corr = options["options"].in_correction
        return False, (1.0 if corr == 1 else 0.5)

    monkeypatch.setattr(probes, "_verify", verify)
    report = fingerprint("sn", NumpySN(4, official=True))
    assert report.conventions["in_variance"] == "unbiased"
    assert report.match is None
    assert "in_correction=1" in report.closest and report.residual == 1.0, str(report)


def test_refnorms_own_ws_and_wn_agree_on_the_eps_placement_row():
    from refnorm.testing import fingerprint
    from refnorm.weights import weight_norm_forward, weight_standardization_forward

    for method, impl in (("ws", lambda w: weight_standardization_forward(w)[0]),
                         ("wn", lambda v, g: weight_norm_forward(v, g)[0])):
        report = fingerprint(method, impl)
        row = next(r for r in report.rows if r.topic == "eps placement")
        assert report.conventions["eps_placement"] == "added_to_std", str(report)
        assert row.agrees is True, str(report)
        assert report.match is not None, str(report)


def test_the_closest_ws_options_follow_the_probed_std():
    """When no candidate matches (here the official WS shifted by 1e-3), the closest options
    are those of the conventions the probes found: the unbiased std, eps added to it."""
    def shifted(w):
        return official_ws_forward(w) + 1e-3

    report = fingerprint("ws", shifted)
    assert (report.conventions["std"], report.conventions["eps_placement"]) == \
        ("unbiased", "added_to_std"), str(report)
    assert report.match is None
    assert report.closest == ("refnorm.weights.weight_standardization_forward(eps=1e-05, "
                              "eps_mode='add', correction=1)"), str(report)


def test_the_official_ws_std_is_judged_against_the_correction_compared_under():
    """Compared under correction=1 the official WS code's unbiased std is refnorm's (nothing
    diverges); under the default correction=0 the std is the first divergence."""
    report = fingerprint("ws", official_ws_forward)
    assert report.first_divergence({"eps": 1e-5, "eps_mode": "add", "correction": 1}) is None, \
        str(report)
    row = report.first_divergence({"eps": 1e-5, "eps_mode": "add", "correction": 0})
    assert row is not None and row.key == "std", str(report)


def test_the_official_sn_in_variance_is_judged_against_the_options_compared_under():
    """Compared under SwitchableOptions(in_correction=1) the official SN code's unbiased IN
    variance agrees; what diverges first is its running average (momentum on the old
    value), not the variance rows."""
    report = fingerprint("sn", NumpySN(4, official=True))
    row = report.first_divergence({"eps": 1e-5,
                                   "options": refnorm.SwitchableOptions(in_correction=1)})
    assert row is not None and row.key == "running", str(report)
    row = report.first_divergence({"eps": 1e-5, "options": refnorm.SwitchableOptions()})
    assert row is not None and row.key == "variance", str(report)
