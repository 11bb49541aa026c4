"""Build any registered layer by name: ``refnorm.build("gn", 64, num_groups=32)``.

The registry is one explicit table, in the order ``refnorm gradcheck --all`` reports the
layers; a class is imported when its name is first asked for. The first positional argument
of every registered layer is the number of input channels (C of an (N, C, *spatial) input);
``refnorm gradcheck`` relies on that.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, class)
_TABLE: dict[str, tuple[str, str]] = {
    "bn": ("refnorm.norms.batch_norm", "BatchNorm"),
    "in": ("refnorm.norms.instance_norm", "InstanceNorm"),
    "ln": ("refnorm.norms.layer_norm", "LayerNorm"),
    "gn": ("refnorm.norms.group_norm", "GroupNorm"),
    "sn": ("refnorm.norms.switchable_norm", "SwitchableNorm"),
    "syncbn": ("refnorm.sync.batch_norm", "SyncBatchNorm"),
    "syncsn": ("refnorm.sync.switchable", "SyncSwitchableNorm"),
    "conv": ("refnorm.nn.conv", "Conv2d"),
    "linear": ("refnorm.nn.linear", "Linear"),
    "wn": ("refnorm.weights.weight_norm", "WeightNorm"),
    "np": ("refnorm.weights.norm_prop", "NormProp"),
    "trelu": ("refnorm.weights.trelu", "TReLUWeightNorm"),
    "ws": ("refnorm.weights.standardization", "WeightStandardization"),
}


def names() -> tuple[str, ...]:
    """The registered names, in the table's order."""
    return tuple(_TABLE)


def layer_class(name: str) -> type:
    """The class registered as ``name``."""
    try:
        module, cls = _TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown layer {name!r}; expected one of {', '.join(names())}"
        ) from None
    return getattr(importlib.import_module(module), cls)


def name_of(cls: type) -> str:
    """The name ``cls`` is registered under; ``ValueError`` if it is not registered."""
    for name, (module, qualname) in _TABLE.items():
        if cls.__module__ == module and cls.__qualname__ == qualname:
            return name
    raise ValueError(f"{cls.__qualname__} is not a registered layer")


def build(name: str, num_channels: int, *args: Any, **options: Any) -> Any:
    """Construct the layer registered as ``name`` for ``num_channels`` input channels.

    Further arguments go to the layer's constructor (``eps``, ``momentum``, ``num_groups``,
    ``dtype``, ...).
    """
    return layer_class(name)(num_channels, *args, **options)
