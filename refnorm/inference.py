"""SN's batch average: population statistics for every SN layer of a network after training.

Switchable Normalization (Luo et al., journal version, §3.2, "Inference") does not keep a
moving average of its BN-scope statistics: after training, the network is frozen, batches
are fed, and each SN layer's population statistics are the average over those batches.
:func:`batch_average` does that for every SN layer of a model through the layers' public
API (:meth:`~refnorm.norms.switchable_norm.SwitchableNorm.batch_statistics` and
:meth:`~refnorm.norms.switchable_norm.SwitchableNorm.set_population`); nothing here touches a
layer's private attributes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from refnorm.backend import Array, array_namespace, device_of, on_device
from refnorm.core.checks import is_int
from refnorm.core.running import BatchStatistics
from refnorm.layer import iter_layers
from refnorm.norms.switchable_norm import SwitchableNorm
from refnorm.sync.headers import allreduce

__all__ = ["batch_average", "merge_batch_statistics"]


def _run(model: Any, x: Array) -> Array:
    """A training-mode forward of ``model`` (a list/tuple of layers is applied in order)."""
    if isinstance(model, (list, tuple)):
        for layer in model:
            x = _run(layer, x)
        return x
    return model.forward(x, training=True)


def batch_average(model: Any, batches: Iterable[Array], *, comm: Any = None) -> int:
    """Set the BN-scope population statistics of every SN layer by the paper's batch average.

    Every SN layer with a BN scope is set, whatever its ``inference`` option: one built with
    ``inference="moving_average"`` has its moving averages replaced by the batch average (and
    keeps its option). The network is otherwise frozen: its parameters are not touched and
    every other layer's state (BN running statistics) is restored afterwards. Each batch is fed in
    training mode, each SN layer's BN-scope (count, mean, variance) is read after every
    batch (:meth:`~refnorm.norms.switchable_norm.SwitchableNorm.batch_statistics`), and the
    records are merged by the law of total variance::

        mean = sum_b n_b mu_b / n
        var  = sum_b n_b var_b / n + sum_b n_b (mu_b - mean)^2 / n

    which is exactly the mean and the (biased) variance of all values fed, per channel, with
    the default biased IN variance. (With ``in_correction=1`` each batch's BN-scope variance
    is the official code's mixture, mean of unbiased IN variances plus variance of IN means,
    and the merge pools those; with ``scope_correction=1`` it is the unbiased variance of the
    batch, and the merge pools that.) The paper says it averages "the means and variances" of
    the batches; averaging variances alone would miss the spread of the batch means. Its official
    code accumulates means and second moments (``var_b + mu_b^2``) and subtracts the squared
    mean: the same number as the merge above, but with the float32 cancellation of Eq. (4).

    Every layer's cache is dropped afterwards (:meth:`~refnorm.layer.Layer.reset`): a
    backward needs a new forward.

    With ``comm``, each device of a data-parallel group feeds its own batches to its own
    copy of the model, and the records of all devices are merged (the same law, its sums
    all-reduced over ``comm``): every device gets the statistics of all values fed anywhere.
    Pass it for layers that normalize per device (SN); a synchronized SN's records already
    cover every device.

    Parameters
    ----------
    model : a layer, an object with ``forward(x, training)`` and ``layers()``, or a
        list/tuple of layers applied in order
    batches : iterable of arrays, not an array itself
        A list or generator of batches. One array is refused (TypeError): iterating it would
        feed its samples as batches, each a valid input of another shape when its sizes allow
        (``[x]`` feeds one batch, ``list(stacked)`` batches stacked along a first axis).
    comm : communicator, optional (:mod:`refnorm.sync.comm`)

    Returns
    -------
    int : the number of batches fed
    """
    if hasattr(batches, "shape"):
        raise TypeError(f"batch_average: batches must be an iterable of batches (a list, a "
                        f"generator), not one array: got an array of shape "
                        f"{tuple(batches.shape)}; pass [x] for one batch, or list(stacked) "
                        f"for batches stacked along the first axis")
    layers = list(iter_layers(model))
    targets = [layer for layer in layers
               if isinstance(layer, SwitchableNorm) and "bn" in layer.options.scopes]
    if not targets:
        raise ValueError("batch_average: the model has no SwitchableNorm layer with a BN scope")
    saved = [copy.deepcopy(layer.state) for layer in layers]
    records: list[list[BatchStatistics]] = [[] for _ in targets]
    fed = 0
    try:
        for x in batches:
            _run(model, x)
            for record, layer in zip(records, targets, strict=True):
                record.append(layer.batch_statistics())
            fed += 1
    finally:
        for each, state in zip(layers, saved, strict=True):
            each.state = state
            each.reset()
    if fed == 0:
        raise ValueError("batch_average needs at least one batch; got none")
    for layer, record in zip(targets, records, strict=True):
        layer.set_population(*merge_batch_statistics(record, comm=comm))
    return fed


def merge_batch_statistics(records: list[BatchStatistics], *,
                           comm: Any = None) -> tuple[Array, Array]:
    """Merge per-batch (count, mean, biased var) into the statistics of all values, in float64
    (with ``comm``, the records of every device: two all-reduces, as in synchronized BN).

    Parameters
    ----------
    records : non-empty list of BatchStatistics
        One per batch (:meth:`~refnorm.norms.switchable_norm.SwitchableNorm.batch_statistics`),
        all of the same shape (C,), with counts >= 1.
    comm : communicator, optional
        Merge the records of every device of ``comm`` (:mod:`refnorm.sync.comm`).

    Returns
    -------
    mean, var : arrays, (C,), float64
    """
    records = list(records)
    if not records:
        raise ValueError("merge_batch_statistics needs at least one record; got none")
    for r in records:
        if not isinstance(r, BatchStatistics):
            raise TypeError(f"records must be BatchStatistics; got {type(r).__name__}")
    shape = tuple(records[0].mean.shape)
    for r in records:
        if not is_int(r.count):  # refnorm's rule: a wrong kind of value is a TypeError
            raise TypeError(f"every record's count must be an int >= 1; got {r.count!r}")
        if r.count < 1:
            raise ValueError(f"every record's count must be an int >= 1; got {r.count!r}")
        if len(shape) != 1 or tuple(r.mean.shape) != shape or tuple(r.var.shape) != shape:
            raise ValueError(f"every record's mean and var must have one shape (C,); got "
                             f"{tuple(r.mean.shape)} and {tuple(r.var.shape)} beside {shape}")
    xp = array_namespace(*(r.mean for r in records))
    means = [xp.astype(r.mean, xp.float64) for r in records]
    n = float(sum(r.count for r in records))
    total = sum(r.count * m for r, m in zip(records, means, strict=True))     # (C,)
    if comm is not None:
        count = xp.asarray([float(n)], dtype=xp.float64, **on_device(device_of(total)))
        count, total = allreduce(comm, [count, total], op="batch_average (count, sum)")
        n = float(count[0])
    mean = total / n
    m2 = sum(r.count * xp.astype(r.var, xp.float64) for r in records) + sum(
        r.count * (m - mean) ** 2 for r, m in zip(records, means, strict=True))
    if comm is not None:
        (m2,) = allreduce(comm, [m2], op="batch_average (M2)")
    return mean, m2 / n
