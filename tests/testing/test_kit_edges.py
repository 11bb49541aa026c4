"""The conformance kit at its edges: float16 tolerances and dtypes, a layer's own eps and
momentum, the inference row of stateful numpy layers, eps in a backward, WS's eps placement,
interleaved groups, tiny-variance cases and the command's --args hint."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refnorm.testing import Case, as_impl, assert_matches, fingerprint, norm_inputs
from refnorm.testing.compare import compare_case
from refnorm.testing.reference import group_ids
from tests.testing.impls import NumpyBN, NumpyGN, float32_bn_forward, numpy_bn_forward

FIRST = "First diverging convention (refnorm.testing.fingerprint): "
F16, F32 = np.float16, np.float32


def _in_float32(x, gamma, beta):
    """tests.testing.impls' BN forward computing in float32, returned in x's dtype."""
    return numpy_bn_forward(x.astype(F32), gamma.astype(F32), beta.astype(F32)).astype(x.dtype)


def _float32_backward(dy, x, gamma, beta):
    """NumpyBN's closed-form backward computed in float32 (results left in float32)."""
    return NumpyBN(1).backward(dy.astype(F32), x.astype(F32), gamma.astype(F32),
                               beta.astype(F32))


# -- comparing outputs and gradients (refnorm.testing.compare) -------------------------------------


def test_a_float16_input_gradient_returned_as_float32_fails():
    """refnorm returns dx in x's dtype as it does y: a float16 layer whose backward hands dx
    back in its float32 compute dtype is told so, as one whose y is widened is."""
    def backward(dy, x, gamma, beta):
        dx, dgamma, dbeta = _float32_backward(dy, x, gamma, beta)
        return dx, dgamma.astype(x.dtype), dbeta.astype(x.dtype)    # dx left in float32

    with pytest.raises(AssertionError, match=r"dx: returned as float32 for float16 input"):
        assert_matches("bn", _in_float32, backward, dtype=F16, max_examples=10)


def test_the_float16_floor_of_dx_is_a_float16_spacing_not_a_scaled_one():
    """float16 computes in float32: the floor of dx is one float16 subnormal spacing (6e-8)
    plus float32's (1.4e-45) times the backward's factors. A float16 backward that flushes
    subnormal dx to zero is off by 3.3e-7 here (gamma = 1e-6, three values) and is told
    so; the same backward without the flush passes."""
    def backward(dy, x, gamma, beta):
        return tuple(g.astype(F16) for g in _float32_backward(dy, x, gamma, beta))

    def flushing_backward(dy, x, gamma, beta):
        dx, dgamma, dbeta = backward(dy, x, gamma, beta)
        return np.where(np.abs(dx) < np.finfo(F16).smallest_normal, 0, dx).astype(F16), \
            dgamma, dbeta

    case = Case("bn", "plain", np.array([[0.0], [1.0], [3.0]], F16),
                (np.array([1e-6], F16), np.array([0.0], F16)),
                np.array([[0.5], [-0.25], [0.125]], F16), 1e-5)
    assert compare_case(as_impl("bn", _in_float32, backward=backward), case,
                        {"eps": 1e-5}) is None
    mismatch = compare_case(as_impl("bn", _in_float32, backward=flushing_backward), case,
                            {"eps": 1e-5})
    assert mismatch is not None and mismatch.output == "dx" and mismatch.got == 0.0, \
        mismatch


def test_a_float16_output_three_spacings_off_fails():
    """The returned value's own rounding is bounded by 2 u_out |y| (u_out = 2**-11), less
    than two float16 spacings of y: a float16 layer whose normal outputs are each three
    spacings off fails, while the same layer rounding its float32 result once passes."""
    def three_spacings_off(x, gamma, beta):
        y = _in_float32(x, gamma, beta)
        normal = np.abs(y) >= np.finfo(y.dtype).smallest_normal     # subnormals: see above
        return np.where(normal, y + 3 * np.spacing(y), y).astype(y.dtype)

    assert_matches("bn", _in_float32, dtype=F16, max_examples=20)
    with pytest.raises(AssertionError, match=r"y: max \|error\|"):
        assert_matches("bn", three_spacings_off, dtype=F16, max_examples=20)


