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
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from refnorm.nn import softmax_cross_entropy, softmax_cross_entropy_backward
from refnorm.norms.switchable import SwitchableNorm, batch_average
from refnorm.train.data import Dataset, load, standardize
from refnorm.train.model import ConvNet
from refnorm.train.optim import SGD, learning_rate
from refnorm.weights import WeightNorm

CHECKPOINT = "checkpoint.npz"
FORMAT = 1


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

    def describe(self) -> str:
        method = self.norm + (f"+{self.weight}" if self.weight else "")
        return (f"{method} batch {self.batch_size} x {self.accumulation} accumulation, "
                f"{self.epochs} epochs, lr {self.lr}, seed {self.seed}")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped."""


class CheckpointError(ValueError):
    """A checkpoint could not be read, or belongs to another configuration."""


@dataclass
class Result:
    """What :func:`train` returns."""

    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    model: ConvNet | None = None
    interrupted: bool = False


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
    data = prepare_data(config) if data is None else data
    model = build_model(config, data)
    opt = SGD(model, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    out = None if out is None else Path(out)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    group = config.batch_size * config.accumulation
    steps_per_epoch = len(data.y_train) // group
    if steps_per_epoch == 0:
        raise ValueError(f"one update needs batch_size * accumulation = {group} samples; the "
                         f"training set has {len(data.y_train)}")
    total_steps = steps_per_epoch * config.epochs
    history: list[dict] = []
    epoch, step, sums = 0, 0, [0.0, 0, 0]
    if resume:
        if out is None:
            raise CheckpointError("resume needs the output directory of the run to continue")
        epoch, step, history, sums = load_checkpoint(out / CHECKPOINT, config, model, opt)
    else:
        data_dependent_init(model, data, config)
    bar = Progress(enabled=progress)
    result = Result(config, history, model)

    def interrupted(position: tuple) -> Result:
        # Ctrl-C: save where training stands, consistently, and stop.
        if out is not None:
            save_checkpoint(out / CHECKPOINT, config, model, opt, position)
        bar.close(f"interrupted in epoch {position[0] + 1} at step {position[1]}"
                  + (f": checkpoint saved in {out}; continue with --resume" if out else ""))
        result.interrupted = True
        return result

    while epoch < config.epochs:
        order = np.random.default_rng([config.seed, epoch]).permutation(len(data.y_train))
        started = time.perf_counter()
        while step < steps_per_epoch:
            saved_states = [copy.deepcopy(layer.state) for layer in model.layers()]
            saved_sums = list(sums)
            try:
                grads = _accumulate(model, data, order[step * group:(step + 1) * group], config,
                                    sums)
                opt.step(grads, learning_rate(config.schedule, config.lr,
                                              epoch * steps_per_epoch + step, total_steps))
            except KeyboardInterrupt:
                for layer, state in zip(model.layers(), saved_states):
                    layer.state = state  # forget the running statistics of the unfinished step
                return interrupted((epoch, step, history, saved_sums))
            step += 1
            try:
                bar.update(epoch, config.epochs, step, steps_per_epoch, sums)
                if on_step is not None:
                    on_step(epoch, step, model)
            except KeyboardInterrupt:
                return interrupted((epoch, step, history, sums))
        try:
            row = _evaluate(model, data, config, epoch, sums,
                            learning_rate(config.schedule, config.lr,
                                          (epoch + 1) * steps_per_epoch - 1, total_steps),
                            time.perf_counter() - started)
        except KeyboardInterrupt:  # the epoch's steps are done; resuming re-runs the evaluation
            return interrupted((epoch, step, history, sums))
        history.append(row)
        epoch, step, sums = epoch + 1, 0, [0.0, 0, 0]
        bar.epoch_done(history[-1])
        if out is not None:
            save_checkpoint(out / CHECKPOINT, config, model, opt, (epoch, step, history, sums))
            write_metrics(out, history)
    if out is not None and history:
        write_metrics(out, history, curves=True)
    return result


def data_dependent_init(model: ConvNet, data: Dataset, config: TrainConfig) -> None:
    """Salimans & Kingma's initialization of every Weight Normalization layer (WN and NP).

    One seeded batch of ``batch_size * accumulation`` training samples goes through the
    network in order; each WN layer sets its gain and bias so that its pre-activations on
    that batch have zero mean and unit variance, then passes the batch on. Layer states
    (running statistics) are left as they were.
    """
    layers = model.layers()
    if not any(isinstance(layer, WeightNorm) for layer in layers):
        return
    states = [copy.deepcopy(layer.state) for layer in layers]
    pick = np.random.default_rng([config.seed, 3]).permutation(len(data.y_train))
    h = data.x_train[pick[:config.batch_size * config.accumulation]]
    for layer in layers:
        if isinstance(layer, WeightNorm):
            layer.init_from_batch(h)
        h = layer.forward(h, training=True)
    for layer, state in zip(layers, states):
        layer.state = state
        layer._cache = None


def _accumulate(model: ConvNet, data: Dataset, indices: np.ndarray, config: TrainConfig,
                sums: list) -> dict[str, np.ndarray]:
    """Forward and backward over the micro-batches of one update; return the mean gradient."""
    grads: dict[str, np.ndarray] = {}
    for start in range(0, len(indices), config.batch_size):
        idx = indices[start:start + config.batch_size]
        logits = model.forward(data.x_train[idx], training=True)
        loss, cache = softmax_cross_entropy(logits, data.y_train[idx])
        loss = float(loss)
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"the training loss became {loss} ({config.describe()}); the "
                                "run stopped and the last good checkpoint is kept")
        model.backward(softmax_cross_entropy_backward(cache) / config.accumulation)
        for key, layer, name in model.named_params():
            g = layer.grads[name]
            grads[key] = g if key not in grads else grads[key] + g
        sums[0] += loss * len(idx)
        sums[1] += int(np.sum(np.argmax(logits, axis=1) == data.y_train[idx]))
        sums[2] += len(idx)
    return grads


def predict(model: ConvNet, x: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Logits in evaluation mode, in chunks."""
    return np.concatenate([model.forward(x[i:i + chunk], training=False)
                           for i in range(0, len(x), chunk)])


