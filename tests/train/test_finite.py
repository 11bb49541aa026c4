"""The non-finite checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from refnorm.train import finite


def test_is_finite_is_exact():
    assert finite.is_finite(np.full(10**6, np.finfo(np.float32).max, np.float32))
    assert finite.is_finite(np.array([1e308, 1e308]))  # its float64 sum overflows
    assert not finite.is_finite(np.array([1.0, np.inf, -np.inf]))  # sum nan
    assert not finite.is_finite(np.array([np.nan], np.float16))
    assert finite.is_finite(np.array(True)) and finite.is_finite(np.arange(3))


def test_device_arrays_are_checked_together_and_the_bad_one_named():
    """Arrays of another namespace (array_api_strict's second device, standing for CuPy) are
    summed together on their device, one transfer; a non-finite one is still named."""
    import pytest

    strict = pytest.importorskip("array_api_strict")
    device = strict.Device("device1")
    good = [strict.asarray(np.full(3, 1e308), device=device) for _ in range(2)]  # total: inf
    finite.check_finite(iter([("a", good[0]), ("b", good[1]), ("host", np.ones(2))]))
    bad = strict.asarray(np.array([1.0, np.nan], np.float32), device=device)
    with pytest.raises(finite.NonFinite, match=r"^c became nan"):
        finite.check_finite(iter([("a", good[0]), ("c", bad), ("b", good[1])]))
    with pytest.raises(finite.NonFinite, match=r"^host became inf"):
        finite.check_finite(iter([("a", good[0]), ("host", np.array([np.inf]))]))


def test_non_finite_pickles_with_its_fields():
    """A study's worker hands it to the parent process (its unpickling once failed: its
    constructor takes the fields, not the message)."""
    import pickle

    e = finite.NonFinite("the loss", float("inf"), where="in step 3", kept="the checkpoint")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is finite.NonFinite and str(back) == str(e)
    assert (back.what, back.value, back.where, back.kept) == (e.what, e.value, e.where, e.kept)


def test_the_value_named_is_the_first_non_finite_one():
    """The last non-finite value was reported."""
    from refnorm.train.finite import NonFinite, check_finite

    a = np.array([1.0, -np.inf, 2.0, np.nan, np.inf])
    first = next(v for v in a.tolist() if not math.isfinite(v))
    with pytest.raises(NonFinite, match=rf"^a became {first}") as info:
        check_finite(iter([("a", a)]))
    assert info.value.value == first


def test_a_non_finite_momentum_is_named_as_the_momentum(tiny_data):
    """An infinite momentum is named as the momentum of its parameter."""
    from refnorm.train.config import TrainConfig
    from refnorm.train.finite import NonFinite, check_finite, named_arrays
    from refnorm.train.loop import build_model
    from refnorm.train.optim import SGD
    from tests.train.conftest import TINY

    model = build_model(TrainConfig(**TINY), tiny_data)
    opt = SGD(model, lr=0.1, momentum=0.9)
    key, layer, name = next(iter(model.named_params()))
    opt.velocity[key] = np.full_like(opt.velocity[key], np.inf)
    index = int(key.split("/")[0])
    with pytest.raises(NonFinite, match=rf"^layer {index} \({type(layer).__name__}\) "
                                        rf"momentum of {name} became inf"):
        check_finite(named_arrays(model, opt))


def test_named_arrays_covers_every_parameter_momentum_and_state(tiny_data):
    """What the check after an evaluation and the devices' comparison at the end of an epoch
    look at: the layers' states (running statistics) too, not only what an update changes."""
    from refnorm.train.config import TrainConfig
    from refnorm.train.loop import build_model
    from refnorm.train.optim import SGD
    from tests.train.conftest import TINY

    model = build_model(TrainConfig(**TINY, norm="bn"), tiny_data)
    opt = SGD(model, lr=0.1, momentum=0.9)
    names = [name for name, _ in finite.named_arrays(model, opt)]
    assert "layer 1 (BatchNorm) state running_var" in names
    assert "layer 0 (Conv2d) momentum of w" in names
    assert len(names) == 2 * sum(1 for _ in model.named_params()) + sum(
        len(layer.state) for layer in model.layers())
    bn = model.layers()[1]
    bn.state = {**bn.state, "running_mean": bn.state["running_mean"] + np.float32(np.nan)}
    with pytest.raises(finite.NonFinite,
                       match=r"^layer 1 \(BatchNorm\) state running_mean became nan"):
        finite.check_finite(finite.named_arrays(model, opt))


def test_a_non_finite_with_a_reason_pickles_with_it():
    """A layer refusing its numbers (a variance overflowing float32) stops the run in its own
    words, the reason; a study's worker process hands the error to the parent, which must say
    the same."""
    import pickle

    e = finite.NonFinite("a layer's statistics", math.inf, where="in step 3 of epoch 1",
                         reason="layer 1 (BatchNorm): the variance of x overflows float32")
    back = pickle.loads(pickle.dumps(e))
    assert back.reason == e.reason and str(back) == str(e)
    assert str(back).startswith("in step 3 of epoch 1: layer 1 (BatchNorm): the variance")