# -- PyTorch layers with their own eps and momentum ------------------------------------------------


@pytest.mark.parametrize("eps", [1e-3, 0.1])
def test_the_eps_compared_under_is_the_modules_own(eps):
    """assert_matches compares under the implementation's eps attribute when none is given
    (its docstring): BatchNorm2d(eps=...) and LayerNorm(eps=...) pass; the drawn tiny
    variances tell their eps from 1e-5."""
    torch = pytest.importorskip("torch")
    assert_matches("bn", torch.nn.BatchNorm2d(3, eps=eps), max_examples=15)
    assert_matches("ln", torch.nn.LayerNorm(4, eps=eps), max_examples=15)


def test_an_eps_half_again_the_one_compared_under_is_the_first_divergence():
    """A layer with eps = 1.5e-5 compared under 1e-5: the eps row (read off the ladder to
    1 %) is the first diverging convention, though both eps are of one order."""
    report = fingerprint("bn", NumpyBN(4, eps=1.5e-5))
    assert report.conventions["eps"] == 1.5e-5, str(report)
    row = report.first_divergence({"eps": 1e-5, "momentum": 0.1})
    assert row is not None and row.key == "eps", str(report)


def test_an_eps_attribute_the_layer_does_not_use_is_not_reported_as_its_eps():
    """The eps read off the ladder is replaced by the layer's eps attribute only when they
    agree to 1 %: a layer saying eps = 1e-5 and adding 1.5e-5 is reported with 1.5e-5, and
    matches refnorm under that eps."""
    def stated_1e5_uses_15e6(x, gamma, beta):
        return numpy_bn_forward(x, gamma, beta, eps=1.5e-5)

    stated_1e5_uses_15e6.eps = 1e-5
    report = fingerprint("bn", stated_1e5_uses_15e6)
    assert report.conventions["eps"] == 1.5e-5, str(report)
    assert report.match == "refnorm.batch_norm_forward(eps=1.5e-05)", str(report)


def test_the_momentum_compared_under_is_the_modules_own():
    """The running buffers are checked under the implementation's momentum attribute when
    none is given: BatchNorm2d(momentum=0.3), which PyTorch documents as the weight of the
    new batch, passes; so does a stateful numpy BN with momentum 0.3."""
    torch = pytest.importorskip("torch")
    assert_matches("bn", torch.nn.BatchNorm2d(3, momentum=0.3), max_examples=10)
    assert_matches("bn", NumpyBN(3, momentum=0.3), max_examples=10)


def test_momentum_one_keeps_the_last_batch_and_matches():
    """PyTorch's momentum = 1 (within refnorm's (0, 1]): the running statistics are the last
    batch's, an exponential average with new weight 1 that refnorm's update reproduces."""
    torch = pytest.importorskip("torch")
    report = fingerprint("bn", torch.nn.BatchNorm2d(3, momentum=1.0))
    assert (report.conventions["running"], report.conventions["momentum_new_weight"]) == \
        ("exponential", 1.0), str(report)
    assert report.match is not None and "update_running_stats(momentum=1.0)" in \
        report.match, str(report)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_momentum_zero_is_named_and_its_running_variance_is_not_judged():
    """PyTorch's momentum = 0 keeps the buffers at their start: the batch variance never
    reaches them, so its estimator cannot be seen (it was "scaled by nan", from 0 / 0), and
    refnorm's momentum (0, 1] has no such option: the running-average row says so."""
    torch = pytest.importorskip("torch")
    report = fingerprint("bn", torch.nn.BatchNorm2d(3, momentum=0.0))
    rows = {row.topic: row for row in report.rows}
    assert rows["running variance"].found.startswith("not seen") and \
        rows["running variance"].agrees is None, str(report)
    assert report.conventions["running_var"] == "unseen"
    assert rows["running average"].agrees is False and \
        "refnorm's momentum is in (0, 1]" in rows["running average"].found, str(report)
    assert report.match is None and report.first_divergence().topic == "running average"


