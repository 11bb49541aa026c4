"""The axes probe: which input elements share a statistic, read off an implementation's outputs.

Changing one input element changes the mean and variance of every statistic it enters, so
it moves the outputs of exactly the elements that share a statistic with it (float64
probes; a scope that SN mixes in with a ratio of ``e**-60`` moves them by far less than the
``1e-9`` threshold). For every normalizer that set is a *box*: along each axis it holds

- every index: the axis is **reduced** (BN's N and spatial axes, LN's C and spatial axes);
- the changed element's index alone: the axis is **kept** (BN's C, LN's N);
- a group of indices: GN's channel groups, **consecutive** (channel ``c`` in group
  ``c // (C/G)``) or **interleaved** (``c % G``).

:func:`read_axes` turns the set into an :class:`Axes` record, which names the pattern
(``"C, H, W, per sample"``) and gives the statistic of every element (:meth:`Axes.ids`),
so the later probes (variance, eps, offset) standardize within the statistics the
implementation really uses. :func:`expected_axes` gives refnorm's pattern for a method, read
by the same function from :func:`refnorm.testing.reference.group_ids`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from refnorm.testing import reference

MOVED = 1e-9        # an output moved: float64 outputs of order 1 change by far more (~1/m)


@dataclass(frozen=True)
class Axes:
    """The statistic scope of the element at index 0, axis by axis.

    Attributes
    ----------
    shape : tuple of int
        The probe input's shape.
    kinds : tuple of str
        Per axis: ``"reduced"``, ``"kept"``, ``"consecutive"``, ``"interleaved"`` (a group
        of ``sizes[a]`` indices) or ``"other"``; empty when nothing moved.
    indices : tuple of tuple of int
        Per axis, its indices that share the statistic.
    box : bool
        False when the moved set is not a product of per-axis index sets.
    """

    shape: tuple[int, ...]
    kinds: tuple[str, ...]
    indices: tuple[tuple[int, ...], ...]
    box: bool

    @property
    def sizes(self) -> tuple[int, ...]:
        """Per axis, how many of its indices share the statistic."""
        return tuple(len(i) for i in self.indices)

    @property
    def moved(self) -> bool:
        """False when no output moved: the output does not depend on the input."""
        return bool(self.kinds)

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        """The axes every index of which shares the statistic."""
        return tuple(a for a, k in enumerate(self.kinds) if k == "reduced")

    @property
    def regular(self) -> bool:
        """A box whose every axis is reduced, kept or cut into equal groups."""
        return self.moved and self.box and "other" not in self.kinds

    def ids(self) -> np.ndarray | None:
        """The statistic of every element of :attr:`shape` (None unless :attr:`regular`)."""
        if not self.regular:
            return None
        idx = np.indices(self.shape)
        key = np.zeros(self.shape, dtype=np.int64)
        for a, (kind, k, n) in enumerate(zip(self.kinds, self.sizes, self.shape, strict=True)):
            part = {"reduced": 0 * idx[a], "kept": idx[a], "consecutive": idx[a] // k,
                    "interleaved": idx[a] % (n // k)}[kind]
            key = key * n + part
        return np.unique(key, return_inverse=True)[1].reshape(self.shape)

    def describe(self) -> str:
        """E.g. ``"N, H, W, per channel"`` or ``"C, per sample and position"``."""
        if not self.moved:
            return "nothing: the output does not move with its input"
        if not self.box:
            return "an irregular set of elements (not a product of axes)"
        names = axis_names(len(self.shape))
        over = ", ".join(names[a] for a, k in enumerate(self.kinds) if k == "reduced")
        for a, (kind, k) in enumerate(zip(self.kinds, self.sizes, strict=True)):
            if kind in ("consecutive", "interleaved", "other"):
                what = "channels" if a == 1 else f"indices of {names[a]}"
                group = {"consecutive": f"groups of {k} consecutive {what}",
                         "interleaved": f"groups of {k} {what} {self.shape[a] // k} apart",
                         "other": f"an irregular set of {k} {what}"}[kind]
                over = f"{over} and {group}" if over else group
        if not over:
            return "each element alone (no axis reduced)"
        kept = [a for a, k in enumerate(self.kinds) if k == "kept"]
        words = [{0: "sample", 1: "channel"}.get(a, names[a]) for a in kept]
        spatial = range(2, len(self.shape))
        if len(spatial) and all(a in kept for a in spatial):      # every position apart
            words = [w for a, w in zip(kept, words, strict=True) if a < 2] + ["position"]
        return f"{over}, per {_join(words)}" if words else f"{over} (one statistic)"


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def axis_names(ndim: int) -> tuple[str, ...]:
    """``("N", "C")`` and the spatial axes: L; H, W; D, H, W (S1, S2... beyond)."""
    spatial = {0: (), 1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}.get(
        ndim - 2, tuple(f"S{i + 1}" for i in range(ndim - 2)))
    return ("N", "C", *spatial)


def read_axes(moved: np.ndarray) -> Axes:
    """The :class:`Axes` of a boolean ``moved`` set that holds the element at index 0."""
    shape = moved.shape
    if not moved.any():
        return Axes(shape, (), (), True)
    proj = [np.flatnonzero(moved.any(axis=tuple(b for b in range(moved.ndim) if b != a)))
            for a in range(moved.ndim)]
    box = np.zeros(shape, dtype=bool)
    box[np.ix_(*proj)] = True
    kinds = []
    for n, p in zip(shape, proj, strict=True):
        k = len(p)
        if k == n:
            kinds.append("reduced")
        elif k == 1 and p[0] == 0:
            kinds.append("kept")
        elif n % k == 0 and np.array_equal(p, np.arange(k)):
            kinds.append("consecutive")
        elif n % k == 0 and np.array_equal(p, np.arange(0, n, n // k)):
            kinds.append("interleaved")
        else:
            kinds.append("other")
    return Axes(shape, tuple(kinds), tuple(tuple(int(i) for i in p) for p in proj),
                bool(np.array_equal(box, moved)))


def probe_axes(run: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...],
               rng: np.random.Generator) -> Axes:
    """Change the element at index 0 of a random input and read which outputs move.

    ``run`` maps a float64 input of ``shape`` to the implementation's float64 output.
    """
    x = rng.standard_normal(shape)
    y = run(x)
    x1 = x.copy()
    x1[(0,) * len(shape)] += 3.0
    return read_axes(np.abs(run(x1) - y) > MOVED)


def expected_axes(method: str, shape: tuple[int, ...], num_groups: int | None = None) -> Axes:
    """refnorm's :class:`Axes` for ``method`` (SN: its BN scope, the probe's ratios)."""
    ids = reference.group_ids("bn" if method == "sn" else method, shape,
                              num_groups=num_groups)
    return read_axes(ids == ids.flat[0])
