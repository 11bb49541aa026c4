"""Evaluation: predictions, the metrics row of an epoch, SN's population statistics and
ratios, and the data-dependent initialization of Weight Normalization."""

from __future__ import annotations

import copy
import math
from typing import Any, TypeGuard

import numpy as np

from refnorm.backend import to_numpy
from refnorm.inference import batch_average
from refnorm.nn import softmax_cross_entropy
from refnorm.norms.switchable_norm import SwitchableNorm
from refnorm.sync.comm import SingleProcess
from refnorm.train.config import TrainConfig
from refnorm.train.data import Dataset
from refnorm.train.finite import NonFinite, check_finite, named_arrays
from refnorm.train.model import ConvNet, on_model
from refnorm.train.optim import SGD
from refnorm.train.parallel import agree, shard
from refnorm.train.position import Position
from refnorm.weights import WeightNorm


def data_dependent_init(model: ConvNet, data: Dataset, config: TrainConfig) -> None:
    """Salimans & Kingma's initialization of the Weight Normalization layers (WN and NP)
    that have a bias.

    One seeded batch of ``update_size`` (``devices x batch_size x accumulation``) training
    samples goes through the
    network in order; each such layer sets its gain and bias so that its pre-activations on
    that batch have zero mean and unit variance, then passes the batch on. A WN convolution
    in front of a normalizer (``norm="bn", weight="wn"``) has no bias and is left as built:
    the normalizer's statistics set the scale and shift of what it passes on, the case
    Salimans & Kingma's initialization is not for. Layer states (running statistics) are
    left as they were, and no layer keeps a cache of this pass.
    """
    layers = model.layers()
    if not any(_initialized(layer) for layer in layers):
        return
    states = [copy.deepcopy(layer.state) for layer in layers]
    pick = np.random.default_rng([config.seed, 3]).permutation(len(data.y_train))
    h = on_model(model, data.x_train[pick[:config.update_size]])
    h = model.xp.astype(h, model.dtype)  # as model.forward casts
    for layer in layers:
        if _initialized(layer):
            layer.init_from_batch(h)
        h = layer.forward(h, training=True)
    for layer, state in zip(layers, states, strict=True):
        layer.state = state
        layer.reset()


def _initialized(layer: object) -> TypeGuard[WeightNorm]:
    """Whether :func:`data_dependent_init` sets the layer's gain and bias."""
    return isinstance(layer, WeightNorm) and "b" in layer.params


def predict(model: ConvNet, x: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Logits (N, classes) in evaluation mode for images ``x`` (N, C, H, W), in chunks.

    Each chunk goes to the model's device and its logits come back to the host
    (:func:`~refnorm.backend.to_numpy`): the result is a numpy array whatever the device.
    """
    return np.concatenate([to_numpy(model.forward(on_model(model, x[i:i + chunk]),
                                                  training=False))
                           for i in range(0, len(x), chunk)])


def evaluate(model: ConvNet, opt: SGD, data: Dataset, config: TrainConfig, *,
             position: Position, lr: float, seconds: float, comm: Any = None) -> dict:
    """The metrics row of epoch ``position.epoch`` (after its last step, at rate ``lr``).

    With SN's batch average, the population statistics are set first from seeded training
    batches (:func:`average_batches`). Accuracies are in evaluation mode, except
    ``train_acc_running``, the training-mode accuracy over the epoch's steps.

    On data-parallel devices (``comm``), each device evaluates its contiguous part of the
    test and training sets and the sums are all-reduced; SN's batch average takes each
    device's shard of every averaging batch (merged over devices unless synchronized).
    """
    comm = SingleProcess() if comm is None else comm
    if config.norm in ("sn", "syncsn") and config.sn_inference == "batch_average":
        shards = [b[shard(len(b), comm.rank, comm.size)]
                  for b in average_batches(config, data, position.epoch)]
        pooled = comm if comm.size > 1 and not config.synchronized else None
        batch_average(model, [on_model(model, b) for b in shards], comm=pooled)
    check_finite(named_arrays(model, opt))  # the batch average set new statistics
    test_loss, test_correct = _sums(model, data.x_test, data.y_test, comm)
    _, train_correct = _sums(model, data.x_train, data.y_train, comm)
    row = {
        "epoch": position.epoch + 1,
        "lr": lr,
        "train_loss": position.totals.mean_loss(),
        "train_acc_running": position.totals.accuracy(),
        "train_acc": train_correct / len(data.y_train),
        "test_loss": test_loss / len(data.y_test),
        "test_acc": test_correct / len(data.y_test),
        "seconds": seconds,
        **sn_ratios(model),
    }
    for key, value in row.items():
        if not math.isfinite(value):
            raise NonFinite(f"the {key.replace('_', ' ')}", value)
    return row


def _sums(model: ConvNet, x: np.ndarray, y: np.ndarray, comm: Any) -> tuple[float, int]:
    """The summed cross-entropy and the number of correct predictions over ``x`` in
    evaluation mode: this device's part, summed over the devices."""
    part = shard(len(y), comm.rank, comm.size)
    labels = y[part]
    if len(labels):  # a set smaller than the devices leaves some of them no part
        logits = predict(model, x[part])
        mean_loss, _ = softmax_cross_entropy(logits, labels)
        loss = float(mean_loss) * len(labels)
        correct = int(np.sum(np.argmax(logits, 1) == labels))
    else:
        loss, correct = 0.0, 0
    if comm.size > 1:
        loss, correct = agree(comm, [loss, correct], what="evaluation sums").sum(axis=0)
    return float(loss), int(correct)


def average_batches(config: TrainConfig, data: Dataset, epoch: int) -> list[np.ndarray]:
    """The batches SN's batch average sees after epoch ``epoch``.

    ``average_samples`` training samples drawn with ``default_rng([seed, epoch, 1])``, cut to
    a multiple of ``update_size`` (so that every run that trains on the same micro-batches
    averages the same ones: P devices x b and one device accumulating P micro-batches of b),
    in batches of ``devices * batch_size`` (each (devices * batch_size, C, H, W), split over
    the devices as a training micro-batch is: each batch has the statistics of a training
    micro-batch). :func:`refnorm.train.loop.check_data` refuses ``average_samples`` below one
    update.
    """
    pick = np.random.default_rng([config.seed, epoch, 1]).permutation(len(data.y_train))
    used = min(config.average_samples, len(pick))
    pick = pick[:used - used % config.update_size]
    b = config.devices * config.batch_size
    return [data.x_train[pick[i:i + b]] for i in range(0, len(pick), b)]


def sn_ratios(model: ConvNet) -> dict[str, float]:
    """SN's current ratios, keyed ``sn<layer index>_<mean|var>_<scope>``."""
    row = {}
    for i, layer in enumerate(model.layers()):
        if isinstance(layer, SwitchableNorm):
            for kind, ratios in layer.current_ratios().items():
                for scope, value in ratios.items():
                    row[f"sn{i}_{kind}_{scope}"] = value
    return row
