"""The activation normalizers' layers (ChannelNorm, refnorm/norms/base.py): the same interface
and checks for every registered normalizer."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import refnorm
from refnorm.gradcheck import check_layer, check_registered
from refnorm.sync import SingleProcess

NAMES = ["bn", "in", "ln", "gn"]


def build(name, C=4, **kw):
    options = {"num_groups": 2} if name == "gn" else {}
    return refnorm.build(name, C, **options, **kw)


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("name", NAMES)
def test_layer_matches_its_pure_functions(name, path):
    forward = {"bn": refnorm.batch_norm_forward, "in": refnorm.instance_norm_forward,
               "ln": refnorm.layer_norm_forward, "gn": refnorm.group_norm_forward}[name]
    backward = {"bn": refnorm.batch_norm_backward, "in": refnorm.instance_norm_backward,
                "ln": refnorm.layer_norm_backward, "gn": refnorm.group_norm_backward}[name]
    rng = np.random.default_rng(0)
    layer = build(name, dtype=np.float64)
    layer.path = path
    layer.params = {"gamma": rng.standard_normal(4), "beta": rng.standard_normal(4)}
    x, dy = rng.standard_normal((3, 4, 2, 2)), rng.standard_normal((3, 4, 2, 2))
    options = {"num_groups": 2} if name == "gn" else {}
    y_ref, cache = forward(x, layer.params["gamma"], layer.params["beta"], **options, path=path)
    dx_ref, dgamma_ref, dbeta_ref = backward(dy, cache, path=path)
    np.testing.assert_array_equal(layer.forward(x, training=True), y_ref)
    np.testing.assert_array_equal(layer.backward(dy), dx_ref)
    assert set(layer.grads) == set(layer.params) == {"gamma", "beta"}
    np.testing.assert_array_equal(layer.grads["gamma"], dgamma_ref)
    np.testing.assert_array_equal(layer.grads["beta"], dbeta_ref)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_start_at_identity_in_the_requested_dtype(name):
    layer = build(name)
    assert layer.params["gamma"].dtype == np.float32  # the default
    np.testing.assert_array_equal(layer.params["gamma"], np.ones(4))
    np.testing.assert_array_equal(layer.params["beta"], np.zeros(4))
    assert build(name, dtype=np.float64).params["beta"].dtype == np.float64


@pytest.mark.parametrize("name", NAMES)
def test_backward_before_forward_is_an_error(name):
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        build(name).backward(np.ones((2, 4, 2, 2), np.float32))


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_is_independent(name):
    layer = build(name, dtype=np.float64)
    twin = copy.deepcopy(layer)
    twin.params["gamma"][0] = 5.0
    assert layer.params["gamma"][0] == 1.0
    assert twin.xp is layer.xp


@pytest.mark.parametrize("name", NAMES)
def test_layers_run_on_array_api_strict(name):
    strict = pytest.importorskip("array_api_strict")
    layer = build(name, dtype=strict.float64, xp=strict)
    x = strict.asarray(np.random.default_rng(0).standard_normal((3, 4, 2, 2)))
    y = layer.forward(x, training=True)
    dx = layer.backward(x)
    assert type(y) is type(x) and type(dx) is type(x)
    assert type(layer.grads["gamma"]) is type(x)
    errors = check_layer(layer, x, training=True)
    assert max(e.max_rel_error for e in errors.values()) < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_every_check_case_passes(name):
    results = check_registered(name)
    assert results, "each registered layer declares check cases"
    for result in results:
        assert set(result.errors) == {"x", "gamma", "beta"}
        for grad, err in result.errors.items():
            assert err.max_rel_error < 1e-6, (result, grad)


def test_the_fast_cache_keeps_its_own_gamma():
    from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward

    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma = rng.standard_normal(3).astype(np.float32)
    beta = np.zeros(3, np.float32)
    _, ref_cache = batch_norm_forward(x, gamma.copy(), beta, path="fast")
    want = batch_norm_backward(dy, ref_cache, path="fast")
    _, cache = batch_norm_forward(x, gamma, beta, path="fast")
    gamma *= 2  # an in-place update between forward and backward
    got = batch_norm_backward(dy, cache, path="fast")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(("groups", "rstd_size"), [(0, 2), (3, 6)])
def test_fast_backward_args_refuses_groups_that_do_not_divide_the_channels(groups, rstd_size):
    """0 groups, and 3 groups of 4 channels, are refused by name (each case its own name, so
    that the once-per-signature check runs for both)."""
    from refnorm.norms.base import fast_backward_args

    x_hat = np.zeros((2, 4, 3), np.float32)
    with pytest.raises(ValueError, match=rf"num_groups \({groups}\) must divide its 4 channels"):
        fast_backward_args(f"groups_{groups}_backward_probe", x_hat.copy(), x_hat,
                           np.ones(rstd_size, np.float32), np.ones(4, np.float32),
                           per_sample=True, groups=groups)


@pytest.mark.parametrize("size", [1, 3])
def test_fast_backward_args_refuses_an_rstd_of_another_size(size):
    # The forward makes one rstd per channel for BN: 2 here; fewer or more would be read
    # out of place by the kernels.
    from refnorm.norms.base import fast_backward_args

    x_hat = np.zeros((4, 2, 3), np.float32)
    with pytest.raises(ValueError, match=rf"rstd must hold 2 values .*got shape \({size},\)"):
        fast_backward_args(f"rstd_{size}_backward_probe", x_hat.copy(), x_hat,
                           np.ones(size, np.float32), np.ones(2, np.float32),
                           per_sample=False)


def test_frozen_statistics_accept_a_zero_running_variance():
    from refnorm.norms.base import frozen_statistics

    like = np.zeros((2, 3, 4), np.float32)
    mu, var = frozen_statistics(np.ones(3), np.zeros(3), like=like)
    assert mu.shape == var.shape == (1, 3, 1) and var.dtype == np.float32
    np.testing.assert_array_equal(var.ravel(), 0)
    with pytest.raises(ValueError, match="running_var must be >= 0"):
        frozen_statistics(np.ones(3), np.array([0.0, -1.0, 0.0]), like=like)


@pytest.mark.parametrize("name", NAMES)
def test_a_two_dimensional_input_of_other_channels_is_refused_in_the_layers_terms(name):
    # (N, C) inputs (a BN or LN after a linear layer) are checked against the layer's channel
    # count as (N, C, H, W) ones are: the error names the layer, not its gamma.
    layer = build(name, dtype=np.float64)
    with pytest.raises(ValueError, match=r"was built for 4 channels; x of shape \(8, 5\) has 5 "
                                         r"on its channel axis \(axis 1\)"):
        layer.forward(np.ones((8, 5)), training=True)


def test_frozen_statistics_come_in_the_inputs_compute_dtype():
    # float64 running statistics (a checkpoint kept in float64) for a float32 input: both
    # statistics are viewed in float32, so inference computes in the input's compute dtype
    # (the eval forward's cache holds float32 throughout).
    from refnorm.norms.base import frozen_statistics

    like = np.zeros((2, 3, 4), np.float32)
    mu, var = frozen_statistics(np.array([0.5, -1.0, 2.0]), np.array([1.0, 2.0, 3.0]), like=like)
    assert mu.dtype == var.dtype == np.float32
    x = np.random.default_rng(40).standard_normal((2, 3, 4)).astype(np.float32)
    _, cache = refnorm.batch_norm_eval_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32),
                                               np.array([0.5, -1.0, 2.0]),
                                               np.array([1.0, 2.0, 3.0]))
    assert cache.x_hat.dtype == cache.mean.dtype == cache.var.dtype == np.float32


def _sn_forward(x, gamma, beta, **kw):
    return refnorm.switchable_norm_forward(x, gamma, beta, np.zeros(3), np.zeros(3), **kw)


DEFAULT_EPS_FORWARDS = {
    "bn": refnorm.batch_norm_forward,
    "in": refnorm.instance_norm_forward,
    "ln": refnorm.layer_norm_forward,
    "gn": lambda x, gamma, beta, **kw: refnorm.group_norm_forward(x, gamma, beta,
                                                                  num_groups=2, **kw),
    "sn": _sn_forward,
}


@pytest.mark.parametrize("name", sorted(DEFAULT_EPS_FORWARDS))
def test_the_default_eps_is_pytorchs_1e_5_for_functions_and_layers(name):
    """docs/conventions.md, "At a glance": default eps 1e-5. On data whose variance (~1e-5)
    is of the size of eps, another default would move every output."""
    forward = DEFAULT_EPS_FORWARDS[name]
    x = 3e-3 * np.random.default_rng(0).standard_normal((4, 4, 3, 3))
    gamma, beta = np.ones(4), np.zeros(4)
    y = forward(x, gamma, beta)[0]
    np.testing.assert_array_equal(y, forward(x, gamma, beta, eps=1e-5)[0])
    assert np.max(np.abs(y - forward(x, gamma, beta, eps=2e-5)[0])) > 0.05
    options = {"num_groups": 2} if name == "gn" else {}
    layer = refnorm.build(name, 4, dtype=np.float64, **options)
    np.testing.assert_array_equal(layer.forward(x, training=True), y)


@pytest.mark.parametrize(("name", "options"), [("bn", {}), ("in", {"track_running_stats": True}),
                                               ("sn", {}), ("syncbn", {"comm": SingleProcess()})])
def test_running_statistics_default_to_momentum_0_1_on_the_new_batch_from_0_and_1(name, options):
    """docs/conventions.md, "Running statistics": momentum 0.1 is the weight of the new batch,
    running_mean starts at 0 and running_var at 1, updated with the unbiased variance."""
    rng = np.random.default_rng(1)
    x = 3 * rng.standard_normal((4, 2, 3, 3)) + 5
    layer = refnorm.build(name, 2, dtype=np.float64, **options)
    np.testing.assert_array_equal(layer.state["running_mean"], np.zeros(2))
    np.testing.assert_array_equal(layer.state["running_var"], np.ones(2))
    layer.forward(x, training=True)
    if name == "in":  # the per-instance statistics, averaged over the batch (as PyTorch)
        mean = x.mean(axis=(2, 3)).mean(axis=0)
        var = x.reshape(4, 2, 9).var(axis=2, ddof=1).mean(axis=0)
    else:
        mean = x.mean(axis=(0, 2, 3))
        var = x.transpose(1, 0, 2, 3).reshape(2, -1).var(axis=1, ddof=1)
    np.testing.assert_allclose(layer.state["running_mean"], 0.1 * mean, rtol=1e-13)
    np.testing.assert_allclose(layer.state["running_var"], 0.9 + 0.1 * var, rtol=1e-13)


@pytest.mark.parametrize("name, options", [("bn", {}), ("in", {"track_running_stats": True}),
                                           ("sn", {"scopes": ("bn",)})],
                         ids=["bn", "in", "sn"])
def test_inference_normalizes_with_the_layers_own_eps(name, options):
    # Fresh running statistics (mean 0, variance 1) normalize by 1 / sqrt(1 + eps): with
    # eps = 0.5 the eval output is x / sqrt(1.5) (SN with its BN scope alone), not
    # x / sqrt(1 + 1e-5) with the functions' default eps.
    layer = refnorm.build(name, 3, eps=0.5, dtype=np.float64, **options)
    x = 5 * np.random.default_rng(6).standard_normal((4, 3, 2, 2)) + 12
    y = layer.forward(x, training=False)
    np.testing.assert_allclose(y, x / np.sqrt(1.5), rtol=1e-12)
