"""The trainer on both paths: the fast kernels and the reference train the same
network to the same numbers in float64."""

from __future__ import annotations

import numpy as np
import pytest

from refnorm.dispatch import use_path
from refnorm.train.loop import build_model, prepare_data, train
from refnorm.train.study import StudyConfig, job_configs


@pytest.mark.parametrize("method", ["bn", "gn", "sn", "gn+ws", "wn", "in", "ln"])
def test_fast_and_reference_paths_train_to_the_same_accuracies_in_float64(method):
    """Every normalizer, conv, pooling and ReLU of the model runs fused on one path and in
    readable numpy on the other; in float64 the two differ by rounding only (~1e-15
    relative per operation), far below what changes a prediction, so the accuracy table
    is identical and the parameters agree to 1e-9 relative after two epochs (8 updates of
    SGD with momentum: rounding differences of ~1e-15 grow by the updates' sensitivity, far
    from 1e-9 here, whereas one float32 operation on either path would differ by ~1e-7)."""
    study = StudyConfig(methods=(method,), batch_sizes=(4,), update_size=8, epochs=2,
                        train_subset=32, dtype="float64", seeds=(0,))
    (config,) = job_configs(study)
    results = {}
    for path in ("fast", "reference"):
        with use_path(path):
            results[path] = train(config, progress=False)
    fast, ref = results["fast"], results["reference"]
    for key in ("test_acc", "train_acc"):
        assert [h[key] for h in fast.history] == [h[key] for h in ref.history]
    np.testing.assert_allclose([h["train_loss"] for h in fast.history],
                               [h["train_loss"] for h in ref.history], rtol=1e-9)
    for (name, layer, p), (_, layer_r, _) in zip(fast.model.named_params(),
                                                 ref.model.named_params(), strict=True):
        a, b = layer.params[p], layer_r.params[p]
        assert a.dtype == np.float64
        scale = max(float(np.max(np.abs(b))), 1e-300)
        assert float(np.max(np.abs(a - b))) <= 1e-9 * scale, name


def test_the_model_computes_in_its_dtype():
    config = StudyConfig(methods=("bn",), batch_sizes=(4,), update_size=4, epochs=1,
                         train_subset=8, dtype="float64", seeds=(0,))
    (train_config,) = job_configs(config)
    data = prepare_data(train_config)
    model = build_model(train_config, data)
    assert data.x_train.dtype == np.float32
    assert model.forward(data.x_train[:4], training=True).dtype == np.float64


def test_the_trainer_asks_for_the_fast_path_unless_the_process_chose(monkeypatch):
    """Layers default to the reference (tests/test_dispatch.py); the trainer's model asks for
    the fast path, and ``--path`` / ``REFNORM_PATH`` (the process-wide choice) overrides it."""
    monkeypatch.delenv("REFNORM_PATH", raising=False)
    study = StudyConfig(methods=("gn+ws",), batch_sizes=(4,), update_size=4, epochs=1,
                        train_subset=8, seeds=(0,))
    (config,) = job_configs(study)
    data = prepare_data(config)
    assert {layer.compute_path() for layer in build_model(config, data).layers()} == {"fast"}
    with use_path("reference"):
        model = build_model(config, data)
    assert {layer.compute_path() for layer in model.layers()} == {"reference"}
    monkeypatch.setenv("REFNORM_PATH", "reference")
    assert {layer.compute_path() for layer in build_model(config, data).layers()} == {
        "reference"}
