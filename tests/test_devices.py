"""Device placement: everything refnorm computes stays on the device of its inputs.

``array_api_strict`` has several devices, and arrays on two different devices refuse to
combine (``ValueError``). Every test here puts its inputs and layers on the non-default
``array_api_strict.Device("device1")`` and asserts that each output, gradient, running
statistic and optimizer state is still there: the CPU stand-in for "no silent host copies
on a GPU" (DESIGN.md, Devices). One ``np.`` creation, or one ``xp.zeros(...)`` without
``device=``, inside a forward or backward makes these tests fail, either by mixing devices
(the ``ValueError``) or by the placement assertions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import refnorm
from refnorm import registry
from refnorm.backend import device_of, to_numpy
from refnorm.layer import Layer
from refnorm.nn import (
    AvgPool2d,
    GlobalAvgPool,
    MaxPool2d,
    ReLU,
    relu_backward,
    relu_forward,
)
from refnorm.nn.loss import softmax_cross_entropy, softmax_cross_entropy_backward
from refnorm.sync import (
    InProcessGroup,
    sync_batch_norm_backward,
    sync_batch_norm_forward,
    sync_switchable_norm_backward,
    sync_switchable_norm_forward,
)
from refnorm.train.checkpoint import load_checkpoint, save_checkpoint
from refnorm.train.config import TrainConfig
from refnorm.train.loop import train_step
from refnorm.train.model import NORMS, WEIGHTS, ChannelAffine, ConvNet
from refnorm.train.optim import SGD
from refnorm.weights import (
    norm_prop_relu_backward,
    norm_prop_relu_forward,
    translated_relu_backward,
    translated_relu_forward,
    weight_norm_backward,
    weight_norm_forward,
    weight_standardization_backward,
    weight_standardization_forward,
)
from tests.norms import cases
from tests.norms import test_properties as properties

xps = pytest.importorskip("array_api_strict")
DEVICE = xps.Device("device1")
ARRAY = type(xps.asarray(0.0))  # array_api_strict._array_object.Array


def on_device(a, dtype=None):
    """A numpy array (or nested list) as an array_api_strict array on ``device1``."""
    return xps.asarray(np.asarray(a), dtype=dtype, device=DEVICE)


def assert_on_device(a, what: str) -> None:
    assert isinstance(a, ARRAY), f"{what} is a {type(a).__name__}, not on array_api_strict"
    assert a.device == DEVICE, f"{what} is on {a.device}, not on {DEVICE}"


def assert_all_on_device(arrays: dict, what: str) -> None:
    for name, a in arrays.items():
        assert_on_device(a, f"{what} {name}")


def assert_layer_on_device(layer: Layer, what: str) -> None:
    assert_all_on_device(layer.params, f"{what} parameter")
    assert_all_on_device(layer.state, f"{what} state")
    assert_all_on_device(layer.grads, f"{what} gradient")


def test_the_devices_refuse_to_combine():
    """The premise of this file: a default-device array does not combine with device1's."""
    with pytest.raises(ValueError, match="device"):
        on_device([1.0]) + xps.asarray([1.0])


def test_device_of_names_the_array_api_device_and_none_for_numpy():
    assert device_of(on_device([1.0])) == DEVICE
    assert device_of(np.ones(2)) is None


# -- every registered layer and the parameter-free ones ----------------------------------------


def _layer_cases():
    for name in registry.names():
        for i, case in enumerate(registry.layer_class(name).check_cases):
            yield pytest.param(name, case, id=f"{name}-{i}")


@pytest.mark.parametrize(("name", "case"), list(_layer_cases()))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_forward_backward_stay_on_the_device(name, case, training):
    layer = refnorm.build(name, case.shape[1], dtype=xps.float64, xp=xps, device=DEVICE,
                          **case.options)
    assert layer.device == DEVICE
    assert_layer_on_device(layer, name)
    rng = np.random.default_rng(0)
    x = on_device(5 * rng.standard_normal(case.shape) + 2)
    for _ in range(2):  # the second forward starts from the first one's running statistics
        y = layer.forward(x, training=training)
        assert_on_device(y, f"{name} output")
        dx = layer.backward(on_device(rng.standard_normal(tuple(y.shape))))
        assert_on_device(dx, f"{name} dx")
        assert set(layer.grads) == set(layer.params)
        assert_layer_on_device(layer, name)


@pytest.mark.parametrize("make", [ReLU, lambda: MaxPool2d(2), lambda: AvgPool2d(2),
                                  GlobalAvgPool,
                                  lambda: ChannelAffine(3, xp=xps, device=DEVICE)],
                         ids=["relu", "maxpool", "avgpool", "globalavgpool", "channelaffine"])