def _evaluate(model, data, config, epoch, sums, lr, seconds) -> dict:
    if any(isinstance(l, SwitchableNorm) and l.inference == "batch_average"
           for l in model.layers()):
        pick = np.random.default_rng([config.seed, epoch, 1]).permutation(len(data.y_train))
        pick = pick[:config.average_samples]
        batches = [data.x_train[pick[i:i + config.batch_size]]
                   for i in range(0, len(pick) - config.batch_size + 1, config.batch_size)]
        batch_average(model, batches)
    test_logits = predict(model, data.x_test)
    test_loss, _ = softmax_cross_entropy(test_logits, data.y_test)
    train_logits = predict(model, data.x_train)
    row = {
        "epoch": epoch + 1,
        "lr": lr,
        "train_loss": sums[0] / max(sums[2], 1),
        "train_acc_running": sums[1] / max(sums[2], 1),
        "train_acc": float(np.mean(np.argmax(train_logits, 1) == data.y_train)),
        "test_loss": float(test_loss),
        "test_acc": float(np.mean(np.argmax(test_logits, 1) == data.y_test)),
        "seconds": seconds,
    }
    for i, layer in enumerate(model.layers()):
        if isinstance(layer, SwitchableNorm):
            for kind, ratios in layer.current_ratios().items():
                for scope, value in ratios.items():
                    row[f"sn{i}_{kind}_{scope}"] = value
    return row


# -- outputs ------------------------------------------------------------------------------------


def write_metrics(out: Path, history: list[dict], *, curves: bool = False) -> None:
    """``metrics.json`` and ``metrics.csv`` (one row per epoch); ``curves.png`` if asked."""
    _atomic_write(out / "metrics.json", json.dumps(history, indent=2).encode())
    keys = list(dict.fromkeys(k for row in history for k in row))
    tmp = out / "metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
    os.replace(tmp, out / "metrics.csv")
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


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# -- checkpoints --------------------------------------------------------------------------------


def _config_dict(config: TrainConfig) -> dict:
    d = dataclasses.asdict(config)
    d["widths"] = list(d["widths"])
    return d


def save_checkpoint(path: Path, config: TrainConfig, model: ConvNet, opt: SGD,
                    position: tuple) -> None:
    """Write parameters, layer state, momentum and the position in training, atomically."""
    epoch, step, history, sums = position
    arrays = {}
    for key, layer, name in model.named_params():
        arrays[f"param/{key}"] = layer.params[name]
        arrays[f"velocity/{key}"] = opt.velocity[key]
    for i, layer in enumerate(model.layers()):
        for name, value in layer.state.items():
            arrays[f"state/{i}/{name}"] = value
    meta = {"format": FORMAT, "config": _config_dict(config), "epoch": epoch, "step": step,
            "history": history, "sums": list(sums),
            "population_ready": [getattr(l, "population_ready", None) for l in model.layers()]}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, config: TrainConfig, model: ConvNet, opt: SGD) -> tuple:
    """Restore a checkpoint into ``model`` and ``opt``; return (epoch, step, history, sums)."""
    if not path.exists():
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except Exception as exc:  # a truncated or overwritten file: say so, whatever numpy raised
        raise CheckpointError(f"checkpoint {path} is corrupted or not a refnorm checkpoint "
                              f"({type(exc).__name__}: {exc})") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {meta.get('format')}, expected {FORMAT}")
    saved, wanted = meta["config"], _config_dict(config)
    differ = [f"{k}: checkpoint {saved.get(k)!r}, this run {wanted[k]!r}"
              for k in wanted if saved.get(k) != wanted[k]]
    if differ:
        raise CheckpointError(f"checkpoint {path} belongs to another configuration; "
                              + "; ".join(differ))
    for key, layer, name in model.named_params():
        for prefix, target in (("param", layer.params), ("velocity", opt.velocity)):
            k = f"{prefix}/{key}"
            if k not in arrays or arrays[k].shape != layer.params[name].shape:
                raise CheckpointError(f"checkpoint {path} does not match the model: {k} is "
                                      "missing or has another shape")
            if prefix == "param":
                target[name] = arrays[k]
            else:
                target[key] = arrays[k]
    for i, layer in enumerate(model.layers()):
        layer.state = {name: arrays[f"state/{i}/{name}"] for name in layer.state}
        ready = meta["population_ready"][i]
        if ready is not None:
            layer.population_ready = ready
    return meta["epoch"], meta["step"], meta["history"], meta["sums"]


# -- progress -----------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on a terminal; one line per epoch otherwise."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()

    def update(self, epoch, epochs, step, steps, sums) -> None:
        if not self.tty:
            return
        done = int(30 * step / steps)
        loss = sums[0] / max(sums[2], 1)
        acc = sums[1] / max(sums[2], 1)
        sys.stderr.write(f"\repoch {epoch + 1}/{epochs} [{'#' * done}{'.' * (30 - done)}] "
                         f"loss {loss:.3f} acc {acc:.3f}")
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
