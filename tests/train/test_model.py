"""The trainer's conv-net: its blocks for each method, its shapes, and its chained backward."""

from __future__ import annotations

import numpy as np
import pytest

import refnorm
from refnorm.gradcheck import check_layer, check_vjp
from refnorm.nn import GlobalAvgPool, MaxPool2d, ReLU
from refnorm.train.config import TrainConfig
from refnorm.train.loop import build_model, prepare_data
from refnorm.train.model import NORMS, ChannelAffine, ConvNet

FD_TOLERANCE = 1e-6  # float64 central differences: the noise floor absorbs the rounding


def names(model):
    return [type(layer).__name__ for layer in model.layers()]


@pytest.mark.parametrize("norm", NORMS)
def test_logits_shape_for_every_normalizer(norm):
    options = {"inference": "moving_average"} if norm in ("sn", "syncsn") else {}
    model = ConvNet(in_channels=1, num_classes=10, norm=norm, widths=(4, 8), norm_options=options)
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    logits = model.forward(x, training=True)
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    assert model.backward(np.ones_like(logits)).shape == x.shape


def test_block_layout():
    model = ConvNet(in_channels=1, num_classes=10, norm="gn", widths=(4, 8))
    assert names(model) == ["Conv2d", "GroupNorm", "ReLU", "MaxPool2d", "Conv2d", "GroupNorm",
                            "ReLU", "GlobalAvgPool", "Linear"]
    # No convolution bias in front of a normalizer (its beta would cancel it).
    assert "b" not in model.layers()[0].params
    plain = ConvNet(in_channels=1, num_classes=10, norm="none", widths=(4,))
    assert "b" in plain.layers()[0].params


def test_np_and_trelu_carry_their_own_nonlinearity():
    for weight in ("np", "trelu"):
        model = ConvNet(in_channels=1, num_classes=10, norm="none", weight=weight, widths=(4, 8))
        assert not any(isinstance(layer, ReLU) for layer in model.layers()), weight
    trelu = ConvNet(in_channels=1, num_classes=10, norm="none", weight="trelu", widths=(4, 8))
    assert isinstance(trelu.layers()[-3], ChannelAffine)
    assert isinstance(trelu.layers()[-2], GlobalAvgPool)
    assert sum(isinstance(layer, MaxPool2d) for layer in trelu.layers()) == 1


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"norm": "xn"}, "norm must be one of none, bn"),
    ({"weight": "xs"}, "weight must be one of None, ws"),
])
def test_unknown_methods_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConvNet(in_channels=1, num_classes=10, **kwargs)


def test_named_params_keys_are_layer_index_and_name():
    model = ConvNet(in_channels=1, num_classes=10, norm="bn", widths=(4,))
    keys = [key for key, _, _ in model.named_params()]
    assert keys == ["0/w", "1/gamma", "1/beta", "4/w", "4/b"]


def test_channel_affine_backward_matches_finite_differences():
    layer = ChannelAffine(3, dtype=np.float64)
    rng = np.random.default_rng(1)
    layer.params = {"gamma": 1 + rng.standard_normal(3), "beta": rng.standard_normal(3)}
    errors = check_layer(layer, 5 * rng.standard_normal((2, 3, 2, 2)) + 12)
    assert set(errors) == {"x", "gamma", "beta"}
    for name, err in errors.items():
        assert err.max_rel_error < FD_TOLERANCE, (name, err)


@pytest.mark.parametrize(("norm", "weight"), [("gn", "ws"), ("ln", None), ("none", "trelu")])
def test_whole_network_backward_matches_finite_differences(norm, weight):
    # The chained backward of every block (conv, norm, ReLU, pooling, linear) at once, for
    # the input; ReLU and max-pool kinks are h = 1e-6 away with probability ~0 at this seed.
    model = ConvNet(in_channels=2, num_classes=3, norm=norm, weight=weight, widths=(3, 4),
                    num_groups=1, dtype=np.float64, seed=2)
    x = np.random.default_rng(3).standard_normal((2, 2, 4, 4))

    def f(x):
        return model.forward(x, training=True)

    def vjp(dy, x):
        model.forward(x, training=True)
        return {"x": model.backward(dy)}

    err = check_vjp(f, vjp, {"x": x}, seed=4)["x"]
    assert err.max_rel_error < FD_TOLERANCE, err


