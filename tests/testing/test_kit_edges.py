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
from tests.testing.impls import NumpyBN, NumpyGN, numpy_bn_forward

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
