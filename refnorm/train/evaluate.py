"""Evaluation: predictions, the metrics row of an epoch, SN's population statistics and
ratios, and the data-dependent initialization of Weight Normalization."""

from __future__ import annotations

import copy
import math

import numpy as np

from refnorm.backend import to_numpy
from refnorm.inference import batch_average
from refnorm.nn import softmax_cross_entropy
from refnorm.norms.switchable import SwitchableNorm
from refnorm.train.config import TrainConfig
from refnorm.train.data import Dataset
from refnorm.train.finite import NonFinite, check_finite, named_arrays
from refnorm.train.model import ConvNet, on_model
from refnorm.train.optim import SGD
from refnorm.train.position import Position
from refnorm.weights import WeightNorm


def data_dependent_init(model: ConvNet, data: Dataset, config: TrainConfig) -> None:
    """Salimans & Kingma's initialization of every Weight Normalization layer (WN and NP).

    One seeded batch of ``batch_size * accumulation`` training samples goes through the
    network in order; each WN layer sets its gain and bias so that its pre-activations on
    that batch have zero mean and unit variance, then passes the batch on. Layer states
    (running statistics) are left as they were, and no layer keeps a cache of this pass.
    """
    layers = model.layers()
    if not any(isinstance(layer, WeightNorm) for layer in layers):
        return
    states = [copy.deepcopy(layer.state) for layer in layers]
    pick = np.random.default_rng([config.seed, 3]).permutation(len(data.y_train))
    h = on_model(model, data.x_train[pick[:config.update_size]])
    h = model.xp.astype(h, model.dtype)  # as model.forward casts
    for layer in layers:
        if isinstance(layer, WeightNorm):
            layer.init_from_batch(h)
        h = layer.forward(h, training=True)
    for layer, state in zip(layers, states, strict=True):
        layer.state = state
        layer.reset()


def predict(model: ConvNet, x: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Logits (N, classes) in evaluation mode for images ``x`` (N, C, H, W), in chunks.

    Each chunk goes to the model's device and its logits come back to the host
    (:func:`~refnorm.backend.to_numpy`): the result is a numpy array whatever the device.
    """
    return np.concatenate([to_numpy(model.forward(on_model(model, x[i:i + chunk]),
                                                  training=False))
                           for i in range(0, len(x), chunk)])


def evaluate(model: ConvNet, opt: SGD, data: Dataset, config: TrainConfig, *,
             position: Position, lr: float, seconds: float) -> dict:
    """The metrics row of epoch ``position.epoch`` (after its last step, at rate ``lr``).

    With SN's batch average, the population statistics are set first from seeded training
    batches (:func:`average_batches`). Accuracies are in evaluation mode, except
    ``train_acc_running``, the training-mode accuracy over the epoch's steps.
    """
    if config.norm in ("sn", "syncsn") and config.sn_inference == "batch_average":
        batches = average_batches(config, data, position.epoch)
        batch_average(model, [on_model(model, b) for b in batches])
    check_finite(named_arrays(model, opt))  # the batch average set new statistics
    test_logits = predict(model, data.x_test)
    test_loss, _ = softmax_cross_entropy(test_logits, data.y_test)
    train_logits = predict(model, data.x_train)
    row = {
        "epoch": position.epoch + 1,
        "lr": lr,
        "train_loss": position.totals.mean_loss(),
        "train_acc_running": position.totals.accuracy(),
        "train_acc": float(np.mean(np.argmax(train_logits, 1) == data.y_train)),
        "test_loss": float(test_loss),
        "test_acc": float(np.mean(np.argmax(test_logits, 1) == data.y_test)),
        "seconds": seconds,
        **sn_ratios(model),
    }
    for key, value in row.items():
        if not math.isfinite(value):
            raise NonFinite(f"the {key.replace('_', ' ')}", value)
    return row


def average_batches(config: TrainConfig, data: Dataset, epoch: int) -> list[np.ndarray]:
    """The batches SN's batch average sees after epoch ``epoch``.

    ``average_samples`` training samples drawn with ``default_rng([seed, epoch, 1])``, in
    micro-batches of ``batch_size`` (each (batch_size, C, H, W); a partial last one is left
    out, so that every batch has the statistics of a training micro-batch).
    """
    pick = np.random.default_rng([config.seed, epoch, 1]).permutation(len(data.y_train))
    pick = pick[:config.average_samples]
    b = config.batch_size
    return [data.x_train[pick[i:i + b]] for i in range(0, len(pick) - b + 1, b)]


def sn_ratios(model: ConvNet) -> dict[str, float]:
    """SN's current ratios, keyed ``sn<layer index>_<mean|var>_<scope>``."""
    row = {}
    for i, layer in enumerate(model.layers()):
        if isinstance(layer, SwitchableNorm):
            for kind, ratios in layer.current_ratios().items():
                for scope, value in ratios.items():
                    row[f"sn{i}_{kind}_{scope}"] = value
    return row
