"""Where a run stands at a step boundary (what a checkpoint records besides the arrays)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
