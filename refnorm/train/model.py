"""A small conv-net built from refnorm's own layers, with the normalizer chosen by name.

    [conv 3x3 -> norm -> relu -> (max-pool 2x2)] x len(widths) -> global average pool -> linear

``norm`` is an activation normalizer of :mod:`refnorm.registry` (``"bn"``, ``"in"``, ``"ln"``,
``"gn"``, ``"sn"``, ``"syncbn"``, ``"syncsn"``) or ``"none"``; ``weight`` optionally swaps the
convolutions for a weight-side method (``"ws"``, ``"wn"``, ``"np"``, ``"trelu"``), so that
GN+WS is ``norm="gn", weight="ws"``. NP and TReLU layers carry their own nonlinearity (the
re-normalized and the translated ReLU), so their blocks have no separate ReLU; with TReLU a
per-channel scale and shift follows the last block, the only gamma/beta such a network has
(Gitman & Ginsburg, §3.2). Every block but the last halves the spatial size.

``norm_layer`` builds the normalizers from a function of one's own instead of the registry: a
layer made with :func:`refnorm.layer.from_functions` (a lesson's Batch Normalization) then
trains in this network, through ``refnorm.train.train(config, norm_layer=...)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import numpy as np

from refnorm import registry
from refnorm.backend import Array, array_namespace, on_device
from refnorm.core import affine_backward, affine_forward
from refnorm.core.checks import (
    check_bool,
    check_device,
    check_param_dtype,
    check_positive_int,
    dtype_name,
)
from refnorm.dispatch import check_path
from refnorm.layer import Layer
from refnorm.nn import GlobalAvgPool, MaxPool2d, ReLU

NORMS = ("none", "bn", "in", "ln", "gn", "sn", "syncbn", "syncsn")
WEIGHTS = (None, "ws", "wn", "np", "trelu")


class ChannelAffine(Layer):
    """``y = gamma * x + beta`` per channel (gamma ones, beta zeros), in namespace ``xp``
    (default numpy) on ``device`` (default: the namespace's; see
    :class:`~refnorm.layer.Layer`), with ``dtype`` (default float32)."""

    def __init__(self, num_channels: int, *, dtype: Any = None, xp: ModuleType | None = None,
                 device: Any = None) -> None:
        super().__init__(dtype=dtype, xp=xp, device=device)
        num_channels = check_positive_int("num_channels", num_channels)
        where = on_device(self.device)
        self.params = {"gamma": self.xp.ones((num_channels,), dtype=self.dtype, **where),
                       "beta": self.xp.zeros((num_channels,), dtype=self.dtype, **where)}

    def _forward(self, x: Array, training: bool) -> tuple[Array, Array]:
        return affine_forward(x, self.params["gamma"], self.params["beta"]), x   # GG Eq. (7)

    def _backward(self, dy: Array, cache: Array) -> tuple[Array, dict[str, Array]]:
        dx, dgamma, dbeta = affine_backward(dy, cache, self.params["gamma"])
        return dx, {"gamma": dgamma, "beta": dbeta}


class ConvNet:
    """The trainer's model.

    Parameters
    ----------
    in_channels, num_classes : int
    norm : str
        One of :data:`NORMS`.
    weight : str or None
        One of :data:`WEIGHTS`.
    widths : tuple of int
        Channels of each block.
    num_groups : int
        G for ``norm="gn"`` (must divide every width).
    norm_options : dict, optional
        Extra keyword arguments for the normalizer (e.g. ``{"inference": "batch_average"}``
        for SN, ``{"comm": comm}`` for the synchronized ones).
    norm_layer : callable, optional
        Builds every block's normalizer in place of the registered ``norm``: called as
        ``norm_layer(width, dtype=dtype, xp=xp, device=device)`` for a block of ``width``
        channels, it returns a :class:`~refnorm.layer.Layer` whose parameters are in ``dtype``
        (else a ``TypeError`` names the one that is not), e.g. one made by
        :func:`~refnorm.layer.from_functions` (``functools.partial(refnorm.build, "bn")`` builds
        what ``norm="bn"`` does). ``norm`` still names the method the blocks hold (it decides
        that the convolutions before it have no bias, and what a run reports), so it cannot be
        ``"none"``; ``num_groups`` and ``norm_options`` are not passed to it.
    seed : int
        Seeds every layer's initialization.
    dtype : parameter dtype of ``xp`` (default float32); :meth:`forward` casts its input to it
    xp : module, default numpy
        The array namespace of every parameter and state (numpy, CuPy, array_api_strict).
    device : device of ``xp``, optional
        Where every layer creates its parameters and state (e.g. an
        ``array_api_strict.Device``); ``None``: the namespace's default. Inputs to
        :meth:`forward` and :meth:`backward` must be on it, and every output, gradient and
        running statistic stays on it.
    path : {"reference", "fast"}, optional
        Every layer's :attr:`~refnorm.layer.Layer.path`; default: the process-wide choice,
        else the reference.
    input_grad : bool, default True
        Whether :meth:`backward` returns the gradient with respect to the images. The trainer
        needs none and says False: the first convolution then skips its input gradient (the
        first layer's :attr:`~refnorm.layer.Layer.input_grad`), as PyTorch does for an input
        that does not require a gradient.
    """

    def __init__(self, *, in_channels: int, num_classes: int, norm: str = "bn",
                 weight: str | None = None, widths: tuple[int, ...] = (16, 32, 32),
                 num_groups: int = 4, norm_options: dict | None = None,
                 norm_layer: Callable[..., Layer] | None = None, seed: int = 0,
                 dtype: Any = None, xp: ModuleType | None = None, device: Any = None,
                 path: str | None = None, input_grad: bool = True) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
        if weight not in WEIGHTS:
            raise ValueError(f"weight must be one of {', '.join(w or 'None' for w in WEIGHTS)}; "
                             f"got {weight!r}")
        if norm_layer is not None and not callable(norm_layer):
            raise TypeError(f"norm_layer must be a function that builds a layer; got "
                            f"{type(norm_layer).__name__}")
        if norm_layer is not None and norm == "none":
            raise ValueError("norm_layer builds the blocks' normalizers, but norm='none' asks "
                             "for none; name the method it stands for (e.g. norm='bn')")
        if path is not None:
            check_path(path)
        self.norm, self.weight = norm, weight
        self.xp = np if xp is None else xp
        self.dtype = dtype = check_param_dtype(self.xp, dtype)
        self.device = check_device(self.xp, device)
        place = {"dtype": dtype, "xp": self.xp, "device": self.device}
        blocks: list[Layer] = []
        c_in = in_channels
        for i, width in enumerate(widths):
            blocks.append(self._conv(c_in, width, seed + i, has_norm=norm != "none"))
            if norm_layer is not None:
                blocks.append(self._own_norm(norm_layer, width))
            elif norm != "none":
                options = dict(norm_options or {})
                if norm == "gn":
                    options.setdefault("num_groups", num_groups)
                blocks.append(registry.build(norm, width, **place, **options))
            if weight not in ("np", "trelu"):
                blocks.append(ReLU())
            if i < len(widths) - 1:
                blocks.append(MaxPool2d(2))
            c_in = width
        if weight == "trelu":
            blocks.append(ChannelAffine(c_in, **place))
        blocks.append(GlobalAvgPool())
        blocks.append(registry.build("linear", c_in, num_classes, seed=seed + 100, **place))
        for layer in blocks:
            layer.path = path
        blocks[0].input_grad = check_bool("input_grad", input_grad)
        self._layers = blocks

    def _conv(self, c_in: int, c_out: int, seed: int, *, has_norm: bool) -> Layer:
        """The block's 3x3 convolution (padded to keep the size), reparameterized by
        ``self.weight`` when one is chosen; no bias in front of a normalizer (NP keeps its
        beta, which sits inside its ReLU)."""
        place = {"dtype": self.dtype, "xp": self.xp, "device": self.device}
        if self.weight is None:
            return registry.build("conv", c_in, c_out, 3, padding=1, bias=not has_norm,
                                  seed=seed, **place)
        options: dict[str, Any] = {"padding": 1, "seed": seed, **place}
        if self.weight in ("wn", "ws"):
            options["bias"] = not has_norm
        return registry.build(self.weight, c_in, c_out, 3, **options)

    def _own_norm(self, norm_layer: Callable[..., Layer], width: int) -> Layer:
        layer = norm_layer(width, dtype=self.dtype, xp=self.xp, device=self.device)
        if not isinstance(layer, Layer):
            raise TypeError(f"norm_layer must return a refnorm Layer; it returned "
                            f"{type(layer).__name__}")
        for name, p in layer.params.items():  # else it trains in another dtype without a word
            if getattr(p, "dtype", self.dtype) != self.dtype:
                raise TypeError(f"norm_layer built a layer whose parameter {name!r} is "
                                f"{dtype_name(p.dtype)} in this {dtype_name(self.dtype)} "
                                f"network: make its arrays in the dtype it is given "
                                f"(norm_layer(width, dtype=..., xp=..., device=...))")
        return layer

    def __deepcopy__(self, memo: dict) -> ConvNet:
        # the array namespace (a module) is shared, everything else copied, as Layer does
        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = value if isinstance(value, ModuleType) else copy.deepcopy(
                value, memo)
        return new

    def layers(self) -> list[Layer]:
        """The layers in forward order."""
        return self._layers

    def forward(self, x: Array, training: bool) -> Array:
        """Logits (N, num_classes) for images (N, C, H, W), computed in the model's dtype.

        Raises
        ------
        ValueError
            A layer's refusal (a variance overflowing the dtype, ...), prefixed with the
            layer it came from: ``layer 1 (BatchNorm): the variance of x overflows ...``
            (``x`` is that layer's input).
        """
        x = array_namespace(x).astype(x, self.dtype, copy=False)
        for i, layer in enumerate(self._layers):
            try:
                x = layer.forward(x, training)
            except ValueError as exc:
                raise ValueError(f"layer {i} ({type(layer).__name__}): {exc}") from exc
        return x

    def backward(self, dlogits: Array) -> Array | None:
        """Fill every layer's ``grads``; return dL/dx (None if built with
        ``input_grad=False``)."""
        grad: Array | None = dlogits
        for layer in reversed(self._layers):
            grad = layer.backward(grad)
        return grad

    def named_params(self) -> Iterator[tuple[str, Layer, str]]:
        """(key, layer, name) for every parameter; key is ``"<layer index>/<name>"``."""
        for i, layer in enumerate(self._layers):
            for name in layer.params:
                yield f"{i}/{name}", layer, name



def on_model(model: ConvNet, a: Any) -> Array:
    """``a`` (a numpy batch, or an array already there) in the model's namespace and on its
    device: one host-to-device copy for a numpy batch and a GPU or array_api_strict model,
    none for a numpy model."""
    return model.xp.asarray(a, **on_device(model.device))
