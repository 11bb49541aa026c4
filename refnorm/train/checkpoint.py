"""Checkpoints: what they hold, writing them atomically, and reading them back with every check.

A checkpoint (``checkpoint.npz``) holds every parameter, its momentum, every layer's state as
it is (SN's ``population_ready`` included) and a ``meta`` record (JSON): the format, the
configuration, the position (epoch, step, running totals) and the history of metrics. Nothing
is restored unless all of it fits the model and the configuration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import threading
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refnorm.backend import Array, array_namespace, device_of, on_device, to_numpy
from refnorm.train.config import TrainConfig
from refnorm.train.finite import check_finite, first_bad, is_finite
from refnorm.train.folder import atomic_write
from refnorm.train.model import ConvNet
from refnorm.train.optim import SGD
from refnorm.train.outputs import strict_json
from refnorm.train.position import Position, Totals

CHECKPOINT = "checkpoint.npz"


FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint could not be read, or belongs to another configuration."""


def config_dict(config: TrainConfig) -> dict:
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
                    position: Position, *,
                    other_devices: Sequence[dict[str, Any]] = (),
                    data: str | None = None) -> None:
    """Write parameters, momentum, every layer's state and ``position``, atomically.

    Arrays on a GPU or another device are copied to the host first
    (:func:`~refnorm.backend.to_numpy`): a checkpoint is numpy arrays whatever the device it
    was saved from, and loads onto any device (:func:`load_checkpoint`).

    ``other_devices`` holds, in a data-parallel run whose devices keep their own running
    statistics, the state arrays of devices 1, 2, ... (by ``state/<i>/<name>`` key), stored
    as ``device<p>/state/<i>/<name>``: between the averages at the ends of epochs they differ,
    and a resumed run must start from each device's own.

    ``data`` is the :func:`~refnorm.train.data.fingerprint` of the data the run trains on,
    which :func:`restore` compares with the resumed run's.

    Raises
    ------
    NonFinite
        Before writing anything, if an array holds a NaN or an infinity.
    """
    arrays: dict[str, Any] = {key: to_numpy(a) for key, a in checkpoint_arrays(model, opt).items()}
    for p, states in enumerate(other_devices, start=1):
        arrays.update({f"device{p}/{key}": to_numpy(a) for key, a in states.items()})
    check_finite(iter(arrays.items()))
    meta = {"format": FORMAT, "config": config_dict(config), "epoch": position.epoch,
            "step": position.step, "totals": dataclasses.asdict(position.totals),
            "history": list(position.history)}
    if data is not None:
        meta["data"] = data
    arrays["meta"] = np.frombuffer(strict_json(meta).encode(), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))


