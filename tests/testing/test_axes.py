"""The axes probe of refnorm.testing.fingerprint (refnorm/testing/axes.py): it reads the true
reduction axes, and the later probes standardize within them."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from refnorm.testing import fingerprint
from tests.testing.impls import AxesNorm, NumpyGN

SUBSETS = [s for r in range(5) for s in combinations(range(4), r)]   # all 16, () to (0..3)
NAMES = "NCHW"
REFNORM_AXES = {"bn": (0, 2, 3), "in": (2, 3), "ln": (1, 2, 3)}


@pytest.mark.parametrize("axes", SUBSETS, ids=lambda s: "".join(NAMES[a] for a in s) or "none")
def test_every_subset_of_axes_of_a_4d_input_is_found(axes):
    """Standardizing over any subset of (N, C, H, W): the probe reports that subset, and the
    variance, eps and offset probes, now within the true statistics, read refnorm's
    conventions (which this implementation follows) instead of artefacts of a wrong scope."""
    report = fingerprint("ln", AxesNorm(axes))
    c = report.conventions
    assert c["reduce_axes"] == list(axes), str(report)
    if not axes:                     # x - mean(x) over nothing is 0: a constant output
        assert report.rows[0].found == "nothing: the output does not move with its input"
        assert report.match is None
        return
    assert report.rows[0].found.startswith(", ".join(NAMES[a] for a in axes)), str(report)
    assert (c["variance"], c["eps_placement"], c["eps"], c["offset_precision"]) == \
        ("biased", "inside_sqrt", 1e-5, "ok"), str(report)
    assert (report.rows[0].agrees, report.match is not None) == \
        ((axes == REFNORM_AXES["ln"],) * 2), str(report)


@pytest.mark.parametrize("method", ["bn", "in"])
def test_refnorm_axes_of_bn_and_in_match(method):
    report = fingerprint(method, AxesNorm(REFNORM_AXES[method]))
    assert report.rows[0].agrees and report.match is not None, str(report)
    ln_axes = fingerprint(method, AxesNorm(REFNORM_AXES["ln"]))
    assert not ln_axes.rows[0].agrees and ln_axes.match is None, str(ln_axes)


def test_layer_norm_over_channels_per_position_is_named():
    text = str(fingerprint("ln", AxesNorm((1,))))
    row = next(line for line in text.splitlines() if line.startswith("statistics over"))
    assert "C, per sample and position" in row and "≠ C, H, W, per sample" in row, text
    for wrong in ("scaled by", "one-pass", "unknown"):         # the old artefacts
        assert wrong not in text, text


def test_group_layouts_read_from_the_moved_set():
    for layout, found in (("consecutive", "groups of 4 consecutive channels"),
                          ("interleaved", "groups of 4 channels 3 apart")):
        report = fingerprint("gn", NumpyGN(3, layout=layout))
        assert (report.conventions["group_layout"], report.conventions["num_groups"]) == \
            (layout, 3)
        assert found in report.rows[0].found and report.conventions["reduce_axes"] == [2, 3]


def test_layer_norm_over_channels_torch_module():
    pytest.importorskip("torch")
    from tests.testing.torch_impls import LayerNormOverChannels

    report = fingerprint("ln", LayerNormOverChannels(4))
    c = report.conventions
    assert c["reduce_axes"] == [1], str(report)
    assert (c["variance"], c["eps_placement"], c["offset_precision"], c["gradients"]) == \
        ("biased", "inside_sqrt", "ok", "consistent"), str(report)
    assert report.match is None


def test_the_probe_perturbs_one_element():
    """A normalizer whose statistic is the whole input moves every output; the identity
    moves only the changed element ("each element alone")."""
    assert fingerprint("ln", AxesNorm((0, 1, 2, 3))).rows[0].found == \
        "N, C, H, W (one statistic)"
    report = fingerprint("ln", lambda x, gamma, beta: np.array(x, copy=True))
    assert report.rows[0].found == "each element alone (no axis reduced)", str(report)


def test_a_kept_spatial_axis_beside_a_reduced_one_is_named_by_itself():
    """"per ... position" stands for every spatial axis kept; with H reduced and W kept the
    statistic is per channel and W."""
    assert fingerprint("ln", AxesNorm((0, 2))).rows[0].found == "N, H, per channel and W"
    assert fingerprint("ln", AxesNorm((0, 3))).rows[0].found == "N, W, per channel and H"
