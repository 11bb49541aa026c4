"""Deliberately wrong implementations: each is diagnosed by fingerprint and fails
assert_matches; the correct versions pass both."""

from __future__ import annotations

import numpy as np
import pytest

from refnorm.testing import assert_matches, fingerprint
from tests.testing.impls import AxesNorm, NumpyBN, NumpyGN, NumpyIN, NumpySN, numpy_bn_forward

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


def test_in_running_statistics_are_compared_too():
    """IN with tracked running statistics: the right update passes, a biased running variance
    fails on it (the kit compared BN's running statistics only, and never met a stateful
    IN)."""
    assert_matches("in", NumpyIN(3), num_channels=3, max_examples=10)
    with pytest.raises(AssertionError, match="running_var"):
        assert_matches("in", NumpyIN(3, running_biased=True), num_channels=3, max_examples=10)


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


# -- assert_matches names the first diverging convention ---------------------------------

FIRST = "First diverging convention (refnorm.testing.fingerprint): "


@pytest.mark.parametrize(("flag", "row", "dtype"), [
    ("eps_outside", "eps placement: found added to the std, sqrt(var) + eps; "
                    "refnorm: sqrt(var + eps).", np.float64),
    ("unbiased", "variance in normalization: found unbiased", np.float64),
    ("one_pass32", "float32, mean 1e4 x std: found loses the variance", np.float32),
    ("running_biased", "running variance: found biased (1/m)", np.float64),
], ids=["eps_outside", "unbiased", "one_pass32", "running_biased"])
def test_failure_states_the_first_diverging_convention(flag, row, dtype):
    with pytest.raises(AssertionError) as info:
        assert_matches("bn", NumpyBN(4, **{flag: True}), dtype=dtype)
    assert FIRST + row in str(info.value), str(info.value)


def test_momentum_is_judged_against_the_one_compared_under():
    """The running average follows the momentum assert_matches was given, not refnorm's
    default: a layer with momentum 0.1 compared under 0.3 diverges there."""
    with pytest.raises(AssertionError) as info:
        assert_matches("bn", NumpyBN(4), momentum=0.3)
    assert FIRST + "running average: found exponential, new batch weighted 0.1" in \
        str(info.value) and "(the momentum compared under)" in str(info.value)


def test_layer_norm_over_channels_fails_with_its_scope():
    with pytest.raises(AssertionError) as info:
        assert_matches("ln", AxesNorm((1,)))
    assert FIRST + "statistics over: found C, per sample and position; refnorm: C, H, W, " \
        "per sample." in str(info.value), str(info.value)


def test_a_difference_outside_the_probes_says_so():
    """Wrong only for three samples (the probes use two or four): no convention differs."""
    def bn_wrong_at_n3(x, gamma, beta):
        return numpy_bn_forward(x, gamma, beta) * (1.01 if x.shape[0] == 3 else 1.0)
    with pytest.raises(AssertionError) as info:
        assert_matches("bn", bn_wrong_at_n3)
    assert "No diverging convention: fingerprint finds every convention it probes as " \
        "refnorm's" in str(info.value), str(info.value)


def test_torch_bn_with_eps_on_the_std_fails_on_the_eps_placement():
    """Its autograd gives dx = NaN at a constant input (d sqrt(var) at var = 0), the case
    hypothesis shrinks to; the message leads with the cause."""
    pytest.importorskip("torch")
    from tests.testing.torch_impls import BatchNormEpsOnStd

    with pytest.raises(AssertionError) as info:
        assert_matches("bn", BatchNormEpsOnStd(4))
    text = str(info.value)
    assert FIRST + "eps placement: found added to the std" in text, text
    assert text.index("eps placement") < text.index("On the smallest failing input")


def test_torch_layer_norm_over_channels_fails_with_its_scope():
    pytest.importorskip("torch")
    from tests.testing.torch_impls import LayerNormOverChannels

    with pytest.raises(AssertionError) as info:
        assert_matches("ln", LayerNormOverChannels(4))
    assert FIRST + "statistics over: found C, per sample and position" in str(info.value)


def _sn_backward(scale_dx: float = 1.0, scale_dvar_logits: float = 1.0):
    import refnorm

    def backward(dy, x, gamma, beta, mean_logits, var_logits):
        _, cache = refnorm.switchable_norm_forward(x, gamma, beta, mean_logits, var_logits)
        dx, dgamma, dbeta, dml, dvl = refnorm.switchable_norm_backward(dy, cache)
        return scale_dx * dx, dgamma, dbeta, dml, scale_dvar_logits * dvl
    return backward


def _sn_forward(x, gamma, beta, mean_logits, var_logits):
    import refnorm

    return refnorm.switchable_norm_forward(x, gamma, beta, mean_logits, var_logits)[0]


@pytest.mark.parametrize(("scales", "wrong"), [((1.0, 1.0), None), ((1.01, 1.0), ["dx"]),
                                               ((1.0, 1.01), ["dvar_logits"])])
def test_switchable_norm_gradients_are_probed_logits_included(scales, wrong):
    """SN's gradients were not probed at all: a backward 1 % off in dx matched refnorm. They
    are now checked at random ratios (every scope counts), the logits' gradients too."""
    report = fingerprint("sn", _sn_forward, backward=_sn_backward(*scales))
    if wrong is None:
        assert report.conventions["gradients"] == "consistent" and report.match is not None
    else:
        assert report.conventions["gradients"] == wrong and report.match is None


