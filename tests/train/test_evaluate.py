"""Evaluation (refnorm/train/evaluate.py): the metrics row is computed in inference mode, from
the running statistics, and leaves them as they were."""

from __future__ import annotations

import numpy as np
import pytest

from refnorm.train.config import TrainConfig
from refnorm.train.evaluate import data_dependent_init, evaluate, predict
from refnorm.train.finite import NonFinite
from refnorm.train.loop import build_model, prepare_data, train
from refnorm.train.optim import SGD
from refnorm.train.position import Position, Totals
from tests.train.conftest import TINY


def _bn_model(tiny_data):
    """A BN model whose running statistics are those of a short run (not the initial 0 and
    1), so that inference and training modes normalize differently."""
    return train(TrainConfig(**{**TINY, "epochs": 1}), progress=False, data=tiny_data).model


def test_predictions_use_the_running_statistics_sample_by_sample(tiny_data):
    """In inference mode BN normalizes each sample by the running statistics (Ioffe & Szegedy,
    2015, Alg. 2): a sample's logits do not depend on the others in its chunk. In training
    mode they would (the batch's own mean and variance)."""
    model = _bn_model(tiny_data)
    x = tiny_data.x_test[:12]
    together = predict(model, x)
    alone = np.concatenate([predict(model, x[i:i + 1]) for i in range(len(x))])
    # the same per-sample arithmetic in chunks of 12 and of 1: float32 rounding only
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_evaluation_leaves_the_running_statistics_as_they_were(tiny_data):
    """The metrics row is read in inference mode: evaluating (the test and the whole training
    set) updates no running mean or variance, which a training-mode forward would; its
    train_acc is that of inference mode, beside the epoch's running training-mode figures."""
    model = _bn_model(tiny_data)
    config = TrainConfig(**{**TINY, "epochs": 1})
    before = [{k: np.copy(v) for k, v in layer.state.items()} for layer in model.layers()]
    assert any(before)
    opt = SGD(model, lr=config.lr, momentum=config.momentum)
    position = Position(totals=Totals(40.0, 3, 32))  # the epoch's steps: 3 of 32 right
    row = evaluate(model, opt, tiny_data, config, position=position, lr=config.lr,
                   seconds=0.0)
    # train_acc is the inference-mode accuracy over the whole training set, recomputed here;
    # train_acc_running and train_loss are the epoch's training-mode sums, 3 / 32 and 40 / 32
    right = np.argmax(predict(model, tiny_data.x_train), axis=1) == tiny_data.y_train
    assert row["train_acc"] == np.mean(right) != 3 / 32
    assert (row["train_acc_running"], row["train_loss"]) == (3 / 32, 40 / 32)
    for layer, saved in zip(model.layers(), before, strict=True):
        for key, value in saved.items():
            np.testing.assert_array_equal(layer.state[key], value, err_msg=key)


def test_a_non_finite_batch_average_is_named_by_its_layer_and_array(tiny_data, monkeypatch):
    """SN's batch average sets new population statistics before the predictions: one that
    comes out infinite stops the run naming the layer and the array, as the README promises
    for every non-finite value (not as a NaN test loss, where it shows next)."""
    from refnorm.train import evaluate as evaluate_module

    real = evaluate_module.batch_average

    def overflowing(model, batches, **options):
        real(model, batches, **options)
        sn = model.layers()[1]
        sn.state = {**sn.state, "running_var": sn.state["running_var"] * np.float32(np.inf)}

    monkeypatch.setattr(evaluate_module, "batch_average", overflowing)
    config = TrainConfig(**{**TINY, "norm": "sn", "epochs": 1, "average_samples": 16})
    with pytest.raises(NonFinite, match=r"^layer 1 \(SwitchableNorm\) state running_var became "
                                        r"inf"):
        train(config, progress=False, data=tiny_data)


def test_data_dependent_init_of_a_float64_model_standardizes_in_float64():
    """The float32 images are cast to the model's float64 before WN's initialization (as
    model.forward casts them): Salimans & Kingma (2016, section 3) then standardize the first
    layer's pre-activations to float64 rounding, not float32's (~1e-7). With one update's
    worth of training samples the init batch is the whole training set."""
    cfg = TrainConfig(train_subset=16, widths=(4, 4), batch_size=8, accumulation=2, epochs=1,
                      norm="none", weight="wn", dtype="float64")
    data = prepare_data(cfg)
    assert data.x_train.dtype == np.float32 and len(data.y_train) == cfg.update_size
    model = build_model(cfg, data)
    data_dependent_init(model, data, cfg)
    first = model.layers()[0]
    t = first.forward(data.x_train.astype(np.float64), training=True)  # (16, 4, 8, 8)
    # exact by construction in float64; values ~O(1) averaged over 1024 entries: rounding
    np.testing.assert_allclose(t.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
    np.testing.assert_allclose(t.var(axis=(0, 2, 3)), 1.0, rtol=1e-12)
