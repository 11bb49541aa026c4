"""The nn layers across modules: registry, gradcheck, equality with the pure functions,
array_api_strict parameters, constructor errors, and a small network end to end.
(He initialization is tested in test_init.py, the constructor checks in
tests/core/test_checks.py.)"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import refnorm.nn as nn
from refnorm import registry
from refnorm.backend import to_numpy
from refnorm.cli import main
from refnorm.gradcheck import check_layer, check_registered, check_vjp

# Rounding of central differences ~1e-8 relative; a wrong term shows at 1e-2 or more.
FD_TOLERANCE = 1e-6


def test_importing_refnorm_nn_registers_conv_and_linear():
    assert registry.layer_class("conv") is nn.Conv2d
    assert registry.layer_class("linear") is nn.Linear
    conv = registry.build("conv", 3, 4, (3, 2), stride=2, dtype=np.float64)
    assert conv.params["w"].shape == (4, 3, 3, 2) and conv.stride == (2, 2)
    assert registry.build("linear", 5, 2).params["w"].shape == (2, 5)


@pytest.mark.parametrize("name", ["conv", "linear"])
def test_every_check_case_passes_and_is_small(name):
    results = check_registered(name)
    assert len(results) >= 3
    for result in results:
        # refnorm gradcheck perturbs every element: keep each case to a few hundred.
        assert int(np.prod(result.shape)) <= 300, result.shape
        assert set(result.errors) == {"x", "w", "b"}
        for grad, err in result.errors.items():
            assert err.max_rel_error < FD_TOLERANCE, (result, grad)


def test_check_cases_cover_strides_paddings_and_non_square_kernels():
    options = [case.options for case in nn.Conv2d.check_cases]
    strides = {nn.sliding_window((1, 1, 9, 9), kernel_size=1, stride=o.get("stride", 1)).stride
               for o in options}
    pads = {o.get("padding", 0) for o in options}
    kernels = [o["kernel_size"] for o in options]
    assert (1, 1) in strides and any(s != (1, 1) for s in strides)
    assert 0 in pads and any(p != 0 for p in pads)
    assert any(isinstance(k, tuple) and k[0] != k[1] for k in kernels)


def test_refnorm_gradcheck_command_runs_conv_and_linear(capsys):
    assert main(["gradcheck", "conv", "linear", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["normalizer"], r["gradient"]) for r in rows} == {
        (n, g) for n in ("conv", "linear") for g in ("x", "w", "b")}
    assert all(r["passed"] for r in rows)


@pytest.mark.parametrize(
    ("layer", "x_shape"),
    [
        (nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=1, bias=False, dtype=np.float64),
         (2, 2, 5, 4)),
        (nn.Linear(4, 3, bias=False, dtype=np.float64), (5, 4)),
        (nn.ReLU(), (2, 3, 4)),
        (nn.MaxPool2d(2, stride=1), (2, 2, 4, 3)),
        (nn.AvgPool2d((2, 3)), (1, 2, 4, 6)),
        (nn.GlobalAvgPool(), (2, 3, 2, 3)),
    ],
    ids=["conv_no_bias", "linear_no_bias", "relu", "maxpool", "avgpool", "gap"],
)
def test_check_layer_passes_for_the_layers_not_in_the_registry_cases(layer, x_shape):
    # A shuffled ramp centred away from 0: no relu input near the kink, no max-pool ties.
    rng = np.random.default_rng(0)
    n = int(np.prod(x_shape))
    x = (rng.permutation(n) - n / 2 + 0.5).reshape(x_shape)
    errors = check_layer(layer, x, training=True)
    assert set(errors) == {"x", *layer.params}
    for grad, err in errors.items():
        assert err.max_rel_error < FD_TOLERANCE, grad


def _pure(layer, x):
    """The pure forward a layer must equal, and the matching backward -> (dx, grads), on the
    path the layer takes (tests/test_dispatch.py)."""
    p, path = layer.params, layer.compute_path()
    if isinstance(layer, nn.Conv2d):
        y, c = nn.conv2d_forward(x, p["w"], p.get("b"), stride=layer.stride,
                                 padding=layer.padding, path=path)
        return y, lambda dy: _split(nn.conv2d_backward(dy, c, path=path))
    if isinstance(layer, nn.Linear):
        y, c = nn.linear_forward(x, p["w"], p.get("b"))
        return y, lambda dy: _split(nn.linear_backward(dy, c))
    forward, backward, kw = {
        nn.ReLU: (nn.relu_forward, lambda dy, c: nn.relu_backward(dy, c, path=path), {}),
        nn.MaxPool2d: (lambda x, **kw: nn.max_pool2d_forward(x, **kw, path=path),
                       lambda dy, c: nn.max_pool2d_backward(dy, c, path=path),
                       {"kernel_size": 2}),
        nn.AvgPool2d: (nn.avg_pool2d_forward, nn.avg_pool2d_backward,
                       {"kernel_size": 2, "stride": 1}),
        nn.GlobalAvgPool: (nn.global_avg_pool_forward, nn.global_avg_pool_backward, {}),
    }[type(layer)]
    y, c = forward(x, **kw)
    return y, lambda dy: (backward(dy, c), {})


def _split(grads):
    dx, dw, db = grads
    return dx, {"w": dw} | ({} if db is None else {"b": db})


CASES = [  # (id, make(xp, bias), x_shape); bias matters for conv and linear only
    ("conv", lambda xp, bias: nn.Conv2d(3, 2, 3, padding=(1, 0), bias=bias, dtype=xp.float64,
                                        xp=xp), (2, 3, 4, 5)),
    ("linear", lambda xp, bias: nn.Linear(3, 2, bias=bias, dtype=xp.float64, xp=xp), (4, 3)),
    ("relu", lambda xp, bias: nn.ReLU(), (2, 3, 4, 5)),
    ("maxpool", lambda xp, bias: nn.MaxPool2d(2), (2, 3, 4, 5)),
    ("avgpool", lambda xp, bias: nn.AvgPool2d(2, stride=1), (2, 3, 4, 5)),
    ("gap", lambda xp, bias: nn.GlobalAvgPool(), (2, 3, 4, 5)),
]


@pytest.mark.parametrize("path", ["reference", "fast"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(("make", "x_shape"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_layer_equals_its_pure_functions(xp, make, x_shape, bias, path):
    layer = make(xp, bias)
    layer.path = path
    rng = np.random.default_rng(1)
    x = xp.asarray(rng.standard_normal(x_shape))
    y = layer.forward(x, training=True)
    y_ref, backward = _pure(layer, x)
    np.testing.assert_array_equal(to_numpy(y), to_numpy(y_ref))
    dy = xp.asarray(rng.standard_normal(tuple(y.shape)))
    dx = layer.backward(dy)
    dx_ref, grads_ref = backward(dy)
    assert type(y) is type(x) and type(dx) is type(x)
    np.testing.assert_array_equal(to_numpy(dx), to_numpy(dx_ref))
    assert set(layer.grads) == set(layer.params) == set(grads_ref)
    for k in grads_ref:
        np.testing.assert_array_equal(to_numpy(layer.grads[k]), to_numpy(grads_ref[k]))
        assert type(layer.params[k]) is type(x) and type(layer.grads[k]) is type(x)


def test_params_keys_follow_bias():
    assert set(nn.Conv2d(2, 3, 3).params) == {"w", "b"}
    assert set(nn.Conv2d(2, 3, 3, bias=False).params) == {"w"}
    assert set(nn.Linear(2, 3).params) == {"w", "b"}
    assert set(nn.Linear(2, 3, bias=False).params) == {"w"}
    for layer in (nn.ReLU(), nn.MaxPool2d(2), nn.AvgPool2d(2), nn.GlobalAvgPool()):
        assert layer.params == {} and layer.state == {}


def test_layers_live_in_array_api_strict():
    strict = pytest.importorskip("array_api_strict")
    conv = nn.Conv2d(2, 3, 2, xp=strict, dtype=strict.float64, seed=1)
    np.testing.assert_array_equal(to_numpy(conv.params["w"]),
                                  nn.Conv2d(2, 3, 2, dtype=np.float64, seed=1).params["w"])
    x = strict.asarray(np.random.default_rng(0).standard_normal((2, 2, 3, 3)))
    y = conv.forward(x, training=True)
    dx = conv.backward(strict.ones(y.shape, dtype=strict.float64))
    assert type(y) is type(x) and type(dx) is type(x) and type(conv.grads["w"]) is type(x)
    errors = check_layer(conv, x)
    assert max(e.max_rel_error for e in errors.values()) < FD_TOLERANCE


def test_backward_before_forward_and_training_flag():
    with pytest.raises(RuntimeError, match=r"Conv2d.backward\(\) called before forward\(\)"):
        nn.Conv2d(1, 1, 1).backward(np.ones((1, 1, 1, 1), np.float32))
    with pytest.raises(TypeError, match=r"training must be a bool; got int"):
        nn.ReLU().forward(np.ones(2), training=1)


def test_eval_mode_equals_training_mode():
    layer = nn.Conv2d(2, 2, 2, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 3))
    np.testing.assert_array_equal(layer.forward(x, training=False), layer.forward(x, training=True))


def test_deepcopy_is_independent():
    layer = nn.Linear(3, 2, dtype=np.float64)
    twin = copy.deepcopy(layer)
    twin.params["w"][0, 0] = 99.0
    assert layer.params["w"][0, 0] != 99.0 and twin.xp is layer.xp


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: nn.Conv2d(0, 2, 3), ValueError, r"in_channels must be >= 1; got 0"),
        (lambda: nn.Conv2d(2, 2.0, 3), TypeError, r"out_channels must be an int; got float"),
        (lambda: nn.Conv2d(2, 2, (3, 0)), ValueError, r"kernel_size must be >= 1.*got \(3, 0\)"),
        (lambda: nn.Conv2d(2, 2, 3, stride=0), ValueError, r"stride must be >= 1.*got 0"),
        (lambda: nn.Conv2d(2, 2, 3, padding=-1), ValueError, r"padding must be >= 0.*got -1"),
        (lambda: nn.Conv2d(2, 2, 3, bias=1), TypeError, r"bias must be a bool; got int"),
        (lambda: nn.Conv2d(2, 2, 3, dtype=np.int32), TypeError,
         r"dtype must be a real floating dtype; got <class 'numpy.int32'>"),
        (lambda: nn.Conv2d(2, 2, 3, seed=1.5), TypeError, r"seed must be an int; got float"),
        (lambda: nn.Conv2d(2, 2), TypeError, r"kernel_size"),
        (lambda: nn.Conv2d(2, 2, 3, 1), TypeError, r"positional argument"),
        (lambda: nn.Linear(3, 0), ValueError, r"out_features must be >= 1; got 0"),
        (lambda: nn.Linear(True, 2), TypeError, r"in_features must be an int; got bool"),
        (lambda: nn.Linear(3, 2, bias=1), TypeError, r"bias must be a bool; got int"),
        (lambda: nn.MaxPool2d(0), ValueError, r"kernel_size must be >= 1"),
        (lambda: nn.AvgPool2d(2, stride=(1, 0)), ValueError, r"stride must be >= 1"),
    ],
)
def test_constructor_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_a_small_network_end_to_end_matches_finite_differences():
    # conv -> relu -> max pool -> conv -> global average pool -> linear -> loss, chained by
    # hand through the pure functions: the pieces compose, gradients included. (With this
    # seed no relu input lies within the step 1e-6 of 0 and no pooling window has a tie.)
    rng = np.random.default_rng(3)
    labels = np.array([0, 2])
    inputs = {
        "x": rng.standard_normal((2, 2, 6, 6)),
        "w1": 0.5 * rng.standard_normal((3, 2, 3, 3)), "b1": 0.1 * rng.standard_normal(3),
        "w2": 0.5 * rng.standard_normal((4, 3, 2, 2)),
        "w3": rng.standard_normal((3, 4)), "b3": rng.standard_normal(3),
    }

    def forward(x, w1, b1, w2, w3, b3):
        h1, c1 = nn.conv2d_forward(x, w1, b1, padding=1)        # (2, 3, 6, 6)
        h2, c2 = nn.relu_forward(h1)
        h3, c3 = nn.max_pool2d_forward(h2, kernel_size=2)       # (2, 3, 3, 3)
        h4, c4 = nn.conv2d_forward(h3, w2, stride=1)            # (2, 4, 2, 2)
        h5, c5 = nn.global_avg_pool_forward(h4)                 # (2, 4)
        z, c6 = nn.linear_forward(h5, w3, b3)                   # (2, 3)
        loss, c7 = nn.softmax_cross_entropy(z, labels)
        return loss, (c1, c2, c3, c4, c5, c6, c7)

    def vjp(dloss, **args):
        _, (c1, c2, c3, c4, c5, c6, c7) = forward(**args)
        dz = float(dloss) * nn.softmax_cross_entropy_backward(c7)
        dh5, dw3, db3 = nn.linear_backward(dz, c6)
        dh4 = nn.global_avg_pool_backward(dh5, c5)
        dh3, dw2, _ = nn.conv2d_backward(dh4, c4)
        dh1 = nn.relu_backward(nn.max_pool2d_backward(dh3, c3), c2)
        dx, dw1, db1 = nn.conv2d_backward(dh1, c1)
        return {"x": dx, "w1": dw1, "b1": db1, "w2": dw2, "w3": dw3, "b3": db3}

    errors = check_vjp(lambda **a: forward(**a)[0], vjp, inputs, seed=7)
    assert set(errors) == set(inputs)
    for name, err in errors.items():
        assert err.max_rel_error < FD_TOLERANCE, (name, err)


def test_a_convolution_without_input_grad_asks_for_no_input_gradient(monkeypatch):
    """Layer.input_grad False (a first layer, whose input is the data): Conv2d passes it on to
    conv2d_backward, which then skips the input gradient, a third of its work. The
    parameter gradients are those of a full backward."""
    import refnorm.nn.conv as conv_module

    asked = []
    real = conv_module.conv2d_backward

    def spy(dy, cache, **kw):
        asked.append(kw["input_grad"])
        return real(dy, cache, **kw)

    monkeypatch.setattr(conv_module, "conv2d_backward", spy)
    layer = nn.Conv2d(2, 3, 3, padding=1, dtype=np.float64)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 2, 4, 4))
    dy = rng.standard_normal((2, 3, 4, 4))
    layer.forward(x, training=True)
    assert layer.backward(dy) is not None
    full = dict(layer.grads)
    layer.input_grad = False
    layer.forward(x, training=True)
    assert layer.backward(dy) is None
    assert asked == [True, False]
    for k in full:
        np.testing.assert_array_equal(layer.grads[k], full[k])