def test_a_layer_computing_in_float32_is_named_so_not_affine_other():
    """A float64 probe of a layer that computes in float32 finds the affine off by ~1e-7, not
    the 1e-9 of float64: it was "affine: other"; the row now says float32 precision."""
    report = fingerprint("bn", float32_bn_forward)
    rows = {row.topic: row for row in report.rows}
    assert report.conventions["affine"] == "per_channel_float32", str(report)
    assert "to float32 precision only" in rows["affine"].found
    assert report.match is None and report.first_divergence().topic == "affine"
    exact = fingerprint("bn", numpy_bn_forward)
    assert exact.conventions["affine"] == "per_channel" and exact.match is not None


# -- numpy layers with one convention changed ------------------------------------------------------


@pytest.mark.parametrize("flag", [None, "eps_outside"])
def test_inference_of_a_stateful_numpy_layer_uses_its_running_statistics(flag):
    """A stateful callable gets training=False for the inference probe, and its eval output
    (x - running_mean) / D(running_var), with D where the probes found eps (inside the root,
    or added to the std), is read as using the running statistics."""
    report = fingerprint("bn", NumpyBN(4, **({flag: True} if flag else {})))
    assert report.conventions["inference"] == "running", str(report)


def test_a_layer_that_ignores_training_false_is_told_so():
    """A stateful layer that normalizes with the batch statistics in eval mode too."""
    class AlwaysBatch(NumpyBN):
        def __call__(self, x, gamma, beta, *, training=True):
            return super().__call__(x, gamma, beta, training=True)

    report = fingerprint("bn", AlwaysBatch(4))
    assert report.conventions["inference"] == "other", str(report)


def test_a_backward_that_leaves_eps_out_of_rstd_is_found_wrong():
    """dx and dgamma from 1 / sqrt(var) instead of 1 / sqrt(var + eps) (eps = 3e-5) are off
    by about eps / (2 var) ~ 4e-6 of their scale at the probe's variance (~4): the gradient
    probe, whose central differences are good to ~1e-9, names both; the backward with eps
    is consistent."""
    eps = 3e-5

    def forward(x, gamma, beta):
        return numpy_bn_forward(x, gamma, beta, eps=eps)

    def backward(with_eps):
        def run(dy, x, gamma, beta):
            axes = (0,) + tuple(range(2, x.ndim))
            view = (1, -1) + (1,) * (x.ndim - 2)
            mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
            rstd = 1 / np.sqrt(var + (eps if with_eps else 0.0))
            x_hat = (x - mu) * rstd
            dx_hat = dy * gamma.reshape(view)
            dx = rstd * (dx_hat - dx_hat.mean(axis=axes, keepdims=True)
                         - x_hat * (dx_hat * x_hat).mean(axis=axes, keepdims=True))
            return dx, np.sum(dy * x_hat, axis=axes), np.sum(dy, axis=axes)
        return run

    right = fingerprint("bn", forward, backward=backward(True))
    assert right.conventions["gradients"] == "consistent", str(right)
    wrong = fingerprint("bn", forward, backward=backward(False))
    assert wrong.conventions["gradients"] == ["dgamma", "dx"], str(wrong)
    assert wrong.match is None


def _ws_eps_inside_the_root(w):
    """WS with eps inside the square root, sqrt(var + 1e-5), biased variance."""
    flat = w.reshape(w.shape[0], -1)
    d = flat - flat.mean(axis=1, keepdims=True)
    return (d / np.sqrt(d.var(axis=1, keepdims=True) + 1e-5)).reshape(w.shape)


