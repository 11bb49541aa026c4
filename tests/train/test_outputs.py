"""Metrics and plots."""

from __future__ import annotations

import json

from refnorm.train import outputs


def test_metrics_json_is_strict_json(tmp_path):
    row = {"epoch": 1, "train_loss": float("nan"), "test_loss": float("inf"), "test_acc": 0.5}
    outputs.write_metrics(tmp_path, [row])

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    rows = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert rows == [{"epoch": 1, "train_loss": None, "test_loss": None, "test_acc": 0.5}]

