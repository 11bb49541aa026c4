"""What the trainer's tests share: small configurations and a tiny data set."""

from __future__ import annotations

import dataclasses

import pytest

from refnorm.train.config import TrainConfig
from refnorm.train.loop import build_model, prepare_data
from refnorm.train.optim import SGD

SMALL = {"train_subset": 192, "widths": (8, 8, 8), "average_samples": 64}
TINY = {"train_subset": 32, "widths": (4, 4), "batch_size": 4, "accumulation": 2, "epochs": 2}


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 8, "accumulation": 2, "epochs": 2, **SMALL, **kw})


def params_of(result) -> dict:
    return {key: layer.params[name].copy() for key, layer, name in result.model.named_params()}


@pytest.fixture(scope="module")
def tiny_data():
    full = prepare_data(TrainConfig(**TINY))
    return dataclasses.replace(full, x_test=full.x_test[:40], y_test=full.y_test[:40])


def fresh(cfg):
    """The data, a new model and its optimizer for ``cfg``."""
    data = prepare_data(cfg)
    model = build_model(cfg, data)
    return data, model, SGD(model, lr=cfg.lr, momentum=cfg.momentum)


def sn_layers(model):
    return [layer for layer in model.layers() if "population_ready" in layer.state]


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib figures saved while the test runs (drawn with the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    seen = []
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: seen.append(fig) or real(
        fig, *a, **k))
    return seen