def test_ws_with_eps_inside_the_root_fails_on_the_eps_placement():
    """refnorm's WS adds eps to the std unless eps_mode='sqrt': compared under the default,
    a WS with sqrt(var + eps) diverges first in the eps placement; compared under
    eps_mode='sqrt' it passes."""
    with pytest.raises(AssertionError) as info:
        assert_matches("ws", _ws_eps_inside_the_root)
    text = str(info.value)
    assert FIRST + "eps placement: found inside the square root" in text, text
    assert "refnorm: sigma + eps." in text, text
    assert_matches("ws", _ws_eps_inside_the_root, eps_mode="sqrt")


# -- interleaved groups (refnorm.testing.axes, reference) ------------------------------------------


def test_interleaved_groups_are_standardized_within_their_own_groups():
    """The later probes standardize within the statistics the implementation forms: a GN
    that puts channel c in group c % G (biased variance, eps 1e-5 inside the root) is read
    as exactly that, not as a variance scaled by mixing its groups."""
    report = fingerprint("gn", NumpyGN(3, layout="interleaved"))
    c = report.conventions
    assert (c["group_layout"], c["num_groups"]) == ("interleaved", 3), str(report)
    assert (c["variance"], c["eps_placement"], c["eps"], c["offset_precision"]) == \
        ("biased", "inside_sqrt", 1e-5, "ok"), str(report)


def test_group_ids_put_consecutive_channels_in_a_group():
    """reference.group_ids for GN: channel c of sample n is in group c // (C / G), numbered
    n * G + group (refnorm's and PyTorch's layout); 'interleaved' is c % G."""
    ids = group_ids("gn", (2, 6, 1), num_groups=3)
    assert ids[:, :, 0].tolist() == [[0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5]]
    ids = group_ids("gn", (1, 6), num_groups=3, layout="interleaved")
    assert ids.tolist() == [[0, 1, 2, 0, 1, 2]]


# -- drawn cases (refnorm.testing.strategies) ------------------------------------------------------


@given(data=st.data())
def test_tiny_variance_spreads_a_tenth_of_sqrt_eps(data):
    """A tiny-variance case spreads about 0.1 sqrt(eps) around its centre (the module
    docstring): values within 0.1 sqrt(eps) of a centre have variance at most eps / 100 in
    every statistic, far below eps, where eps's placement decides the output."""
    method = data.draw(st.sampled_from(["bn", "in", "ln", "gn"]))
    case = data.draw(norm_inputs(method, kinds=("tiny_variance",)))
    ids = group_ids(method, case.x.shape, num_groups=case.num_groups).ravel()
    x = case.x.ravel()
    count = np.bincount(ids)
    mean = np.bincount(ids, x) / count
    var = np.bincount(ids, (x - mean[ids]) ** 2) / count
    assert np.all(var <= case.eps / 100 * (1 + 1e-9)), (var, case.eps)


# -- refnorm conform -------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "hinted"), [
    (["refnorm.norms:GroupNorm", "--method", "gn"], True),
    (["refnorm.norms:BatchNorm", "--method", "bn", "--args", "'a'"], False),
])
def test_a_factory_that_fails_without_args_is_pointed_to_args(argv, hinted, capsys):
    """Built with the default (C,), a factory may need other arguments: the one-line error
    then says to give them with --args; when --args was given, it does not."""
    from refnorm.testing import cli as conform

    assert conform.main(["conform", *argv]) == 2
    err = capsys.readouterr().err
    hint = " (give the factory's positional arguments with --args)\n"
    assert err.endswith(hint) == hinted, err