def test_network_pieces_stay_on_the_device(make):
    layer = make()
    x = on_device(np.random.default_rng(1).standard_normal((2, 3, 4, 4)), dtype=xps.float32)
    y = layer.forward(x, training=True)
    assert_on_device(y, "output")
    assert_on_device(layer.backward(xps.ones_like(y)), "dx")
    assert_layer_on_device(layer, type(layer).__name__)


def test_a_layer_built_without_device_lives_on_the_default_device():
    """The negative control: without ``device=`` the parameters are on the default device,
    and a device1 input refuses to combine with them."""
    layer = refnorm.build("bn", 3, xp=xps)
    assert layer.params["gamma"].device != DEVICE
    with pytest.raises(ValueError, match="device"):
        layer.forward(on_device(np.ones((4, 3))), training=True)


def test_he_normal_draws_the_same_weights_on_every_device():
    w_default = refnorm.nn.he_normal((3, 2), fan_in=2, seed=5, xp=xps, dtype=xps.float64)
    w = refnorm.nn.he_normal((3, 2), fan_in=2, seed=5, xp=xps, dtype=xps.float64, device=DEVICE)
    assert_on_device(w, "he_normal")
    np.testing.assert_array_equal(to_numpy(w), to_numpy(w_default))


# -- the pure functions of every method ---------------------------------------------------------


def _x(shape, seed=2):
    return on_device(5 * np.random.default_rng(seed).standard_normal(shape) + 12)


def _check_pair(forward_out, backward, what):
    y, cache = forward_out
    assert_on_device(y, f"{what} output")
    grads = backward(xps.ones_like(y) * 0.5, cache)
    for i, g in enumerate(grads if isinstance(grads, tuple) else (grads,)):
        if g is not None:
            assert_on_device(g, f"{what} gradient {i}")


@pytest.mark.parametrize("method", cases.METHODS, ids=repr)
def test_activation_norm_functions_stay_on_the_device(method):
    x, options = _x((4, 4, 3, 3)), {"num_groups": 2} if method.name == "gn" else {}
    gamma, beta = on_device(np.linspace(0.5, 2.0, 4)), on_device(np.linspace(-1.0, 1.0, 4))
    _check_pair(method.forward(x, gamma, beta, eps=1e-5, **options), method.backward,
                method.name)


def test_eval_and_graph_functions_stay_on_the_device():
    x = _x((4, 3, 2, 2))
    gamma, beta = on_device(np.ones(3)), on_device(np.zeros(3))
    stats = on_device(np.full(3, 12.0)), on_device(np.full(3, 25.0))
    for fn in (refnorm.batch_norm_eval_forward, refnorm.instance_norm_eval_forward):
        y, _ = fn(x, gamma, beta, *stats, eps=1e-5)
        assert_on_device(y, fn.__name__)
    _check_pair(refnorm.batch_norm_forward_graph(x, gamma, beta, eps=1e-5),
                refnorm.batch_norm_backward_graph, "bn graph")


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_switchable_norm_functions_stay_on_the_device(hard):
    x = _x((3, 4, 3, 3))
    gamma, beta = on_device(np.ones(4)), on_device(np.zeros(4))
    logits = on_device([0.3, -0.2, 0.1]), on_device([0.0, 0.5, -0.5])
    options = refnorm.SwitchableOptions(hard=hard)
    _check_pair(refnorm.switchable_norm_forward(x, gamma, beta, *logits, eps=1e-5,
                                                options=options),
                refnorm.switchable_norm_backward, "sn")
    _check_pair(refnorm.switchable_norm_forward(x, gamma, beta, *logits, eps=1e-5,
                                                options=options),
                refnorm.switchable_norm_backward_compact, "sn compact")
    stats = on_device(np.full(4, 12.0)), on_device(np.full(4, 25.0))
    y, _ = refnorm.switchable_norm_eval_forward(x, gamma, beta, *logits, *stats, eps=1e-5,
                                                options=options)
    assert_on_device(y, "sn eval")


def test_weight_functions_stay_on_the_device():
    v = _x((4, 3, 3, 3))
    g = on_device(np.linspace(0.5, 2.0, 4))
    _check_pair(weight_norm_forward(v, g, eps=1e-5), weight_norm_backward, "wn")
    _check_pair(weight_standardization_forward(v, eps=1e-5), weight_standardization_backward,
                "ws")
    z = on_device(np.random.default_rng(3).standard_normal((2, 4, 3, 3)))
    _check_pair(norm_prop_relu_forward(z), norm_prop_relu_backward, "np relu")
    _check_pair(translated_relu_forward(z, on_device(np.full(4, 0.1))),
                translated_relu_backward, "trelu")


