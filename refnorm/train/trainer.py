"""Training the conv-net: micro-batches, gradient accumulation, checkpoints, resume.

The normalizers see *micro-batches* of ``batch_size`` samples (their batch statistics come
from those), while each optimizer step sees ``accumulation`` micro-batches: the papers'
"iteration size", which keeps the update the same while the per-device batch shrinks.

Everything is seeded: the order of the training set in epoch e is
``default_rng([seed, e]).permutation``, and so are the batches the SN batch average sees;
parameters start from ``seed``. A run resumed from a checkpoint therefore ends with bitwise
the same parameters as an uninterrupted one.

The loop reads in three levels: :func:`train` (set up or resume, then epochs),
:func:`run_epoch` (the steps of one epoch, evaluation, checkpoint) and :func:`train_step`
(one optimizer update). What a run promises, and where it is kept:

- *Interruptions take effect at a step boundary.* SIGINT (Ctrl-C) and SIGTERM only set a
  flag (:mod:`refnorm.train.interrupt`), read before every step: the run saves a checkpoint
  there and returns ``interrupted``. A ``KeyboardInterrupt`` raised inside a step (a run
  outside the main thread, a hook) undoes the step instead.
- *Nothing non-finite is kept.* After every update the parameters, their gradients, the
  momentum and every layer's state are checked, one float64 sum per array (a NaN or an
  infinity anywhere makes the sum non-finite, and float32 values cannot overflow it); the
  first non-finite value stops the run with :class:`NonFinite` naming the layer and the
  array. A checkpoint is written only after that check, and :func:`save_checkpoint` checks
  again, so no checkpoint ever holds a non-finite value.
- *One writer per output folder, checked first.* The folder is created, locked and tried
  with a write as large as the run's outputs before any data is trained on
  (:mod:`refnorm.train.folder`); every file is written atomically through a uniquely named
  temporary file.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import importlib
import io
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refnorm.backend import Array, array_namespace, device_of, on_device, to_numpy
from refnorm.dispatch import get_path
from refnorm.inference import batch_average
from refnorm.nn import softmax_cross_entropy, softmax_cross_entropy_backward
from refnorm.norms.switchable_norm import SwitchableNorm
from refnorm.train.data import Dataset, load, standardize
from refnorm.train.folder import (
    FolderLock,
    OutputFolderError,
    atomic_write,
    check_room,
    prepare_folder,
    remove_stale_temporaries,
    warn,
)
from refnorm.train.interrupt import DeferredSignals
from refnorm.train.model import NORMS, WEIGHTS, ConvNet
from refnorm.train.optim import SGD, learning_rate
from refnorm.weights import WeightNorm

CHECKPOINT = "checkpoint.npz"
OUTPUTS = (CHECKPOINT, "metrics.json", "metrics.csv", "curves.png", ".room-check")
# 2: every layer's state is saved as it is (SN's population readiness included); format 1
# kept readiness in a list of its own.
FORMAT = 2
# Room the outputs beside the checkpoint need: metrics.json, metrics.csv and curves.png of a
# long run (measured: curves.png of 100 epochs is ~40 KiB, the metrics ~60 KiB).
OUTPUTS_BYTES = 256 * 1024


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run (and must match when resuming)."""

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

    def __post_init__(self) -> None:
        for name in ("batch_size", "accumulation", "epochs", "average_samples", "num_groups"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("seed", self.seed, low=0)
        if self.train_subset is not None:
            _check_int("train_subset", self.train_subset, low=1)
        if not (isinstance(self.widths, tuple) and self.widths):
            raise ValueError(f"widths must be a non-empty tuple of ints; got {self.widths!r}")
        for w in self.widths:
            _check_int("every width", w, low=1)
        for name, low, high in (("lr", 0.0, math.inf), ("momentum", 0.0, 1.0),
                                ("weight_decay", 0.0, math.inf)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or not low <= value < high
                    or (name == "lr" and value == 0)):
                bounds = "> 0" if name == "lr" else f"in [{low:g}, {high:g})"
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

    @property
    def update_size(self) -> int:
        """Samples per optimizer update: ``batch_size * accumulation``."""
        return self.batch_size * self.accumulation

    def describe(self) -> str:
        method = self.norm + (f"+{self.weight}" if self.weight else "")
        return (f"{method} batch {self.batch_size} x {self.accumulation} accumulation, "
                f"{self.epochs} epochs, lr {self.lr}, seed {self.seed}")


def _check_int(name: str, value: object, *, low: int) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")


class NonFinite(RuntimeError):
    """A NaN or an infinity appeared (in the loss, a parameter, a gradient, the momentum or
    a layer's state); the run stopped.

    Attributes
    ----------
    what : str
        The array or value, e.g. ``"layer 1 (BatchNorm) state running_var"``.
    value : float
        The first non-finite value found in it.
    """

    def __init__(self, what: str, value: float, *, where: str = "", kept: str = "",
                 reason: str | None = None) -> None:
        self.what, self.value, self.where, self.kept = what, value, where, kept
        self.reason = reason
        if reason is not None:
            text = f"{where}: {reason}" if where else reason
        else:
            text = f"{what} became {value}" + (f" {where}" if where else "")
        super().__init__(text + "; the run stopped" + (f"; {kept}" if kept else ""))

    def moved(self, *, where: str | None = None, kept: str | None = None) -> NonFinite:
        """The same finding, placed in the run (``where``) or with what is kept."""
        return NonFinite(self.what, self.value, where=self.where if where is None else where,
                         kept=self.kept if kept is None else kept, reason=self.reason)


class CheckpointError(ValueError):
    """A checkpoint could not be read, or belongs to another configuration."""


@dataclass(frozen=True)
class Totals:
    """Sums over the training samples of an epoch so far (its running loss and accuracy).

    Attributes
    ----------
    loss : float
        Sum of the per-sample cross-entropies, in training mode.
    correct : int
        How many of those samples the network classified correctly.
    samples : int
        How many samples the sums cover.
    """

    loss: float = 0.0
    correct: int = 0
    samples: int = 0

    def __add__(self, other: Totals) -> Totals:
        return Totals(self.loss + other.loss, self.correct + other.correct,
                      self.samples + other.samples)

    def mean_loss(self) -> float:
        return self.loss / max(self.samples, 1)

    def accuracy(self) -> float:
        return self.correct / max(self.samples, 1)


@dataclass(frozen=True)
class Position:
    """Where training stands at a step boundary: with the arrays, what a checkpoint holds.

    Attributes
    ----------
    epoch : int
        Epochs finished.
    step : int
        Optimizer steps finished in epoch ``epoch`` (counted from 0).
    totals : Totals
        Running sums over those steps.
    history : tuple of dict
        One row of metrics per finished epoch.
    """

    epoch: int = 0
    step: int = 0
    totals: Totals = field(default_factory=Totals)
    history: tuple[dict, ...] = ()


@dataclass
class Result:
    """What :func:`train` returns.

    Attributes
    ----------
    interrupted : bool
        The run stopped early on a signal (or ``KeyboardInterrupt``) at a step boundary,
        where a checkpoint was saved (with an output folder).
    signal : int or None
        The signal that stopped it (``signal.SIGINT`` also for a ``KeyboardInterrupt``).
    """

    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    model: ConvNet | None = None
    interrupted: bool = False
    signal: int | None = None


@dataclass
class Run:
    """What one run works with, built once by :func:`train` and passed to each epoch.

    ``saved`` is the position of the checkpoint in ``out`` that this run wrote or resumed
    from (None while there is none); ``signals`` records SIGINT and SIGTERM.
    """

    config: TrainConfig
    data: Dataset
    model: ConvNet
    opt: SGD
    out: Path | None
    bar: Progress
    signals: DeferredSignals
    on_step: Callable[[int, int, ConvNet], None] | None = None
    saved: Position | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data.y_train) // self.config.update_size

    def learning_rate(self, epoch: int, step: int) -> float:
        """The learning rate of optimizer step ``step`` of epoch ``epoch``."""
        c, steps = self.config, self.steps_per_epoch
        return learning_rate(c.schedule, c.lr, epoch * steps + step, steps * c.epochs)