@pytest.mark.parametrize(("broken", "says"), [
    (lambda x, g, b: x[:, :1], r"its output has shape \(2, 1, 3, 4\) for an input of shape "
                               r"\(2, 4, 3, 4\): a normalizer's output has its input's shape"),
    (lambda x, g, b: x * np.nan, r"its output holds 96 NaN or infinite values of 96 for a "
                                 r"finite input"),
])
def test_an_output_there_is_nothing_to_fingerprint_in_is_refused(broken, says):
    """A layer returning another shape was described as computing statistics over "C, per
    sample and position", one returning NaN as one whose "output does not move"."""
    with pytest.raises(ValueError, match=says):
        fingerprint("bn", broken)


# -- the variance estimator over many values, and the inference statistics ------------------------


class _WholeSampleGN:
    """GN with one group over C = 256 channels (m = 256 * 12 values per statistic on the
    probes), the variance with ``ddof`` (0: biased, 1: unbiased)."""

    num_channels, num_groups = 256, 1

    def __init__(self, ddof: int):
        self.ddof = ddof

    def __call__(self, x, gamma, beta):
        axes = tuple(range(1, x.ndim))
        mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True, ddof=self.ddof)
        view = (1, -1) + (1,) * (x.ndim - 2)
        return gamma.reshape(view) * (x - mu) / np.sqrt(var + 1e-5) + beta.reshape(view)


@pytest.mark.parametrize(("ddof", "name"), [(0, "biased"), (1, "unbiased")])
def test_an_unbiased_variance_over_thousands_of_values_is_named(ddof, name):
    """m/(m-1) = 1 + 3.3e-4 for m = 3072, inside the 0.1 % a ladder fit is allowed: the
    estimator is the nearer of 1 and m/(m-1) (read at s = 100 to ~1e-12 in float64), so the
    unbiased variance is named as such and is the first diverging convention."""
    report = fingerprint("gn", _WholeSampleGN(ddof))
    assert report.conventions["variance"] == name, str(report)
    assert (report.match is not None) == (ddof == 0), str(report)
    row = report.first_divergence({"eps": 1e-5, "num_groups": 1})
    assert (row is None) if ddof == 0 else (row.key == "variance"), str(report)


def test_a_layer_that_ignores_training_false_matches_no_refnorm_convention():
    """refnorm's BN normalizes with its running statistics in inference and has no option
    for the batch statistics there: a layer that uses them matches none."""
    class AlwaysBatch(NumpyBN):
        def __call__(self, x, gamma, beta, *, training=True):
            return super().__call__(x, gamma, beta, training=True)

    report = fingerprint("bn", AlwaysBatch(4))
    assert report.conventions["inference"] == "other", str(report)
    assert report.match is None and report.first_divergence().key == "inference", str(report)


# -- conventions outside the named ones ------------------------------------------------------------


class _BNVariant:
    """A numpy BN whose normalizer is ``den(var, eps)``: ``2 var`` in the root (a variance
    scaled by 2), or the std clamped from below at eps (``max(sqrt(var), eps)``, as
    ``F.normalize`` clamps a norm), neither of refnorm's placements."""

    def __init__(self, den):
        self.den = den

    def __call__(self, x, gamma, beta):
        axes = (0,) + tuple(range(2, x.ndim))
        mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
        view = (1, -1) + (1,) * (x.ndim - 2)
        return gamma.reshape(view) * (x - mu) / self.den(var, 1e-3) + beta.reshape(view)


def test_a_variance_scaled_by_neither_estimator_is_named_by_its_factor():
    """Twice the biased variance is neither 1 nor m/(m-1) = 24/23 times it: the nearer
    estimator is not named, the factor is."""
    report = fingerprint("bn", _BNVariant(lambda var, eps: np.sqrt(2 * var + eps)))
    assert report.conventions["variance"] == "other", str(report)
    assert "scaled by 2 (m = 24)" in str(report)
    assert report.match is None and report.first_divergence().key == "variance", str(report)


