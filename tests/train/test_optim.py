"""SGD with momentum and weight decay, and the learning-rate schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from refnorm.train.optim import SGD, learning_rate


class _OneLayer:
    """A stand-in model: one layer with a weight ``w`` and a bias ``b``."""

    def __init__(self, w, b):
        self.params = {"w": np.array(w), "b": np.array(b)}

    def named_params(self):
        for name in self.params:
            yield f"0/{name}", self, name


def test_momentum_steps_by_hand():
    # v1 = g = 0.5, p1 = 1 - 0.1 * 0.5 = 0.95; v2 = 0.9 * 0.5 + 0.5 = 0.95, p2 = 0.855.
    model = _OneLayer([1.0], [1.0])
    opt = SGD(model, lr=0.1, momentum=0.9)
    grads = {"0/w": np.array([0.5]), "0/b": np.array([0.5])}
    opt.step(grads, 0.1)
    np.testing.assert_allclose(model.params["w"], [0.95], rtol=1e-15)
    opt.step(grads, 0.1)
    np.testing.assert_allclose(model.params["w"], [0.855], rtol=1e-15)
    np.testing.assert_allclose(opt.velocity["0/w"], [0.95], rtol=1e-15)


def test_weight_decay_only_on_weights():
    # With zero gradients only the decay moves a parameter: w = 2 - 0.1 * 0.5 * 2 = 1.9.
    model = _OneLayer([2.0], [2.0])
    opt = SGD(model, lr=0.1, momentum=0.0, weight_decay=0.5)
    opt.step({"0/w": np.zeros(1), "0/b": np.zeros(1)}, 0.1)
    np.testing.assert_allclose(model.params["w"], [1.9], rtol=1e-15)
    np.testing.assert_array_equal(model.params["b"], [2.0])


def test_step_replaces_arrays_and_keeps_dtypes():
    # The trainer undoes an interrupted step by keeping the old arrays: SGD must never
    # write into them.
    model = _OneLayer(np.ones(3, np.float32), np.zeros(2, np.float32))
    opt = SGD(model, lr=0.1, momentum=0.9, weight_decay=1e-3)
    w, v = model.params["w"], opt.velocity["0/w"]
    opt.step({"0/w": np.ones(3), "0/b": np.ones(2)}, 0.1)
    np.testing.assert_array_equal(w, np.ones(3))
    np.testing.assert_array_equal(v, np.zeros(3))
    assert model.params["w"].dtype == np.float32 and opt.velocity["0/w"].dtype == np.float32


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"lr": 0.1, "momentum": 1.0},
                                    {"lr": 0.1, "weight_decay": -1.0}, {"lr": math.nan},
                                    {"lr": math.inf}, {"lr": 0.1, "weight_decay": math.inf}])
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError, match="need finite lr > 0, 0 <= momentum < 1, "
                                         "weight_decay >= 0"):
        SGD(_OneLayer([1.0], [1.0]), **kwargs)


def test_schedules():
    assert learning_rate("cosine", 0.2, 0, 100) == 0.2
    assert learning_rate("cosine", 0.2, 50, 100) == pytest.approx(0.1)
    assert learning_rate("cosine", 0.2, 100, 100) == pytest.approx(0.0, abs=1e-17)
    assert learning_rate("cosine", 0.2, 25, 100) == pytest.approx(0.1 * (1 + math.sqrt(0.5)))
    assert learning_rate("linear", 0.2, 75, 100) == pytest.approx(0.05)
    assert learning_rate("linear", 0.2, 200, 100) == 0.0  # past the end: clamped
    assert learning_rate("constant", 0.2, 99, 100) == 0.2
    with pytest.raises(ValueError, match="schedule must be 'cosine', 'linear' or 'constant'"):
        learning_rate("step", 0.2, 0, 100)


@pytest.mark.parametrize("momentum", [-0.1, -1e-300])
def test_negative_momentum_is_refused(momentum):
    """0 <= momentum < 1."""
    with pytest.raises(ValueError, match="0 <= momentum < 1"):
        SGD(_OneLayer([1.0], [1.0]), lr=0.1, momentum=momentum)


def test_weight_decay_goes_through_the_momentum():
    """PyTorch's coupled decay: g + wd p enters the velocity, so with zero gradients the decay
    of step 1 is carried into step 2 by the momentum. By hand, p0 = 2, lr 0.1, wd 0.5, m 0.9:
    v1 = 0.5 * 2 = 1, p1 = 2 - 0.1 = 1.9; v2 = 0.9 + 0.95 = 1.85, p2 = 1.9 - 0.185 = 1.715.
    Decoupled decay, p (1 - lr wd), gives other values here; with momentum 0 the two agree."""
    model = _OneLayer([2.0], [2.0])
    opt = SGD(model, lr=0.1, momentum=0.9, weight_decay=0.5)
    zero = {"0/w": np.zeros(1), "0/b": np.zeros(1)}
    opt.step(zero, 0.1)
    np.testing.assert_allclose(opt.velocity["0/w"], [1.0], rtol=1e-15)
    np.testing.assert_allclose(model.params["w"], [1.9], rtol=1e-15)
    opt.step(zero, 0.1)
    np.testing.assert_allclose(opt.velocity["0/w"], [1.85], rtol=1e-15)
    np.testing.assert_allclose(model.params["w"], [1.715], rtol=1e-15)
    np.testing.assert_array_equal(model.params["b"], [2.0])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_a_schedule_of_zero_steps_gives_the_base_rate_at_step_0(schedule):
    """total = 0 is read as one step."""
    assert learning_rate(schedule, 0.2, 0, 0) == 0.2
    assert math.isfinite(learning_rate(schedule, 0.2, 1, 0))


def test_the_update_takes_the_rate_it_is_given_not_the_base_rate():
    """SGD.step's lr is the schedule's rate of this step; self.lr is only its base:
    p = 1 - 0.02 * 0.5 = 0.99 (every other test stepped at the base rate)."""
    model = _OneLayer([1.0], [1.0])
    opt = SGD(model, lr=0.1, momentum=0.9)
    opt.step({"0/w": np.array([0.5]), "0/b": np.array([0.5])}, 0.02)
    np.testing.assert_allclose(model.params["w"], [0.99], rtol=1e-15)
    np.testing.assert_allclose(model.params["b"], [0.99], rtol=1e-15)
