"""Training a small network on real data with refnorm layers.

One concern a module: :mod:`~refnorm.train.config` (what determines a run),
:mod:`~refnorm.train.loop` (train, its epochs and steps), :mod:`~refnorm.train.checkpoint`,
:mod:`~refnorm.train.evaluate`, :mod:`~refnorm.train.finite` (the non-finite checks),
:mod:`~refnorm.train.outputs` (metrics, plots, progress), :mod:`~refnorm.train.folder` (the
output folder and its lock), :mod:`~refnorm.train.interrupt` (signals at step boundaries),
:mod:`~refnorm.train.data`, :mod:`~refnorm.train.model`, :mod:`~refnorm.train.optim` and
:mod:`~refnorm.train.study`.

The names below are the public interface, ``from refnorm.train import train, TrainConfig``;
each loads its module on first use, so that importing :mod:`refnorm.train.interrupt` (the
``refnorm`` command does, first thing) loads nothing else.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from refnorm.train.checkpoint import (  # noqa: F401
        CHECKPOINT,
        CheckpointError,
        load_checkpoint,
        save_checkpoint,
    )
    from refnorm.train.config import TrainConfig  # noqa: F401
    from refnorm.train.finite import NonFinite  # noqa: F401
    from refnorm.train.folder import OutputFolderError  # noqa: F401
    from refnorm.train.loop import Result, build_model, prepare_data, train  # noqa: F401

_WHERE = {
    "CHECKPOINT": "checkpoint", "CheckpointError": "checkpoint",
    "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "TrainConfig": "config", "NonFinite": "finite", "OutputFolderError": "folder",
    "Result": "loop", "build_model": "loop", "prepare_data": "loop", "train": "loop",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'refnorm.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f"refnorm.train.{_WHERE[name]}"), name)