def test_an_eps_placement_that_fits_neither_model_is_unknown():
    """max(std, eps) is the std down to eps and eps below it: the best inside-the-root fit,
    sqrt(var + eps^2), misses it by 41 % at std = eps, std + eps by 100 %. The better of two
    wrong models is not named as the placement."""
    report = fingerprint("bn", _BNVariant(lambda var, eps: np.maximum(np.sqrt(var), eps)))
    assert report.conventions["eps_placement"] == "unknown", str(report)
    assert "unknown (best fit misses by" in str(report)
    assert report.match is None, str(report)


def test_a_single_non_finite_output_is_refused():
    """One NaN among the outputs is as unreadable to the probes as all of them."""
    def one_nan(x, gamma, beta):
        y = numpy_bn_forward(x, gamma, beta)
        y[(0,) * y.ndim] = np.nan
        return y

    with pytest.raises(ValueError, match=r"its output holds 1 NaN or infinite values of 96"):
        fingerprint("bn", one_nan)


@pytest.mark.parametrize("G", [1, 12])
def test_group_norm_with_one_group_or_one_channel_per_group_matches(G):
    """G = 1 (every channel, as LN) and G = C (each channel, as IN) have no layout to read
    ("n/a"): either agrees with refnorm's consecutive groups, and the layer matches."""
    report = fingerprint("gn", NumpyGN(G))
    assert report.conventions["group_layout"] == "n/a", str(report)
    assert report.conventions["num_groups"] == G, str(report)
    assert report.match == f"refnorm.group_norm_forward(num_groups={G}, eps=1e-05)", str(report)
    assert report.first_divergence({"eps": 1e-5, "num_groups": G}) is None, str(report)
    assert report.first_divergence() is None and "≠" not in str(report), str(report)


def test_a_one_pass_float64_variance_is_found_on_the_tiny_variance_check_input():
    """E[x^2] - E[x]^2 in float64 keeps a unit variance at 1e4 (the float32 offset row) but
    not a variance of 1e-12 at 12: 144 rounds at 3e-14, 3 % of it. Every probe reads the
    layer as refnorm's (eps = 1e-10); the check input with a variance below eps does not."""
    def one_pass64(x, gamma, beta):
        x64 = x.astype(np.float64)
        axes = (0,) + tuple(range(2, x.ndim))
        mu = x64.mean(axis=axes, keepdims=True)
        var = np.maximum((x64 * x64).mean(axis=axes, keepdims=True) - mu * mu, 0)
        view = (1, -1) + (1,) * (x.ndim - 2)
        y = (x64 - mu) / np.sqrt(var + 1e-10)
        return (gamma.reshape(view) * y + beta.reshape(view)).astype(x.dtype)

    report = fingerprint("bn", one_pass64)
    assert report.conventions["offset_precision"] == "ok", str(report)
    assert report.first_divergence({"eps": 1e-10}) is None, str(report)
    assert report.match is None and report.residual > 1e-6, str(report)   # ~7e-5


def test_a_running_variance_that_stores_var_plus_eps_is_not_refnorms():
    """running_var <- 0.9 running_var + 0.1 (m/(m-1) var + eps): the factor on the variance
    reads m/(m-1) to 1e-6 (eps / var = 2.5e-6), so only replaying both steps through
    refnorm's update tells it apart (1e-6 off in rtol 1e-9)."""
    class StoresVarPlusEps(NumpyBN):
        def __call__(self, x, gamma, beta, *, training=True):
            y = super().__call__(x, gamma, beta, training=training)
            if training:
                self.running_var = self.running_var + self.momentum * self.eps
            return y

    report = fingerprint("bn", StoresVarPlusEps(4))
    assert report.conventions["running_var"] == "unbiased", str(report)
    assert report.match is None, str(report)
    assert "running statistics: no refnorm option" in report.closest, str(report)