class _Interrupted(Exception):
    """A signal or Ctrl-C; ``position`` is the step boundary to save."""

    def __init__(self, position: Position, signum: int) -> None:
        super().__init__(position)
        self.position, self.signum = position, signum


# -- the loop ---------------------------------------------------------------------------------


def build_model(config: TrainConfig, data: Dataset) -> ConvNet:
    """The run's model, its arrays in numpy (``device="cpu"``) or CuPy (``"gpu"``), its layers
    on the fast path unless the process chose another (``--path``, ``REFNORM_PATH``)."""
    options = {"inference": config.sn_inference} if config.norm in ("sn", "syncsn") else {}
    xp = importlib.import_module("cupy") if config.device == "gpu" else np
    return ConvNet(in_channels=data.x_train.shape[1], num_classes=data.num_classes,
                   norm=config.norm, weight=config.weight, widths=config.widths,
                   num_groups=config.num_groups, norm_options=options, seed=config.seed,
                   dtype=np.dtype(config.dtype).type, xp=xp, path=get_path(default="fast"))


def prepare_data(config: TrainConfig) -> Dataset:
    data = standardize(load(config.data))
    if config.train_subset is not None:
        keep = np.random.default_rng([config.seed, 2**20]).permutation(len(data.y_train))
        keep = np.sort(keep[:config.train_subset])
        data = dataclasses.replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])
    return data