def test_a_model_deep_copies_with_its_namespace_shared():
    import copy

    from refnorm.train.model import ConvNet

    model = ConvNet(in_channels=1, num_classes=3, norm="bn", widths=(4,))
    clone = copy.deepcopy(model)
    assert clone.xp is model.xp
    for (_, a, name), (_, b, _) in zip(model.named_params(), clone.named_params(), strict=True):
        assert a.params[name] is not b.params[name]
        assert (a.params[name] == b.params[name]).all()


def test_norm_layer_builds_the_normalizers_of_every_block():
    from functools import partial

    import refnorm

    built = []

    def own(width, **place):
        built.append((width, place["dtype"]))
        return partial(refnorm.build, "bn")(width, **place)

    mine = ConvNet(in_channels=1, num_classes=3, norm="bn", widths=(4, 6), norm_layer=own,
                   dtype=np.float64, seed=5)
    plain = ConvNet(in_channels=1, num_classes=3, norm="bn", widths=(4, 6), dtype=np.float64,
                    seed=5)
    assert built == [(4, np.float64), (6, np.float64)]
    assert names(mine) == names(plain)
    x = np.random.default_rng(6).standard_normal((3, 1, 4, 4))
    assert np.array_equal(mine.forward(x, training=True), plain.forward(x, training=True))


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"norm": "none", "norm_layer": lambda width, **place: None}, ValueError,
     "norm='none' asks for none"),
    ({"norm_layer": "bn"}, TypeError, "norm_layer must be a function that builds a layer"),
    ({"norm_layer": lambda width, **place: object()}, TypeError,
     "must return a refnorm Layer; it returned object"),
    ({"norm_layer": lambda width, **place: refnorm.build("bn", width, dtype=np.float64)},
     TypeError, "norm_layer built a layer whose parameter 'gamma' is float64 in this float32 "
                "network: make its arrays in the dtype it is given"),
])
def test_norm_layer_is_refused_when_it_cannot_build_normalizers(kwargs, error, match):
    with pytest.raises(error, match=match):
        ConvNet(in_channels=1, num_classes=3, widths=(4,), **kwargs)


@pytest.mark.parametrize("weight", [None, "ws", "wn", "np", "trelu"])
@pytest.mark.parametrize("path", ["reference", "fast"])
def test_without_the_input_gradient_the_parameter_gradients_are_the_same(weight, path):
    """input_grad=False (the trainer's model): backward returns None and the first layer
    skips the images' gradient; every parameter gradient equals the one with input_grad."""
    x = np.random.default_rng(0).standard_normal((4, 1, 8, 8)).astype(np.float32)
    grads = {}
    for input_grad in (True, False):
        model = ConvNet(in_channels=1, num_classes=3, norm="bn", weight=weight, widths=(4, 6),
                        num_groups=2, path=path, input_grad=input_grad)
        logits = model.forward(x, training=True)
        dx = model.backward(np.ones_like(logits) / logits.size)
        assert (dx is None) == (not input_grad)
        assert model.layers()[0].input_grad is input_grad
        grads[input_grad] = {key: layer.grads[name] for key, layer, name in model.named_params()}
    assert grads[True].keys() == grads[False].keys()
    for key in grads[True]:
        np.testing.assert_array_equal(grads[False][key], grads[True][key], err_msg=key)


def test_input_grad_must_be_a_bool():
    with pytest.raises(TypeError, match="input_grad must be a bool"):
        ConvNet(in_channels=1, num_classes=3, input_grad=0)


@pytest.mark.parametrize("weight", [None, "ws", "wn"])
def test_blocks_of_the_same_shape_start_from_different_weights(weight):
    """Each block's convolution is seeded apart (seed + block): two 8 -> 8 blocks drawing the
    same initial weights would start as copies of each other."""
    model = ConvNet(in_channels=1, num_classes=10, norm="bn", weight=weight, widths=(8, 8, 8),
                    seed=3)
    convs = [layer for layer in model.layers() if "w" in layer.params or "v" in layer.params]
    key = "v" if weight == "wn" else "w"
    second, third = convs[1].params[key], convs[2].params[key]
    assert second.shape == third.shape
    assert not np.array_equal(second, third)