def test_a_shift_applied_before_the_gain_is_not_per_channel_affine():
    """gamma * (x_hat + beta) is not gamma * x_hat + beta: the affine row says "other" and it
    is the first diverging convention."""
    def shift_then_scale(x, gamma, beta):
        view = (1, -1) + (1,) * (x.ndim - 2)
        y = numpy_bn_forward(x, np.ones_like(gamma), np.zeros_like(beta))
        return gamma.reshape(view) * (y + beta.reshape(view))

    report = fingerprint("bn", shift_then_scale)
    assert report.conventions["affine"] == "other", str(report)
    assert report.match is None and report.first_divergence().key == "affine", str(report)


def _ws_forward(w):
    """WS as the paper's Eq. (2)/(4): biased std, eps = 1e-5 added to it, per filter."""
    flat = w.reshape(w.shape[0], -1)
    d = flat - flat.mean(axis=1, keepdims=True)
    return (d / (d.std(axis=1, keepdims=True) + 1e-5)).reshape(w.shape)


def _ws_backward(with_std_term):
    """dw of y = d / (sigma + eps), d = w - mean(w): (g - mean(g)) / D minus
    d * sum(g d) / (I sigma D^2), the term through sigma (left out when told)."""
    def run(dy, w):
        flat, g = w.reshape(w.shape[0], -1), dy.reshape(w.shape[0], -1)
        d = flat - flat.mean(axis=1, keepdims=True)
        sigma = d.std(axis=1, keepdims=True)
        D = sigma + 1e-5
        dw = (g - g.mean(axis=1, keepdims=True)) / D
        if with_std_term:
            dw -= d * np.sum(g * d, axis=1, keepdims=True) / (flat.shape[1] * sigma * D**2)
        return dw.reshape(w.shape)
    return run


def test_a_weight_standardization_backward_without_the_std_term_is_found_wrong():
    right = fingerprint("ws", _ws_forward, backward=_ws_backward(True))
    assert right.conventions["gradients"] == "consistent", str(right)
    assert right.match is not None, str(right)
    wrong = fingerprint("ws", _ws_forward, backward=_ws_backward(False))
    assert wrong.conventions["gradients"] == ["dw"], str(wrong)
    assert wrong.match is None, str(wrong)


def test_a_layer_without_eps_that_maps_a_constant_group_to_zero_matches():
    """No eps, and x_hat = 0 where the variance is 0 (the limit refnorm's tiny eps gives): the
    eps placement "none" is refnorm's under eps = 1e-300, and the layer matches it."""
    def no_eps(x, gamma, beta):
        axes = (0,) + tuple(range(2, x.ndim))
        mu = x.mean(axis=axes, keepdims=True)
        std = np.sqrt(x.var(axis=axes, keepdims=True))
        x_hat = np.divide(x - mu, std, out=np.zeros_like(x), where=std > 0)
        view = (1, -1) + (1,) * (x.ndim - 2)
        return gamma.reshape(view) * x_hat + beta.reshape(view)

    report = fingerprint("bn", no_eps)
    assert report.conventions["eps_placement"] == "none", str(report)
    assert report.match == "refnorm.batch_norm_forward(eps=1e-300)", str(report)


# -- a large eps, an (N, C) input, a group count that does not divide 12 --------------------------


class _BNWithEps:
    """A plain numpy BN (biased variance) with eps inside the root or added to the std."""

    def __init__(self, eps: float, placement: str):
        self.eps, self.placement = eps, placement

    def __call__(self, x, gamma, beta):
        axes = (0,) + tuple(range(2, x.ndim))
        mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
        den = (np.sqrt(var) + self.eps if self.placement == "added_to_std"
               else np.sqrt(var + self.eps))
        view = (1, -1) + (1,) * (x.ndim - 2)
        return gamma.reshape(view) * (x - mu) / den + beta.reshape(view)


