"""Bad input gets a clear error naming the argument, what was expected and what came."""

from __future__ import annotations

import numpy as np
import pytest

import refnorm
from tests.norms.cases import METHODS


def options_for(method):
    return {"num_groups": 1} if method.name == "gn" else {}


def good_args(C=4):
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, C, 3, 3)), np.ones(C), np.zeros(C)


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("shape", [(), (5,)])
def test_too_few_dimensions(method, shape):
    x = np.ones(shape)
    with pytest.raises(ValueError, match=r"x must have layout \(N, C, \*spatial\).*got shape"):
        method.forward(x, np.ones(1), np.zeros(1), eps=1e-5, **options_for(method))


def test_instance_norm_needs_a_spatial_axis():
    with pytest.raises(ValueError,
                       match=r"x must have layout .*spatial axis.*at least 3.*\(4, 3\)"):
        refnorm.instance_norm_forward(np.ones((4, 3)), np.ones(3), np.zeros(3))


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_instance_norm_with_running_statistics_needs_a_spatial_axis_too(path):
    # With running statistics an (N, C) input could be computed, but it is no instance: the
    # eval forward refuses it as the training forward does.
    with pytest.raises(ValueError,
                       match=r"x must have layout .*spatial axis.*at least 3.*\(4, 3\)"):
        refnorm.instance_norm_eval_forward(np.ones((4, 3)), np.ones(3), np.zeros(3),
                                           np.zeros(3), np.ones(3), path=path)


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("which", ["gamma", "beta"])
@pytest.mark.parametrize("bad_shape", [(3,), (5,), (1, 4), ()])
def test_parameter_shape_must_match_channels(method, which, bad_shape):
    x, gamma, beta = good_args(C=4)
    args = {"gamma": gamma, "beta": beta, which: np.ones(bad_shape)}
    with pytest.raises(ValueError, match=rf"{which} must have shape \(C,\) = \(4,\).*got shape"):
        method.forward(x, args["gamma"], args["beta"], eps=1e-5, **options_for(method))


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.complex128])
def test_non_float_input_is_a_type_error(method, dtype):
    x, gamma, beta = good_args()
    with pytest.raises(TypeError, match=r"x must have a real floating-point dtype; got"):
        method.forward(x.astype(dtype), gamma, beta, eps=1e-5, **options_for(method))


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_non_float_parameter_is_a_type_error(method):
    x, gamma, beta = good_args()
    with pytest.raises(TypeError, match=r"gamma must have a real floating-point dtype; got int"):
        method.forward(x, gamma.astype(np.int64), beta, eps=1e-5, **options_for(method))


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_non_array_input_is_a_type_error(method):
    _, gamma, beta = good_args()
    with pytest.raises(TypeError, match=r"x must be an array; got list"):
        method.forward([[1.0, 2.0]], gamma, beta, eps=1e-5, **options_for(method))


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("eps", [0.0, -1e-5, float("nan"), float("inf")])
def test_eps_must_be_positive_and_finite(method, eps):
    x, gamma, beta = good_args()
    with pytest.raises(ValueError, match=r"eps must be finite and > 0; got"):
        method.forward(x, gamma, beta, eps=eps, **options_for(method))


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("eps", ["1e-5", True, None])
def test_eps_must_be_a_number(method, eps):
    x, gamma, beta = good_args()
    with pytest.raises(TypeError, match=r"eps must be a float; got"):
        method.forward(x, gamma, beta, eps=eps, **options_for(method))


@pytest.mark.parametrize("name", ["batch_norm", "instance_norm", "layer_norm", "group_norm"])
def test_fast_path_refuses_eps_true_after_accepting_eps_1(name):
    # True == 1 and hash(True) == hash(1): the fast path's once-per-signature check must
    # still tell them apart.
    forward = getattr(refnorm, f"{name}_forward")
    options = {"num_groups": 2} if name == "group_norm" else {}
    x, gamma, beta = good_args()
    forward(x, gamma, beta, eps=1, path="fast", **options)
    with pytest.raises(TypeError, match=r"eps must be a float; got bool"):
        forward(x, gamma, beta, eps=True, path="fast", **options)


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("groups", [3, 0, -2, 5])
def test_groups_must_divide_channels(groups, path):
    x, gamma, beta = good_args(C=4)
    with pytest.raises(ValueError, match=rf"num_groups must be a positive divisor .*C=4"
                                         rf".*got num_groups={groups}"):
        refnorm.group_norm_forward(x, gamma, beta, num_groups=groups, path=path)


def test_groups_must_be_an_int():
    x, gamma, beta = good_args(C=4)
    with pytest.raises(TypeError, match=r"num_groups must be an int; got float"):
        refnorm.group_norm_forward(x, gamma, beta, num_groups=2.0)


def test_group_norm_layer_checks_groups_at_construction():
    with pytest.raises(ValueError, match=r"C=16; got num_groups=32"):
        refnorm.GroupNorm(16)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1), (1, 3, 1)])
def test_batch_norm_training_with_a_single_value_per_channel(shape):
    C = shape[1]
    with pytest.raises(ValueError, match=r"batch normalization in training needs more than "
                                         r"1 value per statistic.*gives 1"):
        refnorm.batch_norm_forward(np.ones(shape), np.ones(C), np.zeros(C))
    with pytest.raises(ValueError, match=r"batch normalization in training"):
        refnorm.batch_norm_forward_graph(np.ones(shape), np.ones(C), np.zeros(C))


