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
from collections.abc import Sequence
from dataclasses import dataclass
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
                    other_devices: Sequence[dict[str, Any]] = ()) -> None:
    """Write parameters, momentum, every layer's state and ``position``, atomically.

    Arrays on a GPU or another device are copied to the host first
    (:func:`~refnorm.backend.to_numpy`): a checkpoint is numpy arrays whatever the device it
    was saved from, and loads onto any device (:func:`load_checkpoint`).

    ``other_devices`` holds, in a data-parallel run whose devices keep their own running
    statistics, the state arrays of devices 1, 2, ... (by ``state/<i>/<name>`` key), stored
    as ``device<p>/state/<i>/<name>``: between the averages at the ends of epochs they differ,
    and a resumed run must start from each device's own.

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
    arrays["meta"] = np.frombuffer(strict_json(meta).encode(), dtype=np.uint8)
    atomic_write(path, lambda f: np.savez(f, **arrays))


@dataclass(frozen=True)
class Saved:
    """A checkpoint as read from its file, before anything is restored from it."""

    path: Path
    arrays: dict[str, np.ndarray]
    meta: Any


def read_checkpoint(path: Path) -> Saved:
    """Read ``path`` (nothing is checked against a model yet).

    Raises
    ------
    CheckpointError
        If it does not exist, is not a readable ``.npz`` archive, or has no JSON ``meta``.
    """
    return Saved(path, *_read_checkpoint(path))


def load_checkpoint(path: Path, config: TrainConfig, model: ConvNet, opt: SGD, *,
                    steps_per_epoch: int | None = None) -> Position:
    """Restore a checkpoint of ``config`` into ``model`` and ``opt``; return its position
    (:func:`read_checkpoint`, then :func:`restore`)."""
    return restore(read_checkpoint(path), config, model, opt, steps_per_epoch=steps_per_epoch)


def restore(saved: Saved, config: TrainConfig, model: ConvNet, opt: SGD, *,
            steps_per_epoch: int | None = None, device: int = 0) -> Position:
    """Restore ``saved`` into ``model`` and ``opt`` (those of data-parallel device
    ``device``); return its position.

    Nothing is restored unless the whole checkpoint fits: its metadata has every field
    with a value of the right kind (``epoch`` within the run, ``step`` within an epoch of
    ``steps_per_epoch`` steps if given), it was written by a run of ``config`` (the same
    number of devices included), and its arrays are exactly the model's, each of the model's
    shape and dtype and finite. Each array is put in the namespace and on the device of the
    model's array it replaces (a checkpoint saved on a GPU loads into a numpy model and the
    other way round).

    Raises
    ------
    CheckpointError
        Naming the field or array that does not fit.
    """
    path, arrays = saved.path, saved.arrays
    position = _position(path, saved.meta, config, steps_per_epoch)
    expected = checkpoint_arrays(model, opt)
    own = [k for k in arrays if not k.startswith("device")]
    missing = [k for k in expected if k not in arrays]
    extra = [k for k in own if k not in expected]
    if missing or extra:
        parts = ([f"lacks {', '.join(missing)}"] if missing else []) + (
            [f"has arrays the model does not: {', '.join(extra)}"] if extra else [])
        raise CheckpointError(f"checkpoint {path} does not match the model: "
                              + "; ".join(parts))
    for key in [k for k in arrays if k.startswith("device")]:
        _, _, base = key.partition("/")
        if base not in expected or not base.startswith("state/"):
            raise CheckpointError(f"checkpoint {path} does not match the model: has arrays "
                                  f"the model does not: {key}")
    mine = {k: arrays.get(f"device{device}/{k}", arrays[k]) if device else arrays[k]
            for k in expected}
    for key, like in expected.items():
        got, like = mine[key], to_numpy(like)
        if got.shape != like.shape or got.dtype != like.dtype:
            raise CheckpointError(f"checkpoint {path} does not match the model: {key} is "
                                  f"{got.dtype} {got.shape}, the model's is {like.dtype} "
                                  f"{like.shape}")
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