def test_a_float16_output_returned_as_float32_fails():
    """refnorm returns y in x's dtype; an implementation that widens float16 to float32
    passed before (only values were compared)."""
    def widened(x, gamma, beta):
        return numpy_bn_forward(x.astype(np.float32), gamma.astype(np.float32),
                                beta.astype(np.float32))
    with pytest.raises(AssertionError, match=r"y: returned as float32 for float16 input"):
        assert_matches("bn", widened, dtype=np.float16, max_examples=10)


def test_refnorms_own_float16_layer_passes_with_its_running_statistics():
    """The buffers hold float16: 0.9 is stored as 0.89990234375. The tolerance once used
    float32's roundoff for them and failed refnorm's own layer."""
    import refnorm

    layer = refnorm.build("bn", 4, dtype=np.float16)

    class Stateful:
        momentum, eps = 0.1, 1e-5
        running_mean = property(lambda s: layer.state["running_mean"],
                                lambda s, v: layer.state.__setitem__(
                                    "running_mean", np.asarray(v, np.float16)))
        running_var = property(lambda s: layer.state["running_var"],
                               lambda s, v: layer.state.__setitem__(
                                   "running_var", np.asarray(v, np.float16)))

        def __call__(self, x, gamma, beta, training=True):
            layer.params = {"gamma": np.asarray(gamma, np.float16),
                            "beta": np.asarray(beta, np.float16)}
            return layer.forward(np.asarray(x, np.float16), training=training)

    assert_matches("bn", Stateful(), dtype=np.float16, num_channels=4, max_examples=30)


FIRST = "First diverging convention (refnorm.testing.fingerprint): "


def test_gn_with_another_group_count_fails_on_the_group_count():
    """A GN of 2 consecutive groups compared under num_groups=3: same layout, another G. The
    failure names the group count, not "no diverging convention"."""
    with pytest.raises(AssertionError) as info:
        assert_matches("gn", NumpyGN(2), num_groups=3, num_channels=6, max_examples=10)
    assert FIRST + "group layout: found consecutive, G = 2; refnorm: consecutive channels " \
        "(c // (C/G)), G = 3." in str(info.value), str(info.value)


def _one_pass_in_the_inputs_dtype(x, gamma, beta):
    """BN with the one-pass variance E[x^2] - E[x]^2, computed in the input's dtype."""
    axes = (0,) + tuple(range(2, x.ndim))
    view = (1, -1) + (1,) * (x.ndim - 2)
    mu = x.mean(axis=axes, keepdims=True)
    var = np.maximum((x * x).mean(axis=axes, keepdims=True) - mu * mu, 0)
    return gamma.reshape(view) * (x - mu) / np.sqrt(var + 1e-5) + beta.reshape(view)


def test_a_one_pass_variance_in_the_inputs_own_dtype_is_found_at_the_offset():
    """The offset probe is a float32 input: a one-pass variance that computes in its input's
    dtype keeps every digit in float64 and loses the variance in float32."""
    report = fingerprint("bn", _one_pass_in_the_inputs_dtype)
    assert report.conventions["offset_precision"] == "lost", str(report)
    assert report.match is None


def _unbiased_in_float32(x, gamma, beta):
    """BN whose float32 path (a separate fast kernel, say) divides by m - 1; float64 by m."""
    axes = (0,) + tuple(range(2, x.ndim))
    view = (1, -1) + (1,) * (x.ndim - 2)
    ddof = 1 if x.dtype == np.float32 else 0
    mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True, ddof=ddof)
    return gamma.reshape(view) * (x - mu) / np.sqrt(var + 1e-5) + beta.reshape(view)


def test_a_float32_path_off_by_a_few_percent_is_found_at_the_offset():
    """The float64 probes see refnorm's BN; the float32 probe sees outputs about 2 % off
    (sqrt(23/24), m = 24): beyond float32's rounding at 1e4 (~1e-3), so not "keeps"."""
    report = fingerprint("bn", _unbiased_in_float32)
    assert report.conventions["variance"] == "biased", str(report)
    assert report.conventions["offset_precision"] == "lost", str(report)
    assert report.match is None


def test_sn_with_the_variance_ratios_for_both_is_named():
    """Tied ratios either way round: the variance ratios used for the means too are named
    so, not "other"."""
    sn = NumpySN(4, tied=True)      # tied: the first logits for both

    def variance_ratios_for_both(x, gamma, beta, mean_logits, var_logits):
        return sn(x, gamma, beta, var_logits, var_logits)

    report = fingerprint("sn", variance_ratios_for_both)
    row = next(r for r in report.rows if r.topic == "ratios")
    assert row.found == "tied (variance ratios for both)", str(report)
    assert report.conventions["ratios"] == "tied" and report.match is None


def _float32_only_bn_eps_on_the_std(x, gamma, beta, eps=1e-5):
    if x.dtype != np.float32:
        raise TypeError(f"float32 only; got {x.dtype}")
    axes = (0,) + tuple(range(2, x.ndim))
    view = (1, -1) + (1,) * (x.ndim - 2)
    mu = x.mean(axis=axes, keepdims=True)
    std = x.std(axis=axes, keepdims=True)
    return gamma.reshape(view) * (x - mu) / (std + eps) + beta.reshape(view)


def test_a_failure_the_probes_cannot_run_on_says_so():
    """docs/testing.md: when the probes (float64) cannot run on the layer, the failure says
    that instead of naming a convention, and still shows the smallest failing input."""
    with pytest.raises(AssertionError) as failure:
        assert_matches("bn", _float32_only_bn_eps_on_the_std, dtype=np.float32,
                       max_examples=20)
    lines = str(failure.value).splitlines()
    assert lines[1] == ("No diagnosis: fingerprint could not probe it "
                        "(TypeError: float32 only; got float64).")
    assert lines[2].startswith("On the smallest failing input: y: max |error|")
