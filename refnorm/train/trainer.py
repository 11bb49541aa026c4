"""Training the conv-net: micro-batches, gradient accumulation, checkpoints, resume.

The normalizers see *micro-batches* of ``batch_size`` samples (their batch statistics come
from those), while each optimizer step sees ``accumulation`` micro-batches: the papers'
"iteration size", which keeps the update the same while the per-device batch shrinks.

Everything is seeded: the order of the training set in epoch e is
``default_rng([seed, e]).permutation``, and so are the batches the SN batch average sees;
parameters start from ``seed``. A run resumed from a checkpoint therefore ends with bitwise
the same parameters as an uninterrupted one. Checkpoints are written atomically (a temporary
file, then ``os.replace``) after every epoch and on Ctrl-C; a non-finite loss stops the run
and leaves the last good checkpoint in place.

The loop reads in three levels: :func:`train` (set up or resume, then epochs),
:func:`run_epoch` (the steps of one epoch, evaluation, checkpoint) and :func:`train_step`
(one optimizer update). Ctrl-C inside a step undoes the step (running statistics, parameters
and momentum are as before it), so the checkpoint always sits at a step boundary.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from refnorm.inference import batch_average
from refnorm.nn import softmax_cross_entropy, softmax_cross_entropy_backward
from refnorm.norms.switchable import SwitchableNorm
from refnorm.train.data import Dataset, load, standardize
from refnorm.train.model import ConvNet
from refnorm.train.optim import SGD, learning_rate
from refnorm.weights import WeightNorm

CHECKPOINT = "checkpoint.npz"
# 2: every layer's state is saved as it is (SN's population readiness included); format 1
# kept readiness in a list of its own.
FORMAT = 2


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

    def __post_init__(self) -> None:
        for name in ("batch_size", "accumulation", "epochs", "average_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")

    @property
    def update_size(self) -> int:
        """Samples per optimizer update: ``batch_size * accumulation``."""
        return self.batch_size * self.accumulation

    def describe(self) -> str:
        method = self.norm + (f"+{self.weight}" if self.weight else "")
        return (f"{method} batch {self.batch_size} x {self.accumulation} accumulation, "
                f"{self.epochs} epochs, lr {self.lr}, seed {self.seed}")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped."""


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
    """What :func:`train` returns."""

    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    model: ConvNet | None = None
    interrupted: bool = False


@dataclass
class Run:
    """What one run works with, built once by :func:`train` and passed to each epoch."""

    config: TrainConfig
    data: Dataset
    model: ConvNet
    opt: SGD
    out: Path | None
    bar: Progress
    on_step: Callable[[int, int, ConvNet], None] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.data.y_train) // self.config.update_size

    def learning_rate(self, epoch: int, step: int) -> float:
        """The learning rate of optimizer step ``step`` of epoch ``epoch``."""
        c, steps = self.config, self.steps_per_epoch
        return learning_rate(c.schedule, c.lr, epoch * steps + step, steps * c.epochs)


class _Interrupted(Exception):
    """Ctrl-C arrived; ``position`` is the step boundary to save."""

    def __init__(self, position: Position) -> None:
        super().__init__(position)
        self.position = position


# -- the loop ---------------------------------------------------------------------------------


