"""Data-parallel training support: every device's parameter gradients combined once per step.

Each device runs the same model on its own shard, then :func:`allreduce_gradients` replaces
every gradient with the weighted sum over devices (one all-reduce for the whole model), so
that the same update leaves the parameters identical on every device.

To get the gradient of the loss averaged over the whole batch of N samples, let each device
compute its loss as the *sum* over its samples divided by N and pass ``weight=1.0``. The
default ``weight = 1 / P`` with per-device mean losses is the same thing when every device
holds N / P samples. With unequal shards, weighting per-device mean losses by N_p / N is
right only for a model without synchronized layers: a synchronized layer's backward mixes
the incoming gradients of all devices before any weight applies, so the layers below it
would get the wrong mixture.

Synchronized normalizers return this device's contributions to their parameter gradients
(sums over its own samples), so this one reduction is also the only one they get.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from refnorm.layer import Layer
from refnorm.sync.comm import check_comm
from refnorm.sync.headers import allreduce


def allreduce_gradients(layers: Iterable[Layer], comm: Any, *, weight: float | None = None) -> None:
    """Replace each ``layer.grads[k]`` by ``sum_p weight_p * grads_p[k]`` over the devices.

    Parameters
    ----------
    layers : iterable of Layer
        The model's layers, in the same order on every device.
    comm : communicator
    weight : float, optional
        This device's weight; default ``1 / comm.size`` (the mean over devices; see the
        module docstring for unequal shards).
    """
    check_comm(comm)
    layers = list(layers)
    for layer in layers:
        if not isinstance(getattr(layer, "grads", None), dict):
            raise TypeError(f"layers must be layers, each with its grads dict; got "
                            f"{type(layer).__name__}")
    w = 1.0 / comm.size if weight is None else float(weight)
    keys = [(i, k) for i, layer in enumerate(layers) for k in sorted(layer.grads)]
    summed = allreduce(comm, [layers[i].grads[k] * w for i, k in keys], op="allreduce_gradients")
    for (i, k), g in zip(keys, summed, strict=True):
        layers[i].grads[k] = g