def test_network_functions_stay_on_the_device():
    x = _x((2, 3, 5, 5))
    w = on_device(np.random.default_rng(4).standard_normal((4, 3, 3, 3)))
    b = on_device(np.zeros(4))
    _check_pair(refnorm.nn.conv2d_forward(x, w, b, stride=2, padding=1),
                refnorm.nn.conv2d_backward, "conv (padded, strided)")
    _check_pair(refnorm.nn.linear_forward(_x((3, 5)), on_device(np.ones((2, 5))), None),
                refnorm.nn.linear_backward, "linear")
    _check_pair(refnorm.nn.max_pool2d_forward(x, kernel_size=2),
                refnorm.nn.max_pool2d_backward, "maxpool")
    _check_pair(refnorm.nn.avg_pool2d_forward(x, kernel_size=2),
                refnorm.nn.avg_pool2d_backward, "avgpool")
    _check_pair(refnorm.nn.global_avg_pool_forward(x), refnorm.nn.global_avg_pool_backward,
                "global avg pool")
    _check_pair(relu_forward(x - 12), relu_backward, "relu")
    loss, cache = softmax_cross_entropy(_x((4, 3)), on_device([0, 2, 1, 2], dtype=xps.int64))
    assert_on_device(loss, "loss")
    assert_on_device(softmax_cross_entropy_backward(cache), "dlogits")


@pytest.mark.parametrize("which", ["syncbn", "syncsn"])
def test_synchronized_functions_stay_on_the_device_in_an_in_process_group(which):
    """Two simulated devices, both holding device1 arrays: the all-reduced statistics, the
    outputs and the gradients stay there."""
    gamma, beta = on_device(np.ones(3)), on_device(np.zeros(3))
    logits = on_device([0.3, -0.2, 0.1]), on_device([0.0, 0.5, -0.5])

    def device(comm, x):
        if which == "syncbn":
            y, cache = sync_batch_norm_forward(x, gamma, beta, comm=comm, eps=1e-5)
            grads = sync_batch_norm_backward(xps.ones_like(y) * 0.5, cache)
        else:
            y, cache = sync_switchable_norm_forward(x, gamma, beta, *logits, comm=comm,
                                                    eps=1e-5)
            grads = sync_switchable_norm_backward(xps.ones_like(y) * 0.5, cache)
        return (y, *grads)

    results = InProcessGroup.run(2, device, [_x((2, 3, 2, 2), seed=s) for s in (5, 6)])
    for rank, arrays in enumerate(results):
        for i, a in enumerate(arrays):
            assert_on_device(a, f"rank {rank} result {i}")


# -- the property suite's core checks, on device1 -----------------------------------------------


class _Device1Namespace:
    """array_api_strict whose ``asarray`` puts the new array on device1: the namespace the
    property tests put their drawn inputs in (they call ``xp.asarray`` only)."""

    def __getattr__(self, name):
        return getattr(xps, name)

    def asarray(self, a, **options):
        return xps.asarray(a, device=DEVICE, **options)


CORE_PROPERTIES = [properties.test_output_is_standardized_per_group,
                   properties.test_dx_sums_to_zero_over_each_group_and_is_orthogonal_to_x_hat_up_to_eps,
                   properties.test_invariant_to_positive_affine_map_of_each_group]


@pytest.mark.parametrize("method", cases.METHODS, ids=repr)
@pytest.mark.parametrize("check", CORE_PROPERTIES, ids=lambda f: f.__name__[5:40])
def test_core_properties_hold_on_the_device(check, method):
    """tests/norms/test_properties.py's checks, their drawn cases and tolerances, with every
    input on device1: a default-device array created inside refnorm refuses to combine."""
    check(method=method, xp=_Device1Namespace())


# -- the model, the optimizer and the trainer's step and checkpoint -----------------------------


def _config(norm, weight, **overrides):
    options = dict(norm=norm, weight=weight, batch_size=4, accumulation=1,
                   widths=(4, 4), num_groups=2, epochs=1, lr=0.05, dtype="float64")
    options.update(overrides)
    return TrainConfig(**options)


def _model(norm, weight):
    return ConvNet(in_channels=3, num_classes=3, norm=norm, weight=weight, widths=(4, 4),
                   num_groups=2, dtype=xps.float64, xp=xps, device=DEVICE)