def build_model(config: TrainConfig, data: Dataset) -> ConvNet:
    options = {"inference": config.sn_inference} if config.norm in ("sn", "syncsn") else {}
    return ConvNet(in_channels=data.x_train.shape[1], num_classes=data.num_classes,
                   norm=config.norm, weight=config.weight, widths=config.widths,
                   num_groups=config.num_groups, norm_options=options, seed=config.seed)


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
    Result; ``interrupted`` is True after Ctrl-C (a checkpoint was saved).

    Raises
    ------
    NonFiniteLoss
        If the loss became NaN or infinite (the last good checkpoint is kept).
    CheckpointError
        If ``resume`` finds no usable checkpoint for this configuration.
    """
    run = _setup(config, out, progress=progress, on_step=on_step, data=data)
    position = _starting_position(run, resume)
    try:
        while position.epoch < config.epochs:
            position = run_epoch(run, position)
    except _Interrupted as stop:
        return _interrupt(run, stop.position)
    if run.out is not None and position.history:
        write_metrics(run.out, list(position.history), curves=True)
    return Result(config, list(position.history), run.model)


def _setup(config: TrainConfig, out: str | Path | None, *, progress: bool,
           on_step: Callable[[int, int, ConvNet], None] | None, data: Dataset | None) -> Run:
    data = prepare_data(config) if data is None else data
    if len(data.y_train) < config.update_size:
        raise ValueError(f"one update needs batch_size * accumulation = {config.update_size} "
                         f"samples; the training set has {len(data.y_train)}")
    model = build_model(config, data)
    opt = SGD(model, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    folder = None if out is None else Path(out)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    return Run(config, data, model, opt, folder, Progress(enabled=progress), on_step)


def _starting_position(run: Run, resume: bool) -> Position:
    if not resume:
        data_dependent_init(run.model, run.data, run.config)
        return Position()
    if run.out is None:
        raise CheckpointError("resume needs the output directory of the run to continue")
    return load_checkpoint(run.out / CHECKPOINT, run.config, run.model, run.opt)


def _interrupt(run: Run, position: Position) -> Result:
    """Ctrl-C: save where training stands (a step boundary) and stop."""
    if run.out is not None:
        save_checkpoint(run.out / CHECKPOINT, run.config, run.model, run.opt, position)
    where = f"interrupted in epoch {position.epoch + 1} at step {position.step}"
    run.bar.close(where + (f": checkpoint saved in {run.out}; continue with --resume"
                           if run.out is not None else ""))
    return Result(run.config, list(position.history), run.model, interrupted=True)


def run_epoch(run: Run, position: Position) -> Position:
    """Finish epoch ``position.epoch``: its remaining steps, its evaluation, its checkpoint.

    Returns the position at the start of the next epoch; on Ctrl-C raises ``_Interrupted``
    with the step boundary to save (an interrupted evaluation is re-run on resume).
    """
    config, group = run.config, run.config.update_size
    order = np.random.default_rng([config.seed, position.epoch]).permutation(
        len(run.data.y_train))
    started = time.perf_counter()
    while position.step < run.steps_per_epoch:
        picked = order[position.step * group:(position.step + 1) * group]
        lr = run.learning_rate(position.epoch, position.step)
        try:
            totals = train_step(run.model, run.opt, run.data.x_train[picked],
                                run.data.y_train[picked], config=config, lr=lr)
        except KeyboardInterrupt:
            raise _Interrupted(position) from None  # the step undid itself
        position = dataclasses.replace(position, step=position.step + 1,
                                       totals=position.totals + totals)
        try:
            run.bar.update(position, config.epochs, run.steps_per_epoch)
            if run.on_step is not None:
                run.on_step(position.epoch, position.step, run.model)
        except KeyboardInterrupt:
            raise _Interrupted(position) from None
    try:
        row = evaluate(run, position, seconds=time.perf_counter() - started)
    except KeyboardInterrupt:
        raise _Interrupted(position) from None
    position = Position(position.epoch + 1, 0, Totals(), (*position.history, row))
    run.bar.epoch_done(row)
    if run.out is not None:
        save_checkpoint(run.out / CHECKPOINT, config, run.model, run.opt, position)
        write_metrics(run.out, list(position.history))
    return position


def train_step(model: ConvNet, opt: SGD, x: np.ndarray, y: np.ndarray, *,
               config: TrainConfig, lr: float) -> Totals:
    """One optimizer update: the micro-batches of ``x``, their mean gradient, one SGD step.

    Parameters
    ----------
    model, opt : the network and its optimizer
    x : array (batch_size * accumulation, C, H, W)
        The update's samples, in micro-batch order.
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
    NonFiniteLoss
        If a micro-batch's loss is not finite.
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
        grads, totals = accumulate_gradients(model, x, y, config)
        opt.step(grads, lr)
    except KeyboardInterrupt:
        for layer, state, before in zip(layers, states, params, strict=True):
            layer.state = state
            layer.params.update(before)
        opt.velocity.update(velocity)
        raise
    return totals


def accumulate_gradients(model: ConvNet, x: np.ndarray, y: np.ndarray,
                         config: TrainConfig) -> tuple[dict[str, np.ndarray], Totals]:
    """Forward and backward over the micro-batches of ``x``; return their mean gradient.

    Each micro-batch's loss is its mean cross-entropy; its gradient divided by
    ``accumulation`` makes the sum over micro-batches their mean.

    Parameters
    ----------
    x : array (batch_size * accumulation, C, H, W)
    y : int array (batch_size * accumulation,)

    Returns
    -------
    dict of key to array (the parameter's shape), keyed as :meth:`ConvNet.named_params`;
    Totals of the samples
    """
    grads: dict[str, np.ndarray] = {}
    totals = Totals()
    for start in range(0, len(y), config.batch_size):
        xb, yb = x[start:start + config.batch_size], y[start:start + config.batch_size]
        logits = model.forward(xb, training=True)                        # (b, classes)
        loss, cache = softmax_cross_entropy(logits, yb)
        if not math.isfinite(float(loss)):
            raise NonFiniteLoss(f"the training loss became {float(loss)} ({config.describe()}); "
                                "the run stopped and the last good checkpoint is kept")
        model.backward(softmax_cross_entropy_backward(cache) / config.accumulation)
        for key, layer, name in model.named_params():
            g = layer.grads[name]
            grads[key] = g if key not in grads else grads[key] + g
        correct = int(np.sum(np.argmax(logits, axis=1) == yb))
        totals = totals + Totals(float(loss) * len(yb), correct, len(yb))
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
    h = data.x_train[pick[:config.update_size]]
    for layer in layers:
        if isinstance(layer, WeightNorm):
            layer.init_from_batch(h)
        h = layer.forward(h, training=True)
    for layer, state in zip(layers, states, strict=True):
        layer.state = state
        layer.reset()