def train(
    config: TrainConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, int, ConvNet], None] | None = None,
    data: Dataset | None = None,
) -> Result:
    """Train ``config``; write metrics, curves and checkpoints to ``out`` if given.

    Parameters
    ----------
    config : TrainConfig
    out : directory, optional
        Where ``metrics.csv``, ``metrics.json``, ``curves.png`` and ``checkpoint.npz`` go.
        The run holds its lock (``train.lock``) until it returns.
    resume : bool
        Continue from ``out/checkpoint.npz`` (which must exist and match ``config``).
    progress : bool
        Print a progress bar to stderr.
    on_step : callable, optional
        ``on_step(epoch, step, model)`` after every optimizer step (tests use it to interrupt
        a run or to break a model).
    data : Dataset, optional
        Use these arrays instead of loading ``config.data`` (they are used as given).

    Returns
    -------
    Result; ``interrupted`` is True after SIGINT, SIGTERM or Ctrl-C (a checkpoint was saved
    at the step boundary), ``signal`` says which.

    Raises
    ------
    NonFinite
        If a NaN or an infinity appeared; the message names the array and says which
        checkpoint is kept, or that none was written.
    OutputFolderError
        Before training, if ``out`` is a file, under a file, unwritable, full or locked by a
        live run; during it, if a write fails (the previous checkpoint is kept).
    CheckpointError
        If ``resume`` finds no usable checkpoint for this configuration.
    ValueError
        If the data cannot train this network (too few samples for one update, an empty test
        set, images too small for its pooling).
    """
    with DeferredSignals() as signals:
        if resume and out is not None and not Path(out).is_dir():
            raise CheckpointError(f"no checkpoint to resume from: {out} is not a folder")
        folder = None if out is None else prepare_folder(out)
        with nullcontext() if folder is None else FolderLock(folder, notice=warn):
            if folder is not None:
                remove_stale_temporaries(folder, OUTPUTS)
            run = _setup(config, folder, signals, progress=progress, on_step=on_step,
                         data=data)
            position = _starting_position(run, resume)
            try:
                while position.epoch < config.epochs:
                    position = run_epoch(run, position)
                if folder is not None and position.history:
                    history = list(position.history)
                    _write(run, lambda: write_metrics(folder, history, curves=True))
            except _Interrupted as stop:
                return _interrupt(run, stop.position, stop.signum)
            except NonFinite as exc:
                raise exc.moved(kept=_kept(run)) from None
            return Result(config, list(position.history), run.model)