@pytest.mark.parametrize(("norm", "devices"), [("bn", 1), ("syncbn", 2)])
def test_the_study_model_on_the_digits_has_the_parameters_the_data_parallel_page_counts(
        norm, devices):
    """docs/data-parallel.md: the bytes of a step are dominated by the gradient all-reduce of
    the model's 14,458 float32 parameters."""
    config = TrainConfig(norm=norm, devices=devices, batch_size=16)
    model = build_model(config, prepare_data(config))
    params = [layer.params[name] for _, layer, name in model.named_params()]
    assert sum(p.size for p in params) == 14_458
    assert {p.dtype for p in params} == {np.dtype(np.float32)}


def test_a_group_count_given_in_norm_options_is_kept():
    """num_groups is the default G; norm_options are the normalizer's own keyword arguments and
    win where both name it."""
    model = ConvNet(in_channels=1, num_classes=10, norm="gn", widths=(4, 4), num_groups=4,
                    norm_options={"num_groups": 2})
    assert [layer.num_groups for layer in model.layers()
            if type(layer).__name__ == "GroupNorm"] == [2, 2]
    plain = ConvNet(in_channels=1, num_classes=10, norm="gn", widths=(4,))
    assert plain.layers()[1].num_groups == 4


@pytest.mark.parametrize("weight", ["ws", "wn"])
def test_ws_and_wn_blocks_keep_the_relu_and_drop_the_bias_before_a_normalizer(weight):
    """WS and WN reparameterize the convolution only: the block still has its ReLU, and its
    convolution no bias in front of a normalizer (a bias without one)."""
    model = ConvNet(in_channels=1, num_classes=10, norm="gn", weight=weight, widths=(4, 8))
    assert names(model)[1:4] == ["GroupNorm", "ReLU", "MaxPool2d"]
    assert sum(isinstance(layer, ReLU) for layer in model.layers()) == 2
    assert "b" not in model.layers()[0].params
    plain = ConvNet(in_channels=1, num_classes=10, norm="none", weight=weight, widths=(4,))
    assert "b" in plain.layers()[0].params


@pytest.mark.parametrize("weight", [None, "ws", "wn", "np", "trelu"])
def test_a_float64_model_holds_float64_parameters_and_casts_its_input(weight):
    """Every layer, TReLU's closing ChannelAffine included, makes its parameters in the
    model's dtype, and forward casts the images to it: float32 images give float64 logits."""
    norm = "none" if weight in ("np", "trelu") else "bn"
    model = ConvNet(in_channels=1, num_classes=3, norm=norm, weight=weight, widths=(4, 4),
                    dtype=np.float64)
    for key, layer, name in model.named_params():
        assert layer.params[name].dtype == np.float64, key
    x = np.random.default_rng(5).standard_normal((2, 1, 4, 4)).astype(np.float32)
    assert model.forward(x, training=True).dtype == np.float64


def test_a_layers_refusal_names_the_layer_it_came_from():
    model = ConvNet(in_channels=1, num_classes=3, norm="bn", widths=(4,))
    with pytest.raises(ValueError, match=r"^layer 0 \(Conv2d\): x must have C_in = w.shape\[1\] "
                                         r"= 1 channels"):
        model.forward(np.zeros((2, 3, 4, 4), dtype=np.float32), training=True)


@pytest.mark.parametrize(("num_channels", "error", "match"), [
    (0, ValueError, r"num_channels must be >= 1; got 0"),
    (-1, ValueError, r"num_channels must be >= 1; got -1"),
    (2.0, TypeError, r"num_channels must be an int; got float"),
    (True, TypeError, r"num_channels must be an int; got bool"),
])
def test_channel_affine_refuses_a_channel_count_by_name(num_channels, error, match):
    with pytest.raises(error, match=match):
        ChannelAffine(num_channels)


def test_an_unknown_path_is_refused_when_the_model_is_built():
    with pytest.raises(ValueError, match=r"path must be 'reference' or 'fast'; got 'fastest'"):
        ConvNet(in_channels=1, num_classes=3, widths=(4,), path="fastest")