def predict(model: ConvNet, x: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Logits (N, classes) in evaluation mode for images ``x`` (N, C, H, W), in chunks."""
    return np.concatenate([model.forward(x[i:i + chunk], training=False)
                           for i in range(0, len(x), chunk)])


def evaluate(run: Run, position: Position, *, seconds: float) -> dict:
    """The metrics row of epoch ``position.epoch`` (after its last step).

    With SN's batch average, the population statistics are set first from seeded training
    batches (:func:`average_batches`). Accuracies are in evaluation mode, except
    ``train_acc_running``, the training-mode accuracy over the epoch's steps.
    """
    config, model, data = run.config, run.model, run.data
    if config.norm in ("sn", "syncsn") and config.sn_inference == "batch_average":
        batch_average(model, average_batches(config, data, position.epoch))
    test_logits = predict(model, data.x_test)
    test_loss, _ = softmax_cross_entropy(test_logits, data.y_test)
    train_logits = predict(model, data.x_train)
    return {
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


# -- outputs ------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Replace ``path`` all at once: ``write(f)`` fills a temporary file beside it, which is
    flushed to disk and renamed over ``path`` (``os.replace`` is atomic). A failure leaves
    ``path`` as it was and no temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_metrics(out: Path, history: list[dict], *, curves: bool = False) -> None:
    """``metrics.json`` and ``metrics.csv`` (one row per epoch); ``curves.png`` if asked."""
    _atomic_write(out / "metrics.json", lambda f: f.write(json.dumps(history, indent=2).encode()))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for r in history for k in r)))
    writer.writeheader()
    writer.writerows(history)
    _atomic_write(out / "metrics.csv", lambda f: f.write(table.getvalue().encode()))
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- checkpoints --------------------------------------------------------------------------------


def _config_dict(config: TrainConfig) -> dict:
    d = dataclasses.asdict(config)
    d["widths"] = list(d["widths"])
    return d


def save_checkpoint(path: Path, config: TrainConfig, model: ConvNet, opt: SGD,
                    position: Position) -> None:
    """Write parameters, momentum, every layer's state and ``position``, atomically."""
    arrays = {}
    for key, layer, name in model.named_params():
        arrays[f"param/{key}"] = layer.params[name]
        arrays[f"velocity/{key}"] = opt.velocity[key]
    for i, layer in enumerate(model.layers()):
        for name, value in layer.state.items():
            arrays[f"state/{i}/{name}"] = value
    meta = {"format": FORMAT, "config": _config_dict(config), "epoch": position.epoch,
            "step": position.step, "totals": dataclasses.asdict(position.totals),
            "history": list(position.history)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    _atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path: Path, config: TrainConfig, model: ConvNet, opt: SGD) -> Position:
    """Restore a checkpoint of ``config`` into ``model`` and ``opt``; return its position."""
    arrays, meta = _read_checkpoint(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, "
                              f"expected {FORMAT}")
    saved, wanted = meta["config"], _config_dict(config)
    differ = [f"{k}: checkpoint {saved.get(k)!r}, this run {wanted[k]!r}"
              for k in wanted if saved.get(k) != wanted[k]]
    if differ:
        raise CheckpointError(f"checkpoint {path} belongs to another configuration; "
                              + "; ".join(differ))

    def stored(key: str, like: np.ndarray) -> np.ndarray:
        if key not in arrays or arrays[key].shape != np.shape(like):
            raise CheckpointError(f"checkpoint {path} does not match the model: {key} is "
                                  "missing or has another shape")
        return arrays[key]

    for key, layer, name in model.named_params():
        layer.params[name] = stored(f"param/{key}", layer.params[name])
        opt.velocity[key] = stored(f"velocity/{key}", opt.velocity[key])
    for i, layer in enumerate(model.layers()):
        layer.state = {name: stored(f"state/{i}/{name}", value)
                       for name, value in layer.state.items()}
        layer.reset()  # new parameters and state: no backward on an old cache
    return Position(meta["epoch"], meta["step"], Totals(**meta["totals"]),
                    tuple(meta["history"]))


def _read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    if not path.exists():
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except Exception as exc:  # a truncated or overwritten file: say so, whatever numpy raised
        raise CheckpointError(f"checkpoint {path} is corrupted or not a refnorm checkpoint "
                              f"({type(exc).__name__}: {exc})") from exc
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
