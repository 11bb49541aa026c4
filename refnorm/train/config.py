"""What determines a training run: :class:`TrainConfig` and the checks of its values."""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass

import numpy as np

from refnorm.core.checks import is_int
from refnorm.train.data import check_name
from refnorm.train.model import NORMS, WEIGHTS


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run (and must match when resuming).

    ``batch_size`` is the samples per device in one micro-batch (what a normalizer's batch
    statistics see, the papers' "#samples per GPU"), ``accumulation`` the micro-batches of
    one optimizer step, ``devices`` the data-parallel devices P (the papers' "#GPUs"): a step
    trains on ``devices * batch_size * accumulation`` samples (:attr:`update_size`).

    Every value is checked when the config is made (``TypeError`` for a wrong kind of value,
    ``ValueError`` for a value out of range); ``data`` by its form only (its folder is read
    by :func:`~refnorm.train.loop.train`). numpy's integer and floating scalars are accepted
    and kept as Python's ``int`` and ``float`` (a checkpoint records the config as JSON).

    Attributes
    ----------
    data : str, default "digits"
        The data set: ``"digits"``, ``"mnist:DIR"`` or ``"cifar10:DIR"``.
    norm : {"none", "bn", "in", "ln", "gn", "sn", "syncbn", "syncsn"}, default "bn"
        The activation normalizer after every convolution.
    weight : {None, "ws", "wn", "np", "trelu"}, default None
        The weight-side normalizer of every convolution (None: plain convolutions).
    batch_size : int >= 1, default 32
        Samples per device in one micro-batch.
    accumulation : int >= 1, default 1
        Micro-batches per optimizer step.
    epochs : int >= 1, default 10
    lr : float > 0, default 0.05
        The base learning rate of ``schedule``.
    momentum : float in [0, 1), default 0.9
        SGD momentum.
    weight_decay : float in [0, inf), default 5e-4
    schedule : {"cosine", "linear", "constant"}, default "cosine"
        The learning rate over the optimizer steps (:func:`refnorm.train.optim.learning_rate`).
    seed : int >= 0, default 0
    widths : non-empty tuple of int >= 1, default (16, 32, 32)
        The output channels of the network's blocks.
    num_groups : int >= 1, default 4
        GN's G; with ``norm="gn"`` it must divide every width.
    sn_inference : {"batch_average", "moving_average"}, default "batch_average"
        How SN layers get their BN-scope population statistics.
    average_samples : int >= 1, default 256
        Training samples fed for SN's batch average (at most the training set).
    train_subset : int >= 1 or None, default None
        Train on this many training samples, a random subset drawn from ``seed`` (None:
        all; more than the data set has is refused by :func:`~refnorm.train.loop.train`).
    dtype : {"float32", "float64"}, default "float32"
        The parameters' dtype (a string, not a numpy dtype).
    device : {"cpu", "gpu"}, default "cpu"
    devices : int >= 1, default 1
        Data-parallel devices P.
    """

    data: str = "digits"
    norm: str = "bn"
    weight: str | None = None
    batch_size: int = 32
    accumulation: int = 1
    epochs: int = 10
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    widths: tuple[int, ...] = (16, 32, 32)
    num_groups: int = 4
    sn_inference: str = "batch_average"
    average_samples: int = 256
    train_subset: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    devices: int = 1

    def __post_init__(self) -> None:
        check_name(self.data)
        for name in ("batch_size", "accumulation", "epochs", "average_samples", "num_groups",
                     "devices"):
            check_int(name, getattr(self, name), low=1)
        check_int("seed", self.seed, low=0)
        if self.train_subset is not None:
            check_int("train_subset", self.train_subset, low=1)
        if not isinstance(self.widths, tuple):
            raise TypeError(f"widths must be a non-empty tuple of ints; got {self.widths!r}")
        if not self.widths:
            raise ValueError(f"widths must be a non-empty tuple of ints; got {self.widths!r}")
        for w in self.widths:
            check_int("every width", w, low=1)
        for name, low, high in (("lr", 0.0, math.inf), ("momentum", 0.0, 1.0),
                                ("weight_decay", 0.0, math.inf)):
            value = getattr(self, name)
            bounds = "> 0" if name == "lr" else f"in [{low:g}, {high:g})"
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a finite number {bounds}; got {value!r}")
            try:
                value = float(value)
            except OverflowError:  # an int beyond every float: out of range, as inf is
                value = math.inf
            if not math.isfinite(value) or not low <= value < high or (name == "lr"
                                                                         and value == 0):
                raise ValueError(f"{name} must be a finite number {bounds}; got {value!r}")
        for name, allowed in (("norm", NORMS), ("weight", WEIGHTS),
                              ("schedule", ("cosine", "linear", "constant")),
                              ("sn_inference", ("batch_average", "moving_average")),
                              ("dtype", ("float32", "float64")),
                              ("device", ("cpu", "gpu"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; "
                                 f"got {getattr(self, name)!r}")
        if self.norm == "gn" and any(w % self.num_groups for w in self.widths):
            raise ValueError(f"num_groups={self.num_groups} must divide every width "
                             f"{self.widths} for norm='gn'")
        # numpy's scalars are accepted, Python's int and float kept: a checkpoint records the
        # config in JSON, which takes no numpy scalar (the run failed at its first save)
        for name in ("batch_size", "accumulation", "epochs", "average_samples", "num_groups",
                     "devices", "seed", "train_subset"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, operator.index(getattr(self, name)))
        object.__setattr__(self, "widths", tuple(operator.index(w) for w in self.widths))
        for name in ("lr", "momentum", "weight_decay"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def update_size(self) -> int:
        """Samples per optimizer update (the global batch):
        ``devices * batch_size * accumulation``."""
        return self.devices * self.batch_size * self.accumulation

    @property
    def synchronized(self) -> bool:
        """Whether the normalizers pool their batch statistics over the devices."""
        return self.norm in ("syncbn", "syncsn")

    def describe(self) -> str:
        method = self.norm + (f"+{self.weight}" if self.weight else "")
        on = f"{self.devices} devices x " if self.devices > 1 else ""
        return (f"{method} {on}batch {self.batch_size} x {self.accumulation} accumulation, "
                f"{self.epochs} epochs, lr {self.lr}, seed {self.seed}")


def check_int(name: str, value: object, *, low: int) -> None:
    """An int (numpy's too, not a bool) ``>= low``: ``TypeError`` for another kind of value,
    ``ValueError`` below ``low``, as refnorm's argument checks (:mod:`refnorm.core.checks`)."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int >= {low}; got {value!r}")
    if operator.index(value) < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