def _setup(config: TrainConfig, out: Path | None, signals: DeferredSignals, *, progress: bool,
           on_step: Callable[[int, int, ConvNet], None] | None, data: Dataset | None) -> Run:
    data = prepare_data(config) if data is None else data
    check_data(config, data)
    model = build_model(config, data)
    opt = SGD(model, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if out is not None:
        check_room(out, checkpoint_bytes(model, opt) + OUTPUTS_BYTES)
    return Run(config, data, model, opt, out, Progress(enabled=progress), signals, on_step)


def check_data(config: TrainConfig, data: Dataset) -> None:
    """Refuse data this network cannot train on, before training.

    Raises
    ------
    ValueError
        If the training set is smaller than one update, the test set is empty, the test
        images have another shape than the training images, or the images are too small for
        the network's max-pools (each block but the last halves the size).
    """
    if len(data.y_train) < config.update_size:
        raise ValueError(f"one update needs batch_size * accumulation = {config.update_size} "
                         f"samples; the training set has {len(data.y_train)}")
    if len(data.y_test) == 0:
        raise ValueError(f"the test set of {data.name} is empty: every epoch is evaluated on "
                         "it, so it needs at least one sample")
    if data.x_test.shape[1:] != data.x_train.shape[1:]:
        raise ValueError(f"test images are {data.x_test.shape[1:]} (C, H, W) but training "
                         f"images are {data.x_train.shape[1:]}")
    pools = len(config.widths) - 1
    smallest = 2 ** pools
    if min(data.x_train.shape[2:]) < smallest:
        h, w = data.x_train.shape[2:]
        raise ValueError(f"images of {h}x{w} are too small for {len(config.widths)} blocks: "
                         f"their {pools} 2x2 max-pools need at least {smallest}x{smallest}")


def checkpoint_bytes(model: ConvNet, opt: SGD) -> int:
    """About the size of a checkpoint of ``model``: its arrays, plus 64 KiB for the archive's
    headers and the metadata (a long run's history)."""
    arrays = checkpoint_arrays(model, opt).values()
    return sum(to_numpy(a).nbytes for a in arrays) + 64 * 1024


def _starting_position(run: Run, resume: bool) -> Position:
    if not resume:
        data_dependent_init(run.model, run.data, run.config)
        return Position()
    if run.out is None:
        raise CheckpointError("resume needs the output directory of the run to continue")
    run.saved = load_checkpoint(run.out / CHECKPOINT, run.config, run.model, run.opt,
                                steps_per_epoch=run.steps_per_epoch)
    return run.saved


def _interrupt(run: Run, position: Position, signum: int) -> Result:
    """A signal or Ctrl-C: save where training stands (a step boundary) and stop."""
    if run.out is not None and not _same_place(run.saved, position):
        _save(run, position)
    name = {2: "Ctrl-C (SIGINT)", 15: "SIGTERM"}.get(signum, f"signal {signum}")
    where = f"stopped by {name} {_where(position)}"
    run.bar.close(where + (f": checkpoint saved in {run.out}; continue with --resume"
                           if run.out is not None else ""))
    return Result(run.config, list(position.history), run.model, interrupted=True,
                  signal=signum)


def _same_place(a: Position | None, b: Position) -> bool:
    return a is not None and (a.epoch, a.step) == (b.epoch, b.step)


def _where(position: Position) -> str:
    if position.step == 0:
        return f"after epoch {position.epoch}" if position.epoch else "before the first step"
    return f"at step {position.step} of epoch {position.epoch + 1}"


def _kept(run: Run) -> str:
    """What a stopped run leaves: which checkpoint, or that none was written."""
    if run.out is None:
        return "no checkpoint was written (no output folder)"
    if run.saved is None:
        earlier = (f" (the {CHECKPOINT} in {run.out} is from an earlier run)"
                   if (run.out / CHECKPOINT).exists() else "")
        return "no checkpoint was written" + earlier
    return (f"the checkpoint {_where(run.saved)} in {run.out} is kept (it holds only finite "
            "values)")


def _stop_if_signalled(run: Run, position: Position) -> None:
    if run.signals.received is not None:
        raise _Interrupted(position, run.signals.received)


def run_epoch(run: Run, position: Position) -> Position:
    """Finish epoch ``position.epoch``: its remaining steps, its evaluation, its checkpoint.

    Returns the position at the start of the next epoch. A signal received so far is acted
    on before each step and before the evaluation: ``_Interrupted`` carries the step
    boundary to save (an evaluation not yet run is run on resume).
    """
    config, group = run.config, run.config.update_size
    order = np.random.default_rng([config.seed, position.epoch]).permutation(
        len(run.data.y_train))
    started = time.perf_counter()
    while position.step < run.steps_per_epoch:
        _stop_if_signalled(run, position)
        picked = order[position.step * group:(position.step + 1) * group]
        lr = run.learning_rate(position.epoch, position.step)
        try:
            totals = train_step(run.model, run.opt, run.data.x_train[picked],
                                run.data.y_train[picked], config=config, lr=lr)
        except KeyboardInterrupt:
            raise _Interrupted(position, 2) from None  # the step undid itself
        except NonFinite as exc:
            raise exc.moved(where=f"in step {position.step + 1} of epoch "
                                  f"{position.epoch + 1}") from None
        except ValueError as exc:
            # The data and the network were checked before training, and earlier steps ran:
            # a layer refusing its numbers now (a variance overflowing float32) is divergence.
            raise NonFinite("a layer's statistics", math.inf, reason=str(exc),
                            where=f"in step {position.step + 1} of epoch "
                                  f"{position.epoch + 1}") from None
        position = dataclasses.replace(position, step=position.step + 1,
                                       totals=position.totals + totals)
        try:
            run.bar.update(position, config.epochs, run.steps_per_epoch)
            if run.on_step is not None:
                run.on_step(position.epoch, position.step, run.model)
        except KeyboardInterrupt:
            raise _Interrupted(position, 2) from None
    _stop_if_signalled(run, position)
    try:
        row = evaluate(run, position, seconds=time.perf_counter() - started)
    except KeyboardInterrupt:
        raise _Interrupted(position, 2) from None
    except NonFinite as exc:
        raise exc.moved(where=f"in the evaluation of epoch {position.epoch + 1}") from None
    position = Position(position.epoch + 1, 0, Totals(), (*position.history, row))
    run.bar.epoch_done(row)
    if run.out is not None:
        out, history = run.out, list(position.history)
        try:
            _save(run, position)
            _write(run, lambda: write_metrics(out, history))
        except KeyboardInterrupt:
            raise _Interrupted(position, 2) from None
    return position


def _save(run: Run, position: Position) -> None:
    path = run.out / CHECKPOINT if run.out is not None else None
    assert path is not None
    _write(run, lambda: save_checkpoint(path, run.config, run.model, run.opt, position))
    run.saved = position


def _write(run: Run, write: Callable[[], None]) -> None:
    """Run ``write``; a failed write (a full disk) becomes one sentence naming what is kept."""
    try:
        write()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == 28:  # ENOSPC
            reason = "the disk is full (no space left on device)"
        raise OutputFolderError(f"cannot write to the output folder {run.out}: {reason}; "
                                f"{_kept(run)}") from None


def on_model(model: ConvNet, a: Any) -> Array:
    """``a`` (a numpy batch, or an array already there) in the model's namespace and on its
    device: one host-to-device copy for a numpy batch and a GPU or array_api_strict model,
    none for a numpy model."""
    return model.xp.asarray(a, **on_device(model.device))


def train_step(model: ConvNet, opt: SGD, x: Any, y: Any, *,
               config: TrainConfig, lr: float) -> Totals:
    """One optimizer update: the micro-batches of ``x``, their mean gradient, one SGD step.

    ``x`` and ``y`` are moved once onto the model's namespace and device (:func:`on_model`);
    the forward, the backward and the update then run there, and only the loss and the
    count of correct predictions come back to the host (two scalars per micro-batch).

    Parameters
    ----------
    model, opt : the network and its optimizer
    x : array (batch_size * accumulation, C, H, W)
        The update's samples, in micro-batch order (numpy, or already on the model's device).
    y : int array (batch_size * accumulation,)
        Their labels.
    config : TrainConfig
        Gives ``batch_size`` (samples per micro-batch) and ``accumulation``.
    lr : float
        This step's learning rate.

    Returns
    -------
    Totals of the update's samples (training-mode loss and accuracy)

    Raises
    ------
    NonFinite
        If a micro-batch's loss, a gradient, or after the update a parameter, the momentum
        or a layer's state is not finite (a gradient is checked before it is applied).
    KeyboardInterrupt
        Re-raised after undoing the step: the layers' states (running statistics) are
        restored, and the parameters and momentum are the arrays from before the step
        (:class:`~refnorm.train.optim.SGD` replaces arrays, never writes into them).
    """
    layers = model.layers()
    states = [copy.deepcopy(layer.state) for layer in layers]
    params = [dict(layer.params) for layer in layers]
    velocity = dict(opt.velocity)
    try:
        grads, totals = accumulate_gradients(model, on_model(model, x), on_model(model, y),
                                             config)
        check_finite(named_gradients(model, grads))
        opt.step(grads, lr)
    except KeyboardInterrupt:
        for layer, state, before in zip(layers, states, params, strict=True):
            layer.state = state
            layer.params.update(before)
        opt.velocity.update(velocity)
        raise
    check_finite(named_arrays(model, opt))
    return totals


def accumulate_gradients(model: ConvNet, x: Array, y: Array,
                         config: TrainConfig) -> tuple[dict[str, Array], Totals]:
    """Forward and backward over the micro-batches of ``x``; return their mean gradient.

    Each micro-batch's loss is its mean cross-entropy; its gradient divided by
    ``accumulation`` makes the sum over micro-batches their mean.

    Parameters
    ----------
    x : array (batch_size * accumulation, C, H, W)
    y : int array (batch_size * accumulation,)
        Both on the model's namespace and device (:func:`on_model`).

    Returns
    -------
    dict of key to array (the parameter's shape), keyed as :meth:`ConvNet.named_params`;
    Totals of the samples
    """
    grads: dict[str, Array] = {}
    totals = Totals()
    xp = model.xp
    for start in range(0, y.shape[0], config.batch_size):
        xb, yb = x[start:start + config.batch_size, ...], y[start:start + config.batch_size]
        logits = model.forward(xb, training=True)                        # (b, classes)
        loss, cache = softmax_cross_entropy(logits, yb)
        if not math.isfinite(float(loss)):
            raise NonFinite("the training loss", float(loss))
        model.backward(softmax_cross_entropy_backward(cache) / config.accumulation)
        for key, layer, name in model.named_params():
            g = layer.grads[name]
            grads[key] = g if key not in grads else grads[key] + g
        correct = int(xp.sum(xp.astype(xp.argmax(logits, axis=1) == yb, xp.int64)))
        totals = totals + Totals(float(loss) * yb.shape[0], correct, yb.shape[0])
    return grads, totals


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


def evaluate(run: Run, position: Position, *, seconds: float) -> dict:
    """The metrics row of epoch ``position.epoch`` (after its last step).

    With SN's batch average, the population statistics are set first from seeded training
    batches (:func:`average_batches`). Accuracies are in evaluation mode, except
    ``train_acc_running``, the training-mode accuracy over the epoch's steps.
    """
    config, model, data = run.config, run.model, run.data
    if config.norm in ("sn", "syncsn") and config.sn_inference == "batch_average":
        batches = average_batches(config, data, position.epoch)
        batch_average(model, [on_model(model, b) for b in batches])
    check_finite(named_arrays(model, run.opt))  # the batch average set new statistics
    test_logits = predict(model, data.x_test)
    test_loss, _ = softmax_cross_entropy(test_logits, data.y_test)
    train_logits = predict(model, data.x_train)
    row = {
        "epoch": position.epoch + 1,
        "lr": run.learning_rate(position.epoch, run.steps_per_epoch - 1),
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


# -- finiteness ---------------------------------------------------------------------------------


def is_finite(a: Any) -> bool:
    """Whether every value of ``a`` is finite: one float64 sum (NaN and inf propagate into it;
    float16/float32 values cannot overflow it), confirmed element-wise only when the sum is
    not finite, so that huge finite float64 values are not taken for infinities. Arrays that
    are not floating point (integers, flags) are always finite. An array of another
    namespace (CuPy, array_api_strict) is checked on its own device: only the sum, and the
    answer of the element-wise check, come to the host."""
    if not isinstance(a, (np.ndarray, np.generic, float, int)):
        xp = array_namespace(a)
        if not xp.isdtype(a.dtype, "real floating"):
            return True
        if math.isfinite(float(xp.sum(xp.astype(a, xp.float64)))):
            return True
        return bool(xp.all(xp.isfinite(a)))
    a = np.asarray(a)
    if a.dtype.kind != "f":
        return True
    with np.errstate(over="ignore", invalid="ignore"):  # inf + -inf: the sum is NaN, quietly
        if math.isfinite(float(np.sum(a, dtype=np.float64))):
            return True
    return bool(np.all(np.isfinite(a)))


def _first_bad(a: Any) -> float:
    flat = to_numpy(a).ravel()  # an error message: a copy to the host is fine
    return float(flat[np.flatnonzero(~np.isfinite(flat))[0]])


def check_finite(arrays: Iterator[tuple[str, Any]]) -> None:
    """Raise :class:`NonFinite` for the first named array holding a NaN or an infinity."""
    for what, a in arrays:
        if not is_finite(a):
            raise NonFinite(what, _first_bad(a))


def _layer_name(i: int, layer: Any) -> str:
    return f"layer {i} ({type(layer).__name__})"


def named_arrays(model: ConvNet, opt: SGD) -> Iterator[tuple[str, Any]]:
    """(name, array) for every parameter, its momentum and every state array of ``model``."""
    for i, layer in enumerate(model.layers()):
        for name, value in layer.params.items():
            yield f"{_layer_name(i, layer)} parameter {name}", value
            yield f"{_layer_name(i, layer)} momentum of {name}", opt.velocity[f"{i}/{name}"]
        for name, value in layer.state.items():
            yield f"{_layer_name(i, layer)} state {name}", value


def named_gradients(model: ConvNet, grads: dict[str, Array]) -> Iterator[tuple[str, Any]]:
    """(name, gradient) for every parameter; ``grads`` keyed as :meth:`ConvNet.named_params`."""
    for i, layer in enumerate(model.layers()):
        for name in layer.params:
            yield f"{_layer_name(i, layer)} gradient of {name}", grads[f"{i}/{name}"]


# -- outputs ------------------------------------------------------------------------------------


def write_metrics(out: Path, history: list[dict], *, curves: bool = False) -> None:
    """``metrics.json`` (strict JSON: a NaN or an infinity is written as null) and
    ``metrics.csv`` (one row per epoch); ``curves.png`` if asked."""
    text = strict_json(history, indent=2)
    atomic_write(out / "metrics.json", lambda f: f.write(text.encode()))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for r in history for k in r)))
    writer.writeheader()
    writer.writerows(history)
    atomic_write(out / "metrics.csv", lambda f: f.write(table.getvalue().encode()))
    if curves:
        plot_curves(history, out / "curves.png")


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], label="test")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["train_acc"] for r in history], label="train (eval mode)")
    ax_acc.plot(epochs, [r["test_acc"] for r in history], label="test")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def strict_json(value: Any, **options: Any) -> str:
    """``json.dumps`` that never writes ``NaN`` or ``Infinity`` (not JSON): they become null."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False, **options)


# -- checkpoints --------------------------------------------------------------------------------


def _config_dict(config: TrainConfig) -> dict:
    d = dataclasses.asdict(config)
    d["widths"] = list(d["widths"])
    return d


def checkpoint_arrays(model: ConvNet, opt: SGD) -> dict[str, Any]:
    """What a checkpoint stores besides its metadata, by key: ``param/<i>/<name>``,
    ``velocity/<i>/<name>`` and ``state/<i>/<name>``."""
    arrays: dict[str, Any] = {}
    for key, layer, name in model.named_params():
        arrays[f"param/{key}"] = layer.params[name]
        arrays[f"velocity/{key}"] = opt.velocity[key]
    for i, layer in enumerate(model.layers()):
        for name, value in layer.state.items():
            arrays[f"state/{i}/{name}"] = value
    return arrays


def save_checkpoint(path: Path, config: TrainConfig, model: ConvNet, opt: SGD,
                    position: Position) -> None:
    """Write parameters, momentum, every layer's state and ``position``, atomically.

    Arrays on a GPU or another device are copied to the host first
    (:func:`~refnorm.backend.to_numpy`): a checkpoint is numpy arrays whatever the device it
    was saved from, and loads onto any device (:func:`load_checkpoint`).

    Raises
    ------
    NonFinite
        Before writing anything, if an array holds a NaN or an infinity.
    """
    arrays: dict[str, Any] = {key: to_numpy(a) for key, a in checkpoint_arrays(model, opt).items()}
    check_finite(iter(arrays.items()))
    meta = {"format": FORMAT, "config": _config_dict(config), "epoch": position.epoch,
            "step": position.step, "totals": dataclasses.asdict(position.totals),
            "history": list(position.history)}
    arrays["meta"] = np.frombuffer(strict_json(meta).encode(), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path: Path, config: TrainConfig, model: ConvNet, opt: SGD, *,
                    steps_per_epoch: int | None = None) -> Position:
    """Restore a checkpoint of ``config`` into ``model`` and ``opt``; return its position.

    Nothing is restored unless the whole checkpoint fits: its metadata has every field
    with a value of the right kind (``epoch`` within the run, ``step`` within an epoch of
    ``steps_per_epoch`` steps if given), and its arrays are exactly the model's, each of the
    model's shape and dtype and finite. Each array is put in the namespace and on the
    device of the model's array it replaces (a checkpoint saved on a GPU loads into a numpy
    model and the other way round).

    Raises
    ------
    CheckpointError
        Naming the field or array that does not fit.
    """
    arrays, meta = _read_checkpoint(path)
    position = _position(path, meta, config, steps_per_epoch)
    expected = checkpoint_arrays(model, opt)
    missing = [k for k in expected if k not in arrays]
    extra = [k for k in arrays if k not in expected]
    if missing or extra:
        parts = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has arrays the model does not: {', '.join(extra)}"] if extra else [])
        raise CheckpointError(f"checkpoint {path} does not match the model: "
                              + "; ".join(parts))
    for key, like in expected.items():
        got, like = arrays[key], to_numpy(like)
        if got.shape != like.shape or got.dtype != like.dtype:
            raise CheckpointError(f"checkpoint {path} does not match the model: {key} is "
                                  f"{got.dtype} {got.shape}, the model's is {like.dtype} "
                                  f"{like.shape}")
        if not is_finite(got):
            raise CheckpointError(f"checkpoint {path}: {key} holds {_first_bad(got)}")
    placed = {key: _beside(arrays[key], like) for key, like in expected.items()}
    for key, layer, name in model.named_params():
        layer.params[name] = placed[f"param/{key}"]
        opt.velocity[key] = placed[f"velocity/{key}"]
    for i, layer in enumerate(model.layers()):
        layer.state = {name: placed[f"state/{i}/{name}"] for name in layer.state}
        layer.reset()  # new parameters and state: no backward on an old cache
    return position


def _beside(a: np.ndarray, like: Array) -> Array:
    """The loaded numpy array ``a`` in the namespace and on the device of ``like``."""
    if isinstance(like, np.ndarray):
        return a
    return array_namespace(like).asarray(a, **on_device(device_of(like)))


_META = {"format": int, "config": dict, "epoch": int, "step": int, "totals": dict,
         "history": list}


def _position(path: Path, meta: Any, config: TrainConfig, steps: int | None) -> Position:
    """The position a checkpoint's metadata gives, after checking every field of it."""
    def refuse(message: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {message}")

    if not isinstance(meta, dict):
        raise refuse(f"its metadata must be a JSON object; got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, "
                              f"expected {FORMAT}")
    for key, kind in _META.items():
        if key not in meta:
            raise refuse(f"its metadata lacks {key!r}")
        if isinstance(meta[key], bool) or not isinstance(meta[key], kind):
            raise refuse(f"metadata {key!r} must be a {kind.__name__}; got {meta[key]!r}")
    saved, wanted = meta["config"], _config_dict(config)
    differ = [f"{k}: checkpoint {saved.get(k)!r}, this run {wanted[k]!r}"
              for k in wanted if saved.get(k) != wanted[k] and k != "device"]  # any device
    if differ:
        raise CheckpointError(f"checkpoint {path} belongs to another configuration; "
                              + "; ".join(differ))
    epoch, step, totals, history = meta["epoch"], meta["step"], meta["totals"], meta["history"]
    if not 0 <= epoch <= config.epochs:
        raise refuse(f"metadata 'epoch' must be in 0..{config.epochs}; got {epoch}")
    last = steps if steps is not None else step
    if not 0 <= step <= last or (epoch == config.epochs and step):
        raise refuse(f"metadata 'step' must be in 0..{last} (0 after the last epoch); "
                     f"got {step}")
    fields: dict[str, type | tuple[type, ...]] = {"loss": (int, float), "correct": int,
                                                  "samples": int}
    if set(totals) != set(fields) or any(
            isinstance(totals[k], bool) or not isinstance(totals[k], kind)
            or not math.isfinite(totals[k]) or totals[k] < 0 for k, kind in fields.items()):
        raise refuse(f"metadata 'totals' must hold finite numbers >= 0 for exactly "
                     f"{', '.join(fields)}; got {totals!r}")
    if len(history) != epoch or not all(isinstance(row, dict) for row in history):
        raise refuse(f"metadata 'history' must hold one row (an object) per finished epoch, "
                     f"{epoch}; got {len(history)} entries")
    return Position(epoch, step, Totals(float(totals["loss"]), totals["correct"],
                                        totals["samples"]), tuple(history))


def _read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], Any]:
    if not path.exists():
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # a truncated or overwritten file: say so, whatever numpy raised
        raise CheckpointError(f"checkpoint {path} is corrupted or not a refnorm checkpoint "
                              f"({type(exc).__name__}: {exc})") from exc
    if "meta" not in arrays:
        raise CheckpointError(f"checkpoint {path} is not a refnorm checkpoint: it has no "
                              "'meta' record")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path}: its 'meta' record is not JSON ({exc})") from None
    return arrays, meta


# -- progress -----------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal; one line per epoch otherwise."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()

    def update(self, position: Position, epochs: int, steps: int) -> None:
        if not self.tty:
            return
        done = int(30 * position.step / steps)
        sys.stderr.write(f"\repoch {position.epoch + 1}/{epochs} [{'#' * done}{'.' * (30 - done)}] "
                         f"loss {position.totals.mean_loss():.3f} "
                         f"acc {position.totals.accuracy():.3f}")
        sys.stderr.flush()

    def epoch_done(self, row: dict) -> None:
        if not self.enabled:
            return
        prefix = "\r" if self.tty else ""
        sys.stderr.write(f"{prefix}epoch {row['epoch']}: train loss {row['train_loss']:.3f}, "
                         f"train acc {row['train_acc']:.3f}, test acc {row['test_acc']:.3f} "
                         f"({row['seconds']:.1f} s){' ' * 10}\n")

    def close(self, message: str) -> None:
        if self.enabled:
            sys.stderr.write(("\n" if self.tty else "") + message + "\n")
