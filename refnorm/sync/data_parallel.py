"""Data-parallel training support: every device's parameter gradients combined once per step.

Each device runs the same model on its own shard, then :func:`allreduce_gradients` replaces
every gradient with the weighted sum over devices (one all-reduce for the whole model), so
that the same update leaves the parameters identical on every device. With per-device losses
that average over their own N_p samples, ``weight = N_p / N`` makes the result the gradient
of the loss averaged over the whole batch; the default ``1 / P`` is right for equal shards.

Synchronized normalizers return this device's contributions to their parameter gradients
(sums over its own samples), so this one reduction is also the only one they get.
"""

from __future__ import annotations

from typing import Any, Iterable

from refnorm.layer import Layer


def allreduce_gradients(layers: Iterable[Layer], comm: Any, *, weight: float | None = None) -> None:
    """Replace each ``layer.grads[k]`` by ``sum_p weight_p * grads_p[k]`` over the devices.

    Parameters
    ----------
    layers : iterable of Layer
        The model's layers, in the same order on every device.
    comm : communicator
    weight : float, optional
        This device's weight; default ``1 / comm.size`` (the mean over devices).
    """
    layers = list(layers)
    w = 1.0 / comm.size if weight is None else float(weight)
    keys = [(i, k) for i, layer in enumerate(layers) for k in sorted(layer.grads)]
    summed = comm.allreduce_sum([layers[i].grads[k] * w for i, k in keys])
    for (i, k), g in zip(keys, summed):
        layers[i].grads[k] = g
