"""Metrics and plots."""

from __future__ import annotations

import json
import sys

import pytest

from refnorm.train import outputs


def test_metrics_json_is_strict_json(tmp_path):
    row = {"epoch": 1, "train_loss": float("nan"), "test_loss": float("inf"), "test_acc": 0.5}
    outputs.write_metrics(tmp_path, [row])

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    rows = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert rows == [{"epoch": 1, "train_loss": None, "test_loss": None, "test_acc": 0.5}]


def test_curves_have_whole_epochs_and_the_configuration_as_title(tmp_path, saved_figures):
    history = [{"epoch": e, "train_loss": 1.0 / e, "test_loss": 1.2 / e, "train_acc": 0.5,
                "test_acc": 0.4} for e in (1, 2, 3)]
    outputs.plot_curves(history, tmp_path / "curves.png", title="gn batch 2 x 16 accumulation")
    (fig,) = saved_figures
    assert fig._suptitle.get_text() == "gn batch 2 x 16 accumulation"
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_metrics_csv_has_a_column_for_every_key_of_any_row(tmp_path):
    """A resumed run's history can hold rows written by an earlier version (fewer columns)."""
    from refnorm.train.outputs import write_metrics

    write_metrics(tmp_path, [{"epoch": 1, "train_loss": 1.0},
                             {"epoch": 2, "train_loss": 0.5, "collective_share": 0.1}])
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines == ["epoch,train_loss,collective_share", "1,1.0,", "2,0.5,0.1"]


def test_a_run_and_a_study_without_matplotlib_refuse_before_training(tmp_path, monkeypatch):
    """The library's train() and run_study() ask for matplotlib before their first step when
    they will draw; train() without ``out`` draws nothing and needs none."""
    from refnorm.train import TrainConfig, train
    from refnorm.train.study import QUICK, run_study

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    config = TrainConfig(epochs=1, batch_size=64)
    with pytest.raises(ImportError, match=r"curves\.png needs matplotlib.*refnorm\[train\]"):
        train(config, out=tmp_path / "run", progress=False)
    with pytest.raises(ImportError, match=r"plots needs matplotlib.*refnorm\[train\]"):
        run_study(QUICK, tmp_path / "study", log=lambda line: None)
    assert not (tmp_path / "run").exists() and not (tmp_path / "study").exists()
    steps = []
    result = train(config, progress=False, on_step=lambda e, s, m: steps.append(s))
    assert steps and len(result.history) == 1


def test_curves_label_each_line_by_the_values_it_draws(tmp_path, saved_figures):
    history = [{"epoch": e, "train_loss": 1.0 / e, "test_loss": 2.0 / e, "train_acc": 0.9,
                "test_acc": 0.4, "train_acc_running": 0.7} for e in (1, 2)]
    outputs.plot_curves(history, tmp_path / "curves.png")
    (fig,) = saved_figures
    lines = {(ax.get_ylabel(), line.get_label()): list(line.get_ydata())
             for ax in fig.axes for line in ax.get_lines()}
    assert lines == {("cross-entropy", "train"): [1.0, 0.5], ("cross-entropy", "test"): [2.0, 1.0],
                     ("accuracy", "train (eval mode)"): [0.9, 0.9],
                     ("accuracy", "test"): [0.4, 0.4]}


def test_strict_json_writes_null_for_non_finite_values_inside_tuples():
    text = outputs.strict_json({"losses": (1.0, float("nan"), float("-inf"))})
    assert json.loads(text) == {"losses": [1.0, None, None]}


def test_the_epoch_line_names_each_accuracy_by_its_set(capsys):
    row = {"epoch": 3, "train_loss": 0.25, "train_acc": 0.9, "test_acc": 0.4, "seconds": 1.5}
    outputs.Progress(enabled=True).epoch_done(row)
    err = capsys.readouterr().err
    assert err.startswith("epoch 3: train loss 0.250, train acc 0.900, test acc 0.400 (1.5 s)")


def test_write_metrics_draws_the_curves_when_given_their_title(tmp_path):
    history = [{"epoch": e, "train_loss": 1.0 / e, "test_loss": 1.2 / e, "train_acc": 0.5,
                "test_acc": 0.4} for e in (1, 2)]
    outputs.write_metrics(tmp_path, history)
    assert not (tmp_path / "curves.png").exists()
    outputs.write_metrics(tmp_path, history, curves="bn batch 32 x 1 accumulation")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_disabled_progress_writes_nothing(capsys):
    """A study's runs train with progress off: not even their first and last lines."""
    progress = outputs.Progress(enabled=False)
    progress.start("training bn -> runs/train")
    progress.epoch_done({"epoch": 1, "train_loss": 0.5, "train_acc": 0.9, "test_acc": 0.8,
                         "seconds": 1.0})
    progress.close("done")
    assert capsys.readouterr().err == ""
