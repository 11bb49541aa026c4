"""Build any registered layer by name: ``refnorm.build("gn", 64, num_groups=32)``.

The registry is one explicit table, in the order ``refnorm gradcheck --all`` reports the
layers. The first positional argument of every registered layer is the number of input
channels (C of an (N, C, *spatial) input); ``refnorm gradcheck`` relies on that.
"""

from __future__ import annotations

from typing import Any

from refnorm.layer import Layer
from refnorm.nn.conv import Conv2d
from refnorm.nn.linear import Linear
from refnorm.norms.batch_norm import BatchNorm
from refnorm.norms.group_norm import GroupNorm
from refnorm.norms.instance_norm import InstanceNorm
from refnorm.norms.layer_norm import LayerNorm
from refnorm.norms.switchable_norm import SwitchableNorm
from refnorm.sync.batch_norm import SyncBatchNorm
from refnorm.sync.switchable import SyncSwitchableNorm
from refnorm.weights.norm_prop import NormProp
from refnorm.weights.standardization import WeightStandardization
from refnorm.weights.trelu import TReLUWeightNorm
from refnorm.weights.weight_norm import WeightNorm

_TABLE: dict[str, type[Layer]] = {
    "bn": BatchNorm,
    "in": InstanceNorm,
    "ln": LayerNorm,
    "gn": GroupNorm,
    "sn": SwitchableNorm,
    "syncbn": SyncBatchNorm,
    "syncsn": SyncSwitchableNorm,
    "conv": Conv2d,
    "linear": Linear,
    "wn": WeightNorm,
    "np": NormProp,
    "trelu": TReLUWeightNorm,
    "ws": WeightStandardization,
}


def names() -> tuple[str, ...]:
    """The registered names, in the table's order."""
    return tuple(_TABLE)


def layer_class(name: str) -> type:
    """The class registered as ``name``."""
    try:
        return _TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown layer {name!r}; expected one of {', '.join(names())}"
        ) from None


def name_of(cls: type) -> str:
    """The name ``cls`` is registered under; ``ValueError`` if it is not registered,
    ``TypeError`` if it is not a class (a layer: pass ``type(layer)``)."""
    if not isinstance(cls, type):
        raise TypeError(f"name_of takes a class; got {type(cls).__name__} (for a layer, "
                        "pass type(layer))")
    for name, registered in _TABLE.items():
        if registered is cls:
            return name
    raise ValueError(f"{cls.__qualname__} is not a registered layer")


def build(name: str, num_channels: int, *args: Any, **options: Any) -> Any:
    """Construct the layer registered as ``name`` for ``num_channels`` input channels.

    Further arguments go to the layer's constructor (``eps``, ``momentum``, ``num_groups``,
    ``dtype``, ...).
    """
    return layer_class(name)(num_channels, *args, **options)