def test_batch_norm_eval_accepts_a_single_sample():
    y, _ = refnorm.batch_norm_eval_forward(np.full((1, 3), 2.0), np.ones(3), np.zeros(3),
                                           np.full(3, 1.0), np.full(3, 4.0), eps=1e-5)
    np.testing.assert_allclose(y, (2.0 - 1.0) / np.sqrt(4.0 + 1e-5))


@pytest.mark.parametrize(
    ("forward", "shape", "what"),
    [
        (refnorm.instance_norm_forward, (4, 3, 1, 1), "instance normalization"),
        (refnorm.layer_norm_forward, (4, 1, 1, 1), "layer normalization"),
        (refnorm.layer_norm_forward, (4, 1), "layer normalization"),
    ],
)
def test_single_value_statistics_are_refused(forward, shape, what):
    C = shape[1]
    with pytest.raises(ValueError, match=rf"{what} needs more than 1 value per statistic"):
        forward(np.ones(shape), np.ones(C), np.zeros(C))


def test_group_norm_single_value_groups_are_refused():
    with pytest.raises(ValueError, match=r"group normalization needs more than 1 value"):
        refnorm.group_norm_forward(np.ones((2, 4)), np.ones(4), np.zeros(4), num_groups=4)


def test_running_statistics_are_checked():
    x, gamma, beta = good_args(C=4)
    with pytest.raises(ValueError, match=r"running_mean must have shape \(C,\) = \(4,\).*; "
                                         r"got shape \(3,\)"):
        refnorm.batch_norm_eval_forward(x, gamma, beta, np.zeros(3), np.ones(4))
    with pytest.raises(ValueError, match=r"running_var must have shape \(C,\) = \(4,\).*; "
                                         r"got shape \(5,\)"):
        refnorm.batch_norm_eval_forward(x, gamma, beta, np.zeros(4), np.ones(5))
    with pytest.raises(ValueError, match=r"running_var must be >= 0 everywhere"):
        refnorm.batch_norm_eval_forward(x, gamma, beta, np.zeros(4), -np.ones(4))


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_backward_checks_dy_and_cache(method, path):
    x, gamma, beta = good_args()
    _, cache = method.forward(x, gamma, beta, eps=1e-5, path=path, **options_for(method))
    with pytest.raises(ValueError, match=r"dy must have shape \(2, 4, 3, 3\); got \(2, 4, 3\)"):
        method.backward(np.ones((2, 4, 3)), cache, path=path)
    with pytest.raises(TypeError, match=r"dy must have a real floating-point dtype"):
        method.backward(np.ones((2, 4, 3, 3), dtype=np.int64), cache, path=path)
    other = METHODS[(METHODS.index(method) + 1) % len(METHODS)]
    _, other_cache = other.forward(x, gamma, beta, eps=1e-5, path=path, **options_for(other))
    with pytest.raises(TypeError, match=r"cache must be an? \w+Cache; got \w+Cache"):
        method.backward(np.ones_like(x), other_cache, path=path)


def test_mixed_namespaces_are_refused():
    strict = pytest.importorskip("array_api_strict")
    x, gamma, beta = good_args()
    with pytest.raises(TypeError, match=r"one array namespace"):
        refnorm.batch_norm_forward(strict.asarray(x), gamma, beta)


@pytest.mark.parametrize("momentum", [0.0, -0.1, 1.5])
def test_momentum_range(momentum):
    with pytest.raises(ValueError, match=r"momentum must be in \(0, 1\]; got"):
        refnorm.BatchNorm(4, momentum=momentum)


@pytest.mark.parametrize(("num_channels", "error"),
                         [(0, ValueError), (2.0, TypeError), (True, TypeError)])
def test_layer_channel_count(num_channels, error):
    with pytest.raises(error, match=r"num_channels must be"):
        refnorm.LayerNorm(num_channels)


def test_layer_training_flag_must_be_bool():
    layer = refnorm.BatchNorm(4)
    with pytest.raises(TypeError, match=r"training must be a bool; got str"):
        layer.forward(np.ones((2, 4), np.float32), "yes")


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("method", ["bn", "in", "sn"])
@pytest.mark.parametrize("bad", [[1.0, 2.0, -1e-3, 1.0], [-1e-3]], ids=["one of four", "the only"])
def test_one_negative_running_variance_is_refused_by_every_eval_forward(bad, method, path):
    # A running variance below 0 gives 1 / sqrt(var + eps) = NaN for its channel, or a huge
    # scale where var + eps is a tiny positive number: refused, whichever entry it is.
    C = len(bad)
    x, gamma, beta = good_args(C=C)
    stats = (np.zeros(C), np.array(bad))
    with pytest.raises(ValueError, match=r"running_var must be >= 0 everywhere"):
        if method == "bn":
            refnorm.batch_norm_eval_forward(x, gamma, beta, *stats, path=path)
        elif method == "in":
            refnorm.instance_norm_eval_forward(x, gamma, beta, *stats, path=path)
        else:
            refnorm.switchable_norm_eval_forward(x, gamma, beta, np.zeros(3), np.zeros(3),
                                                 *stats, path=path)


@pytest.mark.parametrize("bad", [[1.0, 2.0, -1e-3, 1.0], [-1e-3]], ids=["one of four", "the only"])
def test_set_population_refuses_one_negative_variance_as_a_value_error(bad):
    C = len(bad)
    layer = refnorm.build("sn", C, inference="batch_average", dtype=np.float64)
    with pytest.raises(ValueError, match=r"var must be >= 0 everywhere"):
        layer.set_population(np.zeros(C), np.array(bad))
    assert not bool(layer.state["population_ready"])