class Saved:
    """A checkpoint as read from its file: its metadata and the shape and dtype of every
    array (from the arrays' headers), the arrays themselves read only when asked for
    (:meth:`arrays`), after the checks that need only their names and shapes.

    Attributes
    ----------
    path : Path
    meta : the JSON metadata
    headers : dict of name to (shape, dtype)
    """

    def __init__(self, path: Path, meta: Any, headers: dict[str, tuple[tuple[int, ...], Any]]):
        self.path, self.meta, self.headers = path, meta, headers
        self._arrays: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()  # the devices of one process restore from one Saved

    def arrays(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The arrays ``names`` (read once, then kept)."""
        with self._lock:
            missing = [n for n in names if n not in self._arrays]
            if missing:
                try:
                    with np.load(self.path, allow_pickle=False) as z:
                        self._arrays.update({n: z[n] for n in missing})
                except Exception as exc:  # changed or truncated since it was listed
                    raise CheckpointError(f"checkpoint {self.path} is corrupted "
                                          f"({type(exc).__name__}: {exc})") from exc
            return {n: self._arrays[n] for n in names}


def read_checkpoint(path: Path) -> Saved:
    """Read ``path``'s metadata and its arrays' names, shapes and dtypes (not their values).

    Raises
    ------
    CheckpointError
        If it does not exist, is not a regular file (a FIFO, a directory, a device: nothing
        that could block or never end is opened), is not a readable ``.npz`` archive of
        ``.npy`` arrays, or has no JSON ``meta`` record of at most :data:`META_BYTES`.
    """
    return _read_checkpoint(path)


def load_checkpoint(path: Path, config: TrainConfig, model: ConvNet, opt: SGD, *,
                    steps_per_epoch: int | None = None) -> Position:
    """Restore a checkpoint of ``config`` into ``model`` and ``opt``; return its position
    (:func:`read_checkpoint`, then :func:`restore`)."""
    return restore(read_checkpoint(path), config, model, opt, steps_per_epoch=steps_per_epoch)


def restore(saved: Saved, config: TrainConfig, model: ConvNet, opt: SGD, *,
            steps_per_epoch: int | None = None, device: int = 0,
            data: str | None = None) -> Position:
    """Restore ``saved`` into ``model`` and ``opt`` (those of data-parallel device
    ``device``); return its position.

    Nothing is restored unless the whole checkpoint fits: its metadata has every field
    with a value of the right kind (``epoch`` within the run, ``step`` within an epoch of
    ``steps_per_epoch`` steps if given), it was written by a run of ``config`` (the same
    number of devices included) on the same data (``data``, the resumed run's
    :func:`~refnorm.train.data.fingerprint`, against the one the checkpoint records, where
    both are known), and its arrays are exactly the model's, each of the model's shape and
    dtype and finite. Each array is put in the namespace and on the device of the
    model's array it replaces (a checkpoint saved on a GPU loads into a numpy model and the
    other way round).

    Raises
    ------
    CheckpointError
        Naming the field or array that does not fit.
    """
    path, headers = saved.path, saved.headers
    position = _position(path, saved.meta, config, steps_per_epoch)
    recorded = saved.meta.get("data")
    if data is not None and recorded is not None and recorded != data:
        raise CheckpointError(
            f"checkpoint {path} was written by a run on other data than this run's "
            f"({config.data}: the arrays' SHA-256 is {data[:12]}..., the checkpoint's "
            f"{str(recorded)[:12]}...): resume with the data it was trained on, or start a "
            "new run in another folder")
    expected = checkpoint_arrays(model, opt)
    own = [k for k in headers if not k.startswith("device")]
    missing = [k for k in expected if k not in headers]
    extra = [k for k in own if k not in expected]
    if missing or extra:
        parts = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has arrays the model does not: {', '.join(extra)}"] if extra else [])
        raise CheckpointError(f"checkpoint {path} does not match the model: "
                              + "; ".join(parts))
    # the floating-point states of devices 1..P-1, exactly where the run keeps per-device
    # running statistics (as save_checkpoint's other_devices): none lacking, none extra
    per_device = config.devices > 1 and not config.synchronized
    floating = [k for k, a in expected.items()
                if k.startswith("state/") and to_numpy(a).dtype.kind == "f"]
    wanted = {f"device{p}/{k}" for p in range(1, config.devices) for k in floating} \
        if per_device else set()
    given = {k for k in headers if k.startswith("device")}
    if wanted - given:
        lacking = sorted(wanted - given)
        raise CheckpointError(
            f"checkpoint {path} does not match the model: lacks {', '.join(lacking[:4])}"
            f"{', ...' if len(lacking) > 4 else ''} (each device's running statistics, which a "
            f"run of {config.devices} devices with --norm {config.norm} keeps)")
    if given - wanted:
        raise CheckpointError(f"checkpoint {path} does not match the model: has arrays the "
                              f"model does not: {', '.join(sorted(given - wanted)[:4])}")
    source = {k: f"device{device}/{k}" if device and f"device{device}/{k}" in headers else k
              for k in expected}
    for key, like in expected.items():  # from the headers: nothing large is read yet
        (shape, dtype), like = headers[source[key]], to_numpy(like)
        if shape != like.shape or dtype != like.dtype:
            raise CheckpointError(f"checkpoint {path} does not match the model: {key} is "
                                  f"{dtype} {shape}, the model's is {like.dtype} "
                                  f"{like.shape}")
    loaded = saved.arrays(sorted(set(source.values())))
    mine = {key: loaded[source[key]] for key in expected}
    for key, got in mine.items():
        if not is_finite(got):
            raise CheckpointError(f"checkpoint {path}: {key} holds {first_bad(got)}")
    placed = {key: _beside(mine[key], like) for key, like in expected.items()}
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
    saved, wanted = meta["config"], config_dict(config)
    devices = saved.get("devices", 1)
    if devices != wanted["devices"]:
        raise CheckpointError(
            f"checkpoint {path} was written by a run on {devices} device(s) and this run has "
            f"{wanted['devices']}: resume it with --devices {devices} (or under mpiexec -n "
            f"{devices}), or start a new run in another folder")
    differ = [f"{k}: checkpoint {saved.get(k)!r}, this run {wanted[k]!r}"
              for k in wanted if saved.get(k) != wanted[k] and k not in ("device", "devices")]
    if differ:
        raise CheckpointError(f"checkpoint {path} belongs to another configuration; "
                              + "; ".join(differ) + ": continue it with its own options "
                              "(refnorm train --out FOLDER --resume takes them from it), or "
                              "start a new run in another folder")
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
    for i, row in enumerate(history, start=1):
        if (problem := _bad_row(row, i)) is not None:
            raise refuse(f"metadata 'history' row {i}: {problem}")
    return Position(epoch, step, Totals(float(totals["loss"]), totals["correct"],
                                        totals["samples"]), tuple(history))


ROW_KEYS = ("epoch", "lr", "train_loss", "train_acc_running", "train_acc", "test_loss",
            "test_acc", "seconds")  # every row of the history has these, and numbers only


def _bad_row(row: dict, epoch: int) -> str | None:
    """What is wrong with the history's row of ``epoch``, or None."""
    lacks = [k for k in ROW_KEYS if k not in row]
    if lacks:
        return f"lacks {', '.join(map(repr, lacks))}"
    for key, value in row.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            return f"{key!r} must be a finite number; got {value!r}"
    if row["epoch"] != epoch:
        return f"'epoch' must be {epoch}; got {row['epoch']!r}"
    return None