def assert_model_on_device(model, opt, what):
    for i, layer in enumerate(model.layers()):
        assert_layer_on_device(layer, f"{what}, layer {i} ({type(layer).__name__})")
    assert_all_on_device(opt.velocity, f"{what}, momentum of")


# NORMS[1:] leaves out "none"; WEIGHTS[1:] leaves out None (plain convolutions, with bn).
RUNS = ([pytest.param(n, None, id=n) for n in NORMS[1:]]
        + [pytest.param("gn" if w in ("ws", "wn") else "none", w, id=w) for w in WEIGHTS[1:]])


@pytest.mark.parametrize(("norm", "weight"), RUNS)
def test_two_training_steps_keep_everything_on_the_device(norm, weight):
    """The trainer's own step (refnorm.train.trainer.train_step), twice: numpy batches go
    in, are moved once onto the model's device, and every output, gradient, running
    statistic and momentum stays there."""
    model = _model(norm, weight)
    opt = SGD(model, lr=0.05, momentum=0.9, weight_decay=1e-4)
    assert_model_on_device(model, opt, "before training")
    rng = np.random.default_rng(7)
    config = _config(norm, weight)
    before = {key: to_numpy(layer.params[name]) for key, layer, name in model.named_params()}
    for step in range(2):
        x = rng.standard_normal((4, 3, 4, 4))
        y = rng.integers(0, 3, size=4)
        totals = train_step(model, opt, x, y, batch_size=config.batch_size, lr=0.05)
        assert math.isfinite(totals.mean_loss())
        assert_model_on_device(model, opt, f"after step {step + 1}")
    logits = model.forward(on_device(rng.standard_normal((2, 3, 4, 4))), training=False)
    assert_on_device(logits, "eval logits")
    moved = [key for key, layer, name in model.named_params()
             if not np.array_equal(to_numpy(layer.params[name]), before[key])]
    assert moved, "two steps changed no parameter"


def test_a_checkpoint_saved_from_device1_loads_back_onto_device1(tmp_path):
    """save_checkpoint copies to the host (refnorm.backend.to_numpy); load_checkpoint puts
    every array back on the device of the model's own arrays."""
    from refnorm.train.position import Position, Totals

    config = _config("sn", None)
    model = _model("sn", None)
    opt = SGD(model, lr=0.05, momentum=0.9)
    rng = np.random.default_rng(8)
    train_step(model, opt, rng.standard_normal((4, 3, 4, 4)), rng.integers(0, 3, size=4),
               batch_size=config.batch_size, lr=0.05)
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, config, model, opt, Position(0, 1, Totals(), ()))
    fresh = _model("sn", None)
    fresh_opt = SGD(fresh, lr=0.05, momentum=0.9)
    load_checkpoint(path, config, fresh, fresh_opt)
    assert_model_on_device(fresh, fresh_opt, "after loading")
    for (key, layer, name), (_, again, _) in zip(model.named_params(), fresh.named_params(),
                                                 strict=True):
        np.testing.assert_array_equal(to_numpy(again.params[name]), to_numpy(layer.params[name]))
        np.testing.assert_array_equal(to_numpy(fresh_opt.velocity[key]),
                                      to_numpy(opt.velocity[key]))
    for layer, again in zip(model.layers(), fresh.layers(), strict=True):
        for name, value in layer.state.items():
            np.testing.assert_array_equal(to_numpy(again.state[name]), to_numpy(value))


def test_check_layer_evaluates_a_layer_on_its_own_device():
    """refnorm.gradcheck.check_layer put its float64 copies on the default device."""
    from refnorm.gradcheck import check_layer

    seen = set()
    layer = refnorm.build("bn", 4, dtype=xps.float64, xp=xps, device=DEVICE)
    forward = type(layer).forward

    def spy(self, x, training):
        seen.update({x.device, *(p.device for p in self.params.values())})
        return forward(self, x, training)

    type(layer).forward = spy
    try:
        errors = check_layer(layer, on_device(5 * np.random.default_rng(1)
                                              .standard_normal((3, 4, 3, 3)) + 12))
    finally:
        type(layer).forward = forward
    assert seen == {DEVICE}
    assert max(e.max_rel_error for e in errors.values()) < 1e-6


def test_a_metered_communicator_counts_bytes_of_any_namespace():
    from refnorm.sync.comm import MeteredCommunicator

    def device(comm):
        metered = MeteredCommunicator(comm)
        metered.allreduce_sum([on_device(np.ones(3), xps.float32), on_device(np.ones(2))])
        return metered.bytes

    assert InProcessGroup.run(2, device) == [3 * 4 + 2 * 8] * 2
