"""Build any registered layer by name: ``refnorm.build("gn", 64, num_groups=32)``.

The first positional argument of every registered layer is the number of input channels
(C of an (N, C, *spatial) input); ``refnorm gradcheck`` relies on that.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

_LAYERS: dict[str, type] = {}

T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a :class:`~refnorm.norms.base.Layer` buildable as ``name``."""

    def decorate(cls: T) -> T:
        if name in _LAYERS and _LAYERS[name] is not cls:
            raise ValueError(f"a layer is already registered as {name!r}: {_LAYERS[name]}")
        cls.name = name
        _LAYERS[name] = cls
        return cls

    return decorate


def names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(_LAYERS)


def layer_class(name: str) -> type:
    """The class registered as ``name``."""
    try:
        return _LAYERS[name]
    except KeyError:
        raise ValueError(
            f"unknown layer {name!r}; expected one of {', '.join(names())}"
        ) from None


def build(name: str, num_channels: int, *args: Any, **options: Any) -> Any:
    """Construct the layer registered as ``name`` for ``num_channels`` input channels.

    Further arguments go to the layer's constructor (``eps``, ``momentum``, ``num_groups``,
    ``dtype``, ...).
    """
    return layer_class(name)(num_channels, *args, **options)
