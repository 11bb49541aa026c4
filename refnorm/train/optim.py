"""SGD with momentum and weight decay, and the learning-rate schedules the trainer uses.

The update is PyTorch's ``torch.optim.SGD`` (dampening 0, not Nesterov):

    g <- g + weight_decay * p        (only for convolution and linear weights)
    v <- momentum * v + g
    p <- p - lr * v

Weight decay applies to the weights of convolutions and linear maps (parameters named
``w``, Weight Standardization's included), not to normalizer scales and shifts, biases, SN
control parameters or TReLU thresholds, whose decay would pull them towards values with no
special meaning, and not to the directions ``v`` of Weight Normalization, NP and TReLU: the
layer's output does not depend on their length, so decay would only shrink them and raise the
effective learning rate (Gitman & Ginsburg used no weight decay for WN).
"""

from __future__ import annotations

import math

import numpy as np

from refnorm.backend import Array, array_namespace

DECAYED = ("w",)


class SGD:
    """Momentum SGD over a model's parameters, keyed by ``"<layer index>/<name>"``.

    The momentum of each parameter is created in the parameter's namespace and on its
    device (``xp.zeros_like``), and every update stays there: the optimizer never copies
    to the host.
    """

    def __init__(self, model, *, lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0) -> None:
        finite = all(math.isfinite(v) for v in (lr, momentum, weight_decay))
        if not (finite and lr > 0 and 0 <= momentum < 1 and weight_decay >= 0):
            raise ValueError(f"need finite lr > 0, 0 <= momentum < 1, weight_decay >= 0; got "
                             f"lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        self.model, self.lr, self.momentum, self.weight_decay = model, lr, momentum, weight_decay
        self.velocity = {key: array_namespace(layer.params[name]).zeros_like(layer.params[name])
                         for key, layer, name in model.named_params()}

    def step(self, grads: dict, lr: float) -> None:
        """Apply one update with gradients ``grads[key]`` at learning rate ``lr``.

        Parameters and momentum are replaced by new arrays, never written into, so a caller
        holding the old ones can put them back.

        Parameters
        ----------
        grads : dict of str to array
            One gradient per key of ``model.named_params()`` (``"<layer index>/<name>"``), in
            the parameter's namespace, shape and device.
        lr : float
            The learning rate of this step (the schedule's; ``self.lr`` is its base).
        """
        for key, layer, name in self.model.named_params():
            self.update(key, layer, name, grads[key], lr)

    def update(self, key: str, layer, name: str, g: Array, lr: float) -> None:
        """Update one parameter, ``layer.params[name]`` (keyed ``key``), with gradient ``g``
        (an array of the parameter's namespace, shape and device)."""
        p = layer.params[name]
        xp = array_namespace(p, g)
        # An overflow becomes an infinity that the trainer's check after the update names
        # (refnorm.train.finite): numpy's warning would only repeat it, less precisely.
        with np.errstate(over="ignore", invalid="ignore"):
            if self.weight_decay and name in DECAYED:
                g = g + self.weight_decay * p
            v = self.momentum * self.velocity[key] + g
            self.velocity[key] = xp.astype(v, p.dtype, copy=False)
            layer.params[name] = xp.astype(p - lr * v, p.dtype, copy=False)


def learning_rate(schedule: str, base: float, step: int, total: int) -> float:
    """The learning rate at optimizer step ``step`` of ``total``.

    "cosine": base * (1 + cos(pi * step / total)) / 2; "linear": base * (1 - step / total);
    "constant": base.
    """
    t = min(step / max(total, 1), 1.0)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return base * (1.0 - t)
    if schedule == "constant":
        return base
    raise ValueError(f"schedule must be 'cosine', 'linear' or 'constant'; got {schedule!r}")