@pytest.mark.parametrize("placement", ["inside_sqrt", "added_to_std"])
@pytest.mark.parametrize("eps", [10.0, 100.0, 1e4])
def test_a_large_eps_is_not_read_as_a_scaled_variance(eps, placement):
    """At the top of the ladder, s = 100, D^2 = s^2 + eps: (D / s)^2 = 1 + eps / 1e4 read as
    the variance factor named a biased BN with eps = 10 "scaled by 1.001" and made it match
    nothing (and eps = 100 "unknown" placement). eps and the factor are solved together."""
    report = fingerprint("bn", _BNWithEps(eps, placement))
    got = {k: report.conventions[k] for k in ("variance", "eps_placement", "eps")}
    assert got == {"variance": "biased", "eps_placement": placement, "eps": eps}, str(report)
    assert (report.match is not None) == (placement == "inside_sqrt"), str(report)


def test_a_large_eps_compared_under_another_is_diagnosed_as_the_eps_value():
    """assert_matches comparing a BN with eps = 100 under refnorm's 1e-5 blamed its variance
    ("scaled by 1.01") for what is its eps."""
    with pytest.raises(AssertionError) as info:
        assert_matches("bn", _BNWithEps(100.0, "inside_sqrt"), eps=1e-5, max_examples=20)
    assert FIRST + "eps value: found 100 (attribute eps = 100); refnorm: 1e-05 (the eps " \
        "compared under)." in str(info.value), str(info.value)


def test_running_statistics_of_a_bn_on_n_c_inputs_are_read():
    """A BN on (N, C) inputs (spatial=0): the running probes standardized the batches within
    each (n, c), one value each, and read NaN weights ("weights nan then nan")."""
    report = fingerprint("bn", NumpyBN(4), spatial=0)
    got = {k: report.conventions[k] for k in ("running", "momentum_new_weight", "running_var",
                                              "inference")}
    assert got == {"running": "exponential", "momentum_new_weight": 0.1,
                   "running_var": "unbiased", "inference": "running"}, str(report)
    assert report.match is not None, str(report)
    biased = fingerprint("bn", NumpyBN(4, running_biased=True), spatial=0)
    assert biased.conventions["running_var"] == "biased", str(biased)


@pytest.mark.parametrize("G", [5, 8])
def test_a_group_count_that_does_not_divide_12_is_probed_on_2g_channels(G):
    """A GN whose num_groups does not divide the default 12 channels was probed on 12
    (G = 5: its reshape failed; G = 8: groups straddled channels and it matched nothing)."""
    report = fingerprint("gn", NumpyGN(G))
    assert report.conventions["num_groups"] == G, str(report)
    assert report.match == f"refnorm.group_norm_forward(num_groups={G}, eps=1e-05)", str(report)


@pytest.mark.parametrize(("kw", "says"), [
    ({"spatial": 4}, r"spatial must be None or an int from 0 to 3; got 4"),
    ({"spatial": True}, r"spatial must be None or an int from 0 to 3; got True"),
    ({"num_channels": 0}, r"num_channels must be None or an int >= 1; got 0"),
    ({"num_channels": 2.5}, r"num_channels must be None or an int >= 1; got 2.5"),
    ({"seed": -1}, r"seed must be an int >= 0; got -1"),
    ({"seed": 1.5}, r"seed must be an int >= 0; got 1.5"),
    ({"seed": True}, r"seed must be an int >= 0; got True"),
])
def test_probe_sizes_fingerprint_cannot_use_are_refused_by_name(kw, says):
    """spatial = 4 was a KeyError, True and 1.0 were one spatial axis, num_channels = 0 was
    the default 4 and 2.5 a numpy TypeError; seed = -1 and 1.5 were numpy's errors naming no
    argument, and True was seed 1."""
    with pytest.raises(ValueError, match=says):
        fingerprint("bn", numpy_bn_forward, **kw)


def test_assert_matches_refuses_zero_channels():
    """num_channels = 0 was read as "not given" and inputs were drawn with any C."""
    with pytest.raises(ValueError, match=r"num_channels must be None or an int >= 1; got 0"):
        assert_matches("bn", numpy_bn_forward, num_channels=0)