META_BYTES = 16 * 2**20  # the metadata of a run of many epochs is tens of KiB


def _read_checkpoint(path: Path) -> Saved:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint to resume from: {path} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"checkpoint {path} is not a regular file (it is a "
                              f"{_kind(mode)}); refnorm reads checkpoints from files only")
    try:
        with zipfile.ZipFile(path) as archive:
            headers = {}
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"member {info.filename!r} is not an .npy array")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise ValueError(f"member {info.filename!r} has .npy version "
                                         f"{version}")
                    shape, _, dtype = read_header(member)
                headers[info.filename[:-4]] = (tuple(shape), np.dtype(dtype))
            if "meta" not in headers:
                raise CheckpointError(f"checkpoint {path} is not a refnorm checkpoint: it has "
                                      "no 'meta' record")
            shape, dtype = headers.pop("meta")
            if dtype != np.uint8 or len(shape) != 1 or shape[0] > META_BYTES:
                raise CheckpointError(f"checkpoint {path} is not a refnorm checkpoint: its "
                                      f"'meta' record is {dtype} {shape}, not at most "
                                      f"{META_BYTES} bytes")
            with archive.open("meta.npy") as member:
                raw = np.lib.format.read_array(member, allow_pickle=False)
    except CheckpointError:
        raise
    except Exception as exc:  # a truncated or overwritten file: say so, whatever was raised
        raise CheckpointError(f"checkpoint {path} is corrupted or not a refnorm checkpoint "
                              f"({type(exc).__name__}: {exc})") from exc
    try:
        meta = json.loads(raw.tobytes().decode())
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested too deep
        raise CheckpointError(f"checkpoint {path}: its 'meta' record is not JSON ({exc})") from None
    return Saved(path, meta, headers)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"
