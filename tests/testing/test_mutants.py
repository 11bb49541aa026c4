"""Deliberately wrong implementations: each is diagnosed by fingerprint and fails
assert_matches (issue 14, item 4); the correct versions pass both."""

from __future__ import annotations

import numpy as np
import pytest

from refnorm.testing import assert_matches, fingerprint
from tests.testing.impls import NumpyBN, NumpyGN, NumpySN

# (flag, the fingerprint convention that names the bug, its value, the dtype assert_matches
# runs in: the one-pass variance only loses digits in float32)
BN_MUTANTS = [
    ("one_pass32", "offset_precision", "lost", np.float32),
    ("eps_outside", "eps_placement", "added_to_std", np.float64),
    ("unbiased", "variance", "unbiased", np.float64),
    ("running_biased", "running_var", "biased", np.float64),
    ("momentum_old", "momentum_on", "old", np.float64),
    ("dgamma_wrong", "gradients", ["dgamma (summed over spatial axis 2, spatial axis 3 only, "
                                   "averaged over N)"], np.float64),
]
# momentum 0.1 on the old value *is* refnorm's momentum 0.9 on the new one: the fingerprint
# says both; assert_matches, told the implementation's momentum is 0.1, fails it
MATCH_AFTER_RENAMING = {"momentum_old": "update_running_stats(momentum=0.9)"}


def test_correct_numpy_bn_matches_and_fingerprints_as_refnorm():
    impl = NumpyBN(4)
    report = fingerprint("bn", impl)
    assert report.match is not None, str(report)
    assert report.conventions["momentum_new_weight"] == 0.1
    assert_matches("bn", NumpyBN(4))


@pytest.mark.parametrize(("flag", "key", "value", "dtype"), BN_MUTANTS,
                         ids=[m[0] for m in BN_MUTANTS])
def test_bn_mutant_is_diagnosed_and_fails(flag, key, value, dtype):
    report = fingerprint("bn", NumpyBN(4, **{flag: True}))
    assert report.conventions[key] == value, str(report)
    if flag in MATCH_AFTER_RENAMING:
        assert MATCH_AFTER_RENAMING[flag] in report.match, str(report)
    else:
        assert report.match is None, str(report)
    with pytest.raises(AssertionError, match="Smallest failing input"):
        assert_matches("bn", NumpyBN(4, **{flag: True}), dtype=dtype)


def test_eps_outside_the_root_is_one_line_of_the_report():
    text = str(fingerprint("bn", NumpyBN(4, eps_outside=True)))
    lines = [line for line in text.splitlines() if line.startswith("eps placement")]
    assert lines == ["eps placement             | added to the std, sqrt(var) + eps      "
                     "           | ≠ sqrt(var + eps)"] or "sqrt(var) + eps" in lines[0], text
    assert "≠" in lines[0]


def test_gn_interleaved_groups_are_diagnosed_and_fail():
    good = fingerprint("gn", NumpyGN(3))
    assert (good.conventions["group_layout"], good.conventions["num_groups"]) == \
        ("consecutive", 3)
    assert good.match is not None, str(good)
    bad = fingerprint("gn", NumpyGN(3, layout="interleaved"))
    assert (bad.conventions["group_layout"], bad.conventions["num_groups"]) == \
        ("interleaved", 3), str(bad)
    assert bad.match is None
    assert_matches("gn", NumpyGN(3))
    with pytest.raises(AssertionError, match="Smallest failing input"):
        assert_matches("gn", NumpyGN(3, layout="interleaved"))


def test_sn_tied_ratios_are_diagnosed_and_fail():
    good = fingerprint("sn", NumpySN(4))
    assert good.conventions["ratios"] == "separate"
    assert good.match is not None, str(good)
    bad = fingerprint("sn", NumpySN(4, tied=True))
    assert bad.conventions["ratios"] == "tied", str(bad)
    assert bad.match is None
    assert_matches("sn", NumpySN(4))
    with pytest.raises(AssertionError, match="Smallest failing input"):
        assert_matches("sn", NumpySN(4, tied=True))
