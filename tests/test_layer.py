"""The layer interface every refnorm layer shares (refnorm/layer.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import refnorm
from refnorm import registry
from refnorm.gradcheck import _random_state
from refnorm.layer import from_functions, iter_layers
from refnorm.nn import AvgPool2d, GlobalAvgPool, MaxPool2d, ReLU


def _cases():
    for name in registry.names():
        for i, case in enumerate(registry.layer_class(name).check_cases):
            yield pytest.param(name, case, id=f"{name}-{i}")


def _build(name, case):
    layer = refnorm.build(name, case.shape[1], dtype=np.float64, **case.options)
    rng = np.random.default_rng(0)
    layer.params = {k: rng.standard_normal(v.shape) * 0.5 + 1.0 for k, v in layer.params.items()}
    if layer.state:
        layer.state = _random_state(layer.state, rng)
    return layer


def _backward_after(layer, x, dy, training, mutate):
    layer = copy.deepcopy(layer)
    x = x.copy()
    layer.forward(x, training=training)
    mutate(layer, x)
    dx = layer.backward(dy)
    return dx, {k: np.array(v) for k, v in layer.grads.items()}


def _mutate_input(layer, x):
    x += 1.0 + np.abs(x)  # in place, in every element


def _mutate_params(layer, x):
    for p in layer.params.values():
        p *= -3.0         # in place, as an optimizer's update would be


def _nothing(layer, x):
    pass


@pytest.mark.parametrize(("name", "case"), list(_cases()))
@pytest.mark.parametrize("mutate", [_mutate_input, _mutate_params], ids=["x", "params"])
def test_backward_ignores_in_place_changes_made_after_forward(name, case, mutate):
    """A cache holds refnorm-owned arrays: changing the caller's x (or the layer's parameter
    arrays) in place between forward and backward leaves dx and every gradient unchanged."""
    layer = _build(name, case)
    rng = np.random.default_rng(1)
    x = 5 * rng.standard_normal(case.shape) + 2
    y = layer.forward(x.copy(), training=case.training)
    dy = rng.standard_normal(y.shape)
    dx_ref, grads_ref = _backward_after(layer, x, dy, case.training, _nothing)
    dx, grads = _backward_after(layer, x, dy, case.training, mutate)
    np.testing.assert_array_equal(dx, dx_ref)
    for k in grads_ref:
        np.testing.assert_array_equal(grads[k], grads_ref[k], err_msg=k)


@pytest.mark.parametrize("layer", [ReLU(), MaxPool2d(2), AvgPool2d(2), GlobalAvgPool()],
                         ids=["relu", "maxpool", "avgpool", "globalavgpool"])
def test_parameter_free_layers_ignore_in_place_changes_of_x(layer):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4, 4))
    dy = rng.standard_normal(layer.forward(x.copy(), training=True).shape)
    dx_ref, _ = _backward_after(layer, x, dy, True, _nothing)
    dx, _ = _backward_after(layer, x, dy, True, _mutate_input)
    np.testing.assert_array_equal(dx, dx_ref)


def test_reset_drops_the_cache():
    layer = refnorm.build("bn", 3)
    layer.forward(np.ones((4, 3), np.float32) * np.arange(4, dtype=np.float32)[:, None],
                  training=True)
    layer.reset()
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        layer.backward(np.ones((4, 3), np.float32))


def test_numpy_bool_is_accepted_for_training():
    layer = refnorm.build("bn", 3, dtype=np.float64)
    x = np.random.default_rng(3).standard_normal((4, 3))
    y_np = layer.forward(x, training=np.bool_(True))
    y = refnorm.build("bn", 3, dtype=np.float64).forward(x, training=True)
    np.testing.assert_array_equal(y_np, y)
    with pytest.raises(TypeError, match="training must be a bool; got int"):
        layer.forward(x, training=1)


def test_iter_layers_walks_lists_and_models_in_order():
    a, b, c = refnorm.build("bn", 2), refnorm.build("sn", 2), refnorm.build("ln", 2)

    class Model:
        def layers(self):
            return [b, [c]]

    assert list(iter_layers([a, Model()])) == [a, b, c]


# -- from_functions -------------------------------------------------------------------------------


def _bn_pair(momentum=0.1, eps=1e-5):
    """BN with running statistics, from refnorm's pure functions, in from_functions's terms."""
    from refnorm.norms.batch_norm import (
        batch_norm_backward,
        batch_norm_eval_forward,
        batch_norm_forward,
    )

    def forward(x, gamma, beta, running_mean, running_var, training):
        if not training:
            y, cache = batch_norm_eval_forward(x, gamma, beta, running_mean, running_var,
                                               eps=eps)
            return y, cache, {"running_mean": running_mean, "running_var": running_var}
        y, cache = batch_norm_forward(x, gamma, beta, eps=eps)
        m = x.size // x.shape[1]
        state = {"running_mean": (1 - momentum) * running_mean + momentum * cache.mean.ravel(),
                 "running_var": (1 - momentum) * running_var
                 + momentum * cache.var.ravel() * m / (m - 1)}
        return y, cache, state

    return forward, batch_norm_backward


def _bn_from_functions(c, rng):
    forward, backward = _bn_pair()
    params = {"gamma": 1 + 0.3 * rng.standard_normal(c), "beta": 0.3 * rng.standard_normal(c)}
    state = {"running_mean": np.zeros(c), "running_var": np.ones(c)}
    return from_functions(forward, backward, params=params, state=state, name="my_bn"), params


def test_from_functions_behaves_as_the_layer_it_is_made_of():
    rng = np.random.default_rng(0)
    layer, params = _bn_from_functions(3, rng)
    bn = refnorm.build("bn", 3, dtype=np.float64)
    bn.params = {k: v.copy() for k, v in params.items()}
    assert layer.params["gamma"] is not params["gamma"]  # the layer keeps copies
    for step in range(3):
        x = 5 * rng.standard_normal((4, 3, 2, 2)) + 12
        dy = rng.standard_normal(x.shape)
        training = step < 2
        np.testing.assert_allclose(layer.forward(x, training), bn.forward(x, training),
                                   rtol=1e-12, atol=1e-12)
        for key in bn.state:
            np.testing.assert_allclose(layer.state[key], bn.state[key], rtol=1e-12)
        np.testing.assert_allclose(layer.backward(dy), bn.backward(dy), rtol=1e-10,
                                   atol=1e-12)
        assert set(layer.grads) == {"gamma", "beta"}
        for key in bn.grads:
            np.testing.assert_allclose(layer.grads[key], bn.grads[key], rtol=1e-10)
    assert "FunctionLayer(my_bn: gamma=(3,), beta=(3,))" == repr(layer)


def test_from_functions_gradchecks_in_both_modes():
    from refnorm.gradcheck import check_layer

    rng = np.random.default_rng(1)
    layer, _ = _bn_from_functions(2, rng)
    layer.state = {"running_mean": 12 + rng.standard_normal(2),
                   "running_var": 25 * rng.uniform(0.5, 1.5, 2)}
    for training in (True, False):
        errors = check_layer(layer, 5 * rng.standard_normal((3, 2, 2, 2)) + 12,
                             training=training)
        assert set(errors) == {"x", "gamma", "beta"}
        assert max(e.max_rel_error for e in errors.values()) < 1e-6, errors


def test_from_functions_deep_copies_and_keeps_its_functions():
    layer, _ = _bn_from_functions(2, np.random.default_rng(2))
    clone = copy.deepcopy(layer)
    assert clone.forward_function is layer.forward_function
    assert clone.params["gamma"] is not layer.params["gamma"]


def test_from_functions_takes_the_namespace_and_device_of_its_arrays():
    """Built from arrays on array_api_strict's second device, the layer says so, keeps its
    copies there and trains there (a device it took from nowhere would be the first)."""
    xp = pytest.importorskip("array_api_strict")
    device = xp.Device("device1")
    from refnorm.norms.batch_norm import batch_norm_backward, batch_norm_forward

    def forward(x, gamma, beta, training):
        return batch_norm_forward(x, gamma, beta)

    params = {"gamma": xp.ones(2, device=device), "beta": xp.zeros(2, device=device)}
    layer = from_functions(forward, batch_norm_backward, params=params)
    assert layer.xp is xp and layer.device == device
    assert all(a.device == device for a in layer.params.values())
    x = xp.asarray(np.random.default_rng(3).standard_normal((4, 2, 2, 2)), device=device)
    y = layer.forward(x, True)
    assert y.device == device and layer.backward(xp.ones_like(y)).device == device


def _identity_pair():
    def forward(x, w, training):
        return x * w, x

    def backward(dy, x):
        return dy, dy * x

    return forward, backward


@pytest.mark.parametrize(("forward", "backward", "message"), [
    (lambda x, w, training: x, None, "must return \\(y, cache\\) for a layer without state"),
    (None, lambda dy, x: dy, r"must return \(dx, dw\); it returned ndarray"),
    (None, lambda dy, x: (dy, dy), r"returned dw of shape \(2, 3\); w has shape \(3,\)"),
    (None, lambda dy, x: (dy[:1], (dy * x).sum(axis=0)), r"returned dx of shape \(1, 3\); "
                                                         r"x has shape \(2, 3\)"),
])
def test_from_functions_refuses_what_breaks_the_contract(forward, backward, message):
    good_forward, good_backward = _identity_pair()
    layer = from_functions(forward or good_forward, backward or good_backward,
                           params={"w": np.ones(3)})
    x = np.arange(6.0).reshape(2, 3)
    with pytest.raises(ValueError, match=message):
        layer.forward(x, True)
        layer.backward(np.ones((2, 3)))


def test_from_functions_checks_the_state_it_is_handed_back():
    def forward(x, scale, training):
        return x, None, {"scale": np.ones(4)}

    layer = from_functions(forward, lambda dy, c: (dy,), params={}, state={"scale": np.ones(3)})
    with pytest.raises(ValueError, match=r"returned state 'scale' of shape \(4,\); it has "
                                         r"shape \(3,\)"):
        layer.forward(np.ones((2, 3)), True)
    bad_keys = from_functions(lambda x, scale, training: (x, None, {"other": scale}),
                              lambda dy, c: (dy,), params={}, state={"scale": np.ones(3)})
    with pytest.raises(ValueError, match=r"as a dict with the keys \['scale'\]"):
        bad_keys.forward(np.ones((2, 3)), True)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"forward": 1}, TypeError, "forward must be a function; got int"),
    ({"params": [np.ones(2)]}, TypeError, "params must be a dict of str to array; got list"),
    ({"state": {"w": np.ones(2)}}, ValueError, r"both have \['w'\]"),
])
def test_from_functions_refuses_bad_arguments(kwargs, error, message):
    forward, backward = _identity_pair()
    args = {"forward": forward, "backward": backward, "params": {"w": np.ones(2)}, **kwargs}
    with pytest.raises(error, match=message):
        from_functions(args.pop("forward"), args.pop("backward"), **args)


def test_deepcopy_of_a_synchronized_layer_keeps_its_communicator():
    """A copy of a device's layer must still talk to the other devices: its comm is shared,
    not copied (Layer.shared_attributes)."""
    from refnorm.sync.batch_norm import SyncBatchNorm
    from refnorm.sync.comm import SingleProcess
    from refnorm.sync.switchable import SyncSwitchableNorm

    for cls in (SyncBatchNorm, SyncSwitchableNorm):
        comm = SingleProcess()
        layer = cls(4, comm=comm)
        twin = copy.deepcopy(layer)
        assert twin.comm is comm
        assert twin.params["gamma"] is not layer.params["gamma"]


def test_a_forward_that_raises_leaves_no_cache_for_backward():
    """The cache of an earlier forward is dropped when a later forward raises."""
    layer = refnorm.build("bn", 3, dtype=np.float64)
    x = np.random.default_rng(6).standard_normal((4, 3, 2, 2))
    layer.forward(x, training=True)
    with pytest.raises(ValueError):
        layer.forward(np.ones((4, 5, 2, 2)), training=True)   # wrong channel count
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        layer.backward(np.ones_like(x))


def test_backward_returns_none_without_input_grad_for_any_layer():
    """input_grad False: backward returns None (not only where the pure function skips dx, as
    conv's does), and the parameter gradients are those with input_grad True."""
    rng = np.random.default_rng(7)
    x, dy = rng.standard_normal((4, 3, 2, 2)), rng.standard_normal((4, 3, 2, 2))
    with_dx = refnorm.build("bn", 3, dtype=np.float64)
    without = refnorm.build("bn", 3, dtype=np.float64)
    without.input_grad = False
    with_dx.forward(x, training=True)
    without.forward(x, training=True)
    assert with_dx.backward(dy) is not None
    assert without.backward(dy) is None
    for key in with_dx.grads:
        np.testing.assert_array_equal(without.grads[key], with_dx.grads[key])


def test_from_functions_keeps_copies_of_its_state():
    """The state is copied like the parameters: a later in-place change of the caller's
    array does not reach the layer."""
    def forward(x, scale, offset, training):
        return x * scale + offset, scale, {"offset": offset}

    def backward(dy, scale):
        return dy * scale, dy.sum(axis=0)

    offset = np.zeros(3)
    layer = refnorm.layer.from_functions(forward, backward, params={"scale": np.ones(3)},
                                         state={"offset": offset})
    assert layer.state["offset"] is not offset
    offset += 5.0
    np.testing.assert_array_equal(layer.forward(np.ones((2, 3)), True), np.ones((2, 3)))


def test_iter_layers_walks_tuples_as_it_walks_lists():
    a, b, c = ReLU(), refnorm.build("bn", 2), ReLU()

    class Model:
        def layers(self):
            return (b, (c,))

    assert list(iter_layers((a, Model()))) == [a, b, c]
    assert list(iter_layers((a, [b, (c,)]))) == [a, b, c]


def test_from_functions_takes_the_dtype_of_its_first_parameter():
    """from_functions: "the first one's dtype [is] its dtype" (a float64 pair is not a float32
    layer)."""
    forward, backward = _identity_pair()
    for dtype in (np.float64, np.float32):
        layer = from_functions(forward, backward, params={"w": np.ones(3, dtype=dtype)})
        assert np.dtype(layer.dtype) == dtype


def test_from_functions_names_the_backward_that_broke_the_contract():
    """A backward's broken return names the backward function, not the forward (nor the
    layer's name)."""
    def scale_forward(x, w, training):
        return x * w, x

    def scale_backward(dy, x):
        return (dy,)  # one value short: no dw

    def scale_backward_bad_shape(dy, x):
        return dy, dy  # dw of x's shape

    x = np.ones((2, 3))
    short = from_functions(scale_forward, scale_backward, params={"w": np.ones(3)})
    short.forward(x, True)
    with pytest.raises(ValueError, match=r"^scale_backward must return \(dx, dw\); it "
                                         r"returned a tuple of 1$"):
        short.backward(np.ones((2, 3)))
    wrong = from_functions(scale_forward, scale_backward_bad_shape, params={"w": np.ones(3)},
                           name="my_scale")
    wrong.forward(x, True)
    with pytest.raises(ValueError, match=r"^scale_backward_bad_shape returned dw of shape "
                                         r"\(2, 3\); w has shape \(3,\)$"):
        wrong.backward(np.ones((2, 3)))


def test_from_functions_checks_dx_against_the_input_not_the_output():
    """A layer whose output has another shape than its input (a sum over channels): dx must
    have the shape of x, and a dx of y's shape is refused."""
    def forward(x, w, training):
        return (x * w).sum(axis=1), x  # (N, C) -> (N,)

    def backward(dy, x):
        return dy[:, None] * np.ones_like(x), (dy[:, None] * x).sum(axis=0)

    layer = from_functions(forward, backward, params={"w": np.ones(3)})
    x = np.arange(6.0).reshape(2, 3)
    dy = np.array([1.0, -2.0])
    layer.forward(x, True)
    np.testing.assert_array_equal(layer.backward(dy), [[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    np.testing.assert_array_equal(layer.grads["w"], [0 - 6.0, 1 - 8.0, 2 - 10.0])
    wrong = from_functions(forward, lambda dy, x: (dy, (dy[:, None] * x).sum(axis=0)),
                           params={"w": np.ones(3)})
    wrong.forward(x, True)
    with pytest.raises(ValueError, match=r"returned dx of shape \(2,\); x has shape \(2, 3\)"):
        wrong.backward(dy)


@pytest.mark.parametrize("bad", [None, [1.0, 2.0, 3.0], 3.0])
def test_from_functions_refuses_a_gradient_or_state_that_is_not_an_array(bad):
    """A backward returning None (or a list, a number) for a parameter's gradient, or a
    forward handing back such a state, is told so in one sentence, not an AttributeError."""
    forward, backward = _identity_pair()
    layer = from_functions(forward, lambda dy, x: (dy, bad), params={"w": np.ones(3)})
    layer.forward(np.ones((2, 3)), True)
    with pytest.raises(TypeError, match=r"<lambda> returned dw as \w+; it must be an array "
                                        r"of shape \(3,\)"):
        layer.backward(np.ones((2, 3)))
    stateful = from_functions(lambda x, s, training: (x, None, {"s": bad}),
                              lambda dy, c: (dy,), params={}, state={"s": np.ones(3)})
    with pytest.raises(TypeError, match=r"returned state 's' as \w+; it must be an array"):
        stateful.forward(np.ones((2, 3)), True)


@pytest.mark.parametrize(("name", "case"), list(_cases()))
def test_backward_can_run_again_on_the_same_forward_and_is_linear_in_dy(name, case):
    """A backward keeps the forward's cache (only a new forward or reset() drops it), so two
    upstream gradients can be pulled back through one forward; the pullback is linear in dy:
    backward(dy1 + dy2) = backward(dy1) + backward(dy2), for dx and every parameter gradient."""
    layer = _build(name, case)
    rng = np.random.default_rng(8)
    x = 5 * rng.standard_normal(case.shape) + 12
    y = layer.forward(x, training=case.training)
    dy1, dy2 = rng.standard_normal(y.shape), rng.standard_normal(y.shape)
    dx1 = layer.backward(dy1)
    grads1 = {k: np.array(v) for k, v in layer.grads.items()}
    dx2 = layer.backward(dy2)
    grads2 = {k: np.array(v) for k, v in layer.grads.items()}
    dx12 = layer.backward(dy1 + dy2)
    np.testing.assert_allclose(dx12, dx1 + dx2, rtol=1e-9, atol=1e-9)
    assert set(layer.grads) == set(layer.params)
    for key, grad in layer.grads.items():
        np.testing.assert_allclose(grad, grads1[key] + grads2[key], rtol=1e-9, atol=1e-9)


def test_a_forward_refused_for_its_training_flag_leaves_no_cache_for_backward():
    """A forward that raises, whatever it raises on (here its ``training`` argument, checked
    first), drops the earlier forward's cache: a backward then refuses instead of pulling dy
    back through a forward of another input."""
    layer = refnorm.build("bn", 3, dtype=np.float64)
    x = np.random.default_rng(9).standard_normal((4, 3, 2, 2))
    layer.forward(x, training=True)
    with pytest.raises(TypeError, match="training must be a bool"):
        layer.forward(x + 1.0, training="yes")
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        layer.backward(np.ones_like(x))


def test_from_functions_refuses_arrays_on_two_devices():
    """Like arrays of two namespaces, arrays on two devices cannot make one layer: the layer
    would claim the first one's device and fail inside its first forward."""
    xp = pytest.importorskip("array_api_strict")
    forward, backward = _identity_pair()
    w = xp.ones(3, device=xp.Device("device1"))
    with pytest.raises(ValueError, match="params and state must all be on one device"):
        from_functions(forward, backward, params={"w": w, "v": xp.ones(3)})
    with pytest.raises(ValueError, match="params and state must all be on one device"):
        from_functions(forward, backward, params={"w": w}, state={"s": xp.zeros(3)})
    layer = from_functions(forward, backward, params={"w": w},
                           state={"s": xp.zeros(3, device=xp.Device("device1"))})
    assert layer.device == xp.Device("device1")
