"""The training loop: set up or resume, then epochs of optimizer steps, each evaluated and saved.

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

- *Interruptions take effect at a step boundary* (:mod:`refnorm.train.interrupt`): inside
  the steps, evaluations and saves SIGINT and SIGTERM only set a flag, read before every
  step; the run saves a checkpoint there and returns ``interrupted``. A
  ``KeyboardInterrupt`` raised inside a step (a run outside the main thread, a hook) undoes
  the step instead.
- *Nothing non-finite is kept* (:mod:`refnorm.train.finite`); a checkpoint is written only
  after the check, and :func:`~refnorm.train.checkpoint.save_checkpoint` checks again.
- *One writer per output folder, checked first* (:mod:`refnorm.train.folder`): the folder is
  created, locked and tried with a write as large as the run's outputs before any data is
  trained on; every file is written atomically through a uniquely named temporary file.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import importlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refnorm.backend import Array, to_numpy
from refnorm.nn import softmax_cross_entropy, softmax_cross_entropy_backward
from refnorm.train.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    checkpoint_arrays,
    load_checkpoint,
    save_checkpoint,
)
from refnorm.train.config import TrainConfig
from refnorm.train.data import Dataset, load, standardize
from refnorm.train.evaluate import data_dependent_init, evaluate
from refnorm.train.finite import NonFinite, check_finite, named_arrays, named_gradients
from refnorm.train.folder import (
    FolderLock,
    OutputFolderError,
    check_room,
    prepare_folder,
    remove_stale_temporaries,
    warn,
)
from refnorm.train.interrupt import Signals, signal_name
from refnorm.train.model import ConvNet, on_model
from refnorm.train.optim import SGD, learning_rate
from refnorm.train.outputs import Progress, write_metrics
from refnorm.train.position import Position, Totals

OUTPUTS = (CHECKPOINT, "metrics.json", "metrics.csv", "curves.png", ".room-check")


OUTPUTS_BYTES = 256 * 1024


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
    signals: Signals
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


def build_model(config: TrainConfig, data: Dataset) -> ConvNet:
    """The run's model, its arrays in numpy (``device="cpu"``) or CuPy (``"gpu"``)."""
    options = {"inference": config.sn_inference} if config.norm in ("sn", "syncsn") else {}
    xp = importlib.import_module("cupy") if config.device == "gpu" else np
    return ConvNet(in_channels=data.x_train.shape[1], num_classes=data.num_classes,
                   norm=config.norm, weight=config.weight, widths=config.widths,
                   num_groups=config.num_groups, norm_options=options, seed=config.seed,
                   dtype=np.dtype(config.dtype).type, xp=xp)


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
    with Signals() as signals, ExitStack() as stack:
        if resume and out is not None and not Path(out).is_dir():
            raise CheckpointError(f"no checkpoint to resume from: {out} is not a folder")
        with signals.deferred():  # creating and locking the folder is not left half-done
            folder = None if out is None else prepare_folder(out)
            if folder is not None:
                stack.enter_context(FolderLock(folder, notice=warn))
                remove_stale_temporaries(folder, OUTPUTS)
        signals.raise_if_received()
        # Loading the data and reading a checkpoint stay interruptible (a signal raises
        # Interrupted there); from the first step on, signals wait for a step boundary.
        run = _setup(config, folder, signals, progress=progress, on_step=on_step, data=data)
        position = _starting_position(run, resume)
        with signals.deferred():
            return _run_epochs(run, position)


def _run_epochs(run: Run, position: Position) -> Result:
    """The epochs from ``position`` on, the final metrics; a stop saves at its boundary."""
    try:
        while position.epoch < run.config.epochs:
            position = run_epoch(run, position)
        if run.out is not None and position.history:
            out, history = run.out, list(position.history)
            _write(run, lambda: write_metrics(out, history, curves=True))
    except _Interrupted as stop:
        return _interrupt(run, stop.position, stop.signum)
    except NonFinite as exc:
        raise exc.moved(kept=_kept(run)) from None
    return Result(run.config, list(position.history), run.model)


def _setup(config: TrainConfig, out: Path | None, signals: Signals, *, progress: bool,
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
    where = f"stopped by {signal_name(signum)} {_where(position)}"
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
        with _boundary(position):  # a KeyboardInterrupt inside: the step undid itself
            try:
                totals = train_step(run.model, run.opt, run.data.x_train[picked],
                                    run.data.y_train[picked], config=config, lr=lr)
            except NonFinite as exc:
                raise exc.moved(where=f"in step {position.step + 1} of epoch "
                                      f"{position.epoch + 1}") from None
            except ValueError as exc:
                # The data and the network were checked before training, and earlier steps
                # ran: a layer refusing its numbers now (a variance overflowing float32) is
                # divergence.
                raise NonFinite("a layer's statistics", math.inf, reason=str(exc),
                                where=f"in step {position.step + 1} of epoch "
                                      f"{position.epoch + 1}") from None
        position = dataclasses.replace(position, step=position.step + 1,
                                       totals=position.totals + totals)
        with _boundary(position):
            run.bar.update(position, config.epochs, run.steps_per_epoch)
            if run.on_step is not None:
                run.on_step(position.epoch, position.step, run.model)
    _stop_if_signalled(run, position)
    with _boundary(position):  # an evaluation not yet run is run on resume
        try:
            row = evaluate(run.model, run.opt, run.data, config, position=position,
                           lr=run.learning_rate(position.epoch, run.steps_per_epoch - 1),
                           seconds=time.perf_counter() - started)
        except NonFinite as exc:
            raise exc.moved(where=f"in the evaluation of epoch {position.epoch + 1}") from None
    position = Position(position.epoch + 1, 0, Totals(), (*position.history, row))
    run.bar.epoch_done(row)
    if run.out is not None:
        out, history = run.out, list(position.history)
        with _boundary(position):  # a failed save is redone at the stop
            _save(run, position)
            _write(run, lambda: write_metrics(out, history))
    return position


@contextmanager
def _boundary(position: Position) -> Iterator[None]:
    """A ``KeyboardInterrupt`` raised inside (a run outside the main thread, a hook) stops the
    run at ``position``, the last step boundary."""
    try:
        yield
    except KeyboardInterrupt as exc:
        raise _Interrupted(position, getattr(exc, "signum", signal.SIGINT)) from None


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
        if exc.errno == errno.ENOSPC:
            reason = "the disk is full (no space left on device)"
        raise OutputFolderError(f"cannot write to the output folder {run.out}: {reason}; "
                                f"{_kept(run)}") from None


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
