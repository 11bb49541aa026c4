"""What a run shows and writes besides its checkpoint: metrics (strict JSON and CSV), the
curves plot, and the progress line."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from refnorm.train.folder import atomic_write
from refnorm.train.position import Position


def plotting_problem(outputs: str) -> str | None:
    """Why ``outputs`` (the plots a run or a study writes) cannot be drawn, in one sentence:
    matplotlib, the train extra, cannot be imported; None when they can. Runs and studies ask
    before their first step, so that none trains and then stops at its first plot."""
    try:
        import matplotlib  # noqa: F401  (pyplot is imported where it draws)
    except ImportError as exc:
        return (f"{outputs} needs matplotlib, which cannot be imported ({exc}): install the "
                "train extra (pip install 'refnorm[train]')")
    return None


def write_metrics(out: Path, history: list[dict], *, curves: str | None = None) -> None:
    """``metrics.json`` (strict JSON: a NaN or an infinity is written as null) and
    ``metrics.csv`` (one row per epoch); ``curves.png`` too when ``curves`` gives its title."""
    text = strict_json(history, indent=2)
    atomic_write(out / "metrics.json", lambda f: f.write(text.encode()))
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for r in history for k in r)))
    writer.writeheader()
    writer.writerows(history)
    atomic_write(out / "metrics.csv", lambda f: f.write(table.getvalue().encode()))
    if curves is not None:
        plot_curves(history, out / "curves.png", title=curves)


def plot_curves(history: list[dict], path: Path, *, title: str = "") -> None:
    """Loss and accuracy per epoch (whole epochs on the axis), titled ``title`` (the run's
    configuration)."""
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
    for ax in (ax_loss, ax_acc):
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def strict_json(value: Any, **options: Any) -> str:
    """``json.dumps`` that never writes ``NaN`` or ``Infinity`` (not JSON): they become null."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False, **options)


class Progress:
    """A one-line progress bar on a terminal; one line per epoch otherwise."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()

    def update(self, position: Position, epochs: int, steps: int) -> None:
        if not self.tty:
            return
        done = int(30 * position.step / steps)
        sys.stderr.write(f"\repoch {position.epoch + 1}/{epochs} [{'#' * done}{'.' * (30 - done)}] "
                         f"loss {position.totals.mean_loss():.3f} "
                         f"acc {position.totals.accuracy():.3f}")
        sys.stderr.flush()

    def start(self, message: str) -> None:
        """The run's first line (what trains, from where, into which folder)."""
        if self.enabled:
            sys.stderr.write(message + "\n")

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
