"""The trainer: learning, resuming bit-identically, checkpoints, and the promised errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from refnorm.train import trainer
from refnorm.train.folder import atomic_write
from refnorm.train.optim import SGD
from refnorm.train.trainer import (
    CHECKPOINT,
    FORMAT,
    CheckpointError,
    NonFinite,
    TrainConfig,
    build_model,
    load_checkpoint,
    predict,
    prepare_data,
    train,
    train_step,
)

SMALL = {"train_subset": 192, "widths": (8, 8, 8), "average_samples": 64}


def config(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 8, "accumulation": 2, "epochs": 2, **SMALL, **kw})


def params_of(result) -> dict:
    return {key: layer.params[name].copy() for key, layer, name in result.model.named_params()}


@pytest.mark.parametrize(
    ("norm", "weight"),
    [("none", None), ("bn", None), ("in", None), ("ln", None), ("gn", None), ("sn", None),
     ("syncbn", None), ("syncsn", None), ("gn", "ws"), ("none", "wn"), ("none", "np"),
     ("none", "trelu")],
)
def test_a_few_steps_reduce_the_loss(norm, weight):
    result = train(config(norm=norm, weight=weight, epochs=3, lr=0.05), progress=False)
    losses = [row["train_loss"] for row in result.history]
    # The mean training loss of the last epoch is below the first one's by a clear margin
    # (measured: by 0.09 (wn) to 0.55 (np) here, at 192 samples and 3 epochs).
    assert losses[-1] < losses[0] - 0.05, losses


def test_outputs_are_written(tmp_path):
    train(config(), out=tmp_path, progress=False)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / CHECKPOINT).exists()
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary files


def test_same_seed_same_run():
    a = params_of(train(config(norm="sn"), progress=False))
    b = params_of(train(config(norm="sn"), progress=False))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("stop", [(0, 3), (1, 5)])
def test_resume_is_bit_identical(tmp_path, stop):
    cfg = config(norm="sn", epochs=3)  # SN with the batch average: the most state to restore
    full = train(cfg, out=tmp_path / "full", progress=False)

    def interrupt(epoch, step, model):
        if (epoch, step) == stop:
            raise KeyboardInterrupt

    cut = train(cfg, out=tmp_path / "cut", progress=False, on_step=interrupt)
    assert cut.interrupted
    resumed = train(cfg, out=tmp_path / "cut", resume=True, progress=False)
    a, b = params_of(full), params_of(resumed)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    for la, lb in zip(full.model.layers(), resumed.model.layers(), strict=True):
        for key in la.state:
            np.testing.assert_array_equal(la.state[key], lb.state[key])

    def without_time(history):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

    assert without_time(full.history) == without_time(resumed.history)


def test_resume_after_a_finished_epoch(tmp_path):
    cfg = config(norm="bn", epochs=3)
    full = train(cfg, out=tmp_path / "full", progress=False)

    def stop_after_first_epoch(epoch, step, model):
        if epoch == 1 and step == 1:
            raise KeyboardInterrupt

    train(cfg, out=tmp_path / "cut", progress=False, on_step=stop_after_first_epoch)
    resumed = train(cfg, out=tmp_path / "cut", resume=True, progress=False)
    for key, value in params_of(full).items():
        np.testing.assert_array_equal(value, params_of(resumed)[key])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    good = {}

    def poison(epoch, step, model):
        if (epoch, step) == (1, 2):  # in the second epoch, after the first checkpoint
            good["bytes"] = (tmp_path / CHECKPOINT).read_bytes()
            conv = next(layer for layer in model.layers() if "w" in layer.params)
            conv.params["w"] = conv.params["w"] * np.float32("nan")

    with pytest.raises(NonFinite, match=r"the training loss became nan in step 3 of epoch 2; "
                                        r"the run stopped; the checkpoint after epoch 1 in .* "
                                        r"is kept \(it holds only finite values\)"):
        train(config(epochs=3), out=tmp_path, progress=False, on_step=poison)
    assert (tmp_path / CHECKPOINT).read_bytes() == good["bytes"]  # epoch 1's, untouched


def test_corrupted_checkpoint(tmp_path):
    cfg = config(epochs=1)
    train(cfg, out=tmp_path, progress=False)
    path = tmp_path / CHECKPOINT
    path.write_bytes(path.read_bytes()[:200])  # truncated
    with pytest.raises(CheckpointError, match=r"corrupted or not a refnorm checkpoint"):
        train(cfg, out=tmp_path, resume=True, progress=False)


def test_mismatched_checkpoint(tmp_path):
    train(config(epochs=1), out=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"another configuration; norm: checkpoint 'bn', "
                                              r"this run 'gn'"):
        train(config(epochs=1, norm="gn"), out=tmp_path, resume=True, progress=False)


def test_resume_without_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint to resume from"):
        train(config(), out=tmp_path, resume=True, progress=False)


def test_bad_configuration():
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1; got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"one update needs batch_size \* accumulation = 4096"):
        train(config(batch_size=64, accumulation=64), progress=False)


def test_interrupt_inside_a_step_forgets_its_running_statistics(tmp_path):
    # Ctrl-C during the second micro-batch of an update: BN's running statistics have already
    # seen the first one. The checkpoint must hold the state from before the update, or the
    # resumed run would count that micro-batch twice.
    cfg = config(norm="bn", epochs=2, batch_size=4, accumulation=4)
    full = train(cfg, out=tmp_path / "full", progress=False)
    calls = {"n": 0}

    def arm(epoch, step, model):
        if (epoch, step) == (0, 2):
            bn = next(layer for layer in model.layers() if layer.state)
            original = bn._forward

            def interrupted_forward(x, training):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise KeyboardInterrupt
                return original(x, training)

            bn._forward = interrupted_forward

    assert train(cfg, out=tmp_path / "cut", progress=False, on_step=arm).interrupted
    resumed = train(cfg, out=tmp_path / "cut", resume=True, progress=False)
    for key, value in params_of(full).items():
        np.testing.assert_array_equal(value, params_of(resumed)[key])
    for la, lb in zip(full.model.layers(), resumed.model.layers(), strict=True):
        for key in la.state:
            np.testing.assert_array_equal(la.state[key], lb.state[key])


def test_accumulation_averages_micro_batch_gradients():
    # GN never looks across samples, so 8 micro-batches of 2 make the same update as one
    # batch of 16 when their gradients are averaged (summed, they would be 8 times larger).
    a = train(config(norm="gn", batch_size=2, accumulation=8, epochs=1), progress=False)
    b = train(config(norm="gn", batch_size=16, accumulation=1, epochs=1), progress=False)
    for key, value in params_of(a).items():
        # float32 sums in a different order: ~1e-7 relative per step, 12 steps.
        np.testing.assert_allclose(value, params_of(b)[key], rtol=1e-4, atol=1e-5)


# -- what a checkpoint holds --------------------------------------------------------------------


def _fresh(cfg):
    data = prepare_data(cfg)
    model = build_model(cfg, data)
    return data, model, SGD(model, lr=cfg.lr, momentum=cfg.momentum)


def _sn_layers(model):
    return [layer for layer in model.layers() if "population_ready" in layer.state]


def test_checkpoint_carries_sn_population_readiness_in_the_state(tmp_path):
    # SN with the batch average: a checkpoint taken inside the first epoch holds layers with
    # no population statistics yet; one taken after an epoch holds ready ones.
    cfg = config(norm="sn", epochs=2)

    def stop(epoch, step, model):
        if (epoch, step) == (0, 2):
            raise KeyboardInterrupt

    assert train(cfg, out=tmp_path, progress=False, on_step=stop).interrupted
    data, model, opt = _fresh(cfg)
    load_checkpoint(tmp_path / CHECKPOINT, cfg, model, opt)
    assert _sn_layers(model) and not any(bool(l.state["population_ready"])
                                         for l in _sn_layers(model))
    with pytest.raises(RuntimeError, match="population statistics"):
        predict(model, data.x_test[:4])

    done = train(cfg, out=tmp_path, resume=True, progress=False)
    data, model, opt = _fresh(cfg)
    load_checkpoint(tmp_path / CHECKPOINT, cfg, model, opt)
    assert all(bool(l.state["population_ready"]) for l in _sn_layers(model))
    # Evaluation straight from the checkpoint gives the run's own last test accuracy.
    acc = float(np.mean(np.argmax(predict(model, data.x_test), 1) == data.y_test))
    assert acc == done.history[-1]["test_acc"]


def test_checkpoint_of_another_format_is_refused(tmp_path):
    cfg = config(epochs=1)
    train(cfg, out=tmp_path, progress=False)
    path = tmp_path / CHECKPOINT
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes().decode())
    meta["format"] = FORMAT - 1
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(CheckpointError, match=rf"has format {FORMAT - 1}, expected {FORMAT}"):
        train(cfg, out=tmp_path, resume=True, progress=False)


def test_checkpoint_missing_a_state_array_is_refused(tmp_path):
    cfg = config(epochs=1, norm="bn")
    train(cfg, out=tmp_path, progress=False)
    path = tmp_path / CHECKPOINT
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if not k.endswith("/running_var")}
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(CheckpointError,
                       match=r"does not match the model: lacks state/\d+/running_var"):
        train(cfg, out=tmp_path, resume=True, progress=False)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and not list(tmp_path.glob("*.tmp"))


# -- one step -----------------------------------------------------------------------------------


def _snapshot(model, opt):
    return ([{k: v.copy() for k, v in l.params.items()} for l in model.layers()],
            [{k: np.copy(v) for k, v in l.state.items()} for l in model.layers()],
            {k: v.copy() for k, v in opt.velocity.items()})


def _assert_same(a, b):
    for part_a, part_b in zip(a[:2], b[:2], strict=True):
        for da, db in zip(part_a, part_b, strict=True):
            assert da.keys() == db.keys()
            for k in da:
                np.testing.assert_array_equal(da[k], db[k])
    for k in a[2]:
        np.testing.assert_array_equal(a[2][k], b[2][k])


@pytest.mark.parametrize("where", ["forward", "update"])
def test_ctrl_c_inside_a_step_undoes_it(monkeypatch, where):
    cfg = config(norm="bn", batch_size=4, accumulation=2)
    data, model, opt = _fresh(cfg)
    x, y = data.x_train[:8], data.y_train[:8]
    train_step(model, opt, x, y, config=cfg, lr=0.05)  # momentum and running stats non-zero
    before = _snapshot(model, opt)
    if where == "forward":  # the second micro-batch, after BN saw the first
        calls = {"n": 0}
        original = model.forward

        def forward(x, training):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            return original(x, training)

        monkeypatch.setattr(model, "forward", forward)
    else:  # the update has replaced parameters and momentum when Ctrl-C arrives
        original_step = SGD.step

        def step(self, grads, lr):
            original_step(self, grads, lr)
            raise KeyboardInterrupt

        monkeypatch.setattr(SGD, "step", step)
    with pytest.raises(KeyboardInterrupt):
        train_step(model, opt, x, y, config=cfg, lr=0.05)
    _assert_same(before, _snapshot(model, opt))


# -- nothing non-finite is kept -------------------------------------------------------------------


TINY = {"train_subset": 32, "widths": (4, 4), "batch_size": 4, "accumulation": 2, "epochs": 2}


@pytest.fixture(scope="module")
def tiny_data():
    full = prepare_data(TrainConfig(**TINY))
    return dataclasses.replace(full, x_test=full.x_test[:40], y_test=full.y_test[:40])


def _blow_up_after(epoch_step):
    """An on_step hook that makes BN's running variance infinite at ``epoch_step``, as a
    running average can overflow: training-mode steps use batch statistics, so the loss
    stays finite, while evaluation would normalize by 1/sqrt(inf) (before the check, such a
    run ended with exit 0 and test accuracy 0.1)."""
    def hook(epoch, step, model):
        if (epoch, step) == epoch_step:
            bn = model.layers()[1]
            bn.state["running_var"] = bn.state["running_var"] + np.float32(np.inf)

    return hook


def test_infinite_running_variance_stops_the_run(tmp_path, tiny_data):
    cfg = TrainConfig(**TINY, norm="bn")
    with pytest.raises(NonFinite, match=r"^layer 1 \(BatchNorm\) state running_var became inf in "
                                        r"step 2 of epoch 2; the run stopped; the checkpoint "
                                        r"after epoch 1 in .* is kept"):
        train(cfg, out=tmp_path, progress=False, data=tiny_data, on_step=_blow_up_after((1, 1)))
    _, meta = trainer._read_checkpoint(tmp_path / CHECKPOINT)
    assert meta["epoch"] == 1
    with np.load(tmp_path / CHECKPOINT) as z:
        assert all(np.isfinite(z[k]).all() for k in z.files if z[k].dtype.kind == "f")


def test_an_overflowing_variance_stops_the_run(tmp_path, tiny_data):
    # Scaling the first convolution by 1e30: BN's batch variance overflows float32, which the
    # layer refuses (refnorm.core.moments); the trainer stops as for a non-finite value.
    def hook(epoch, step, model):
        if (epoch, step) == (1, 1):
            conv = model.layers()[0]
            conv.params["w"] = conv.params["w"] * np.float32(1e30)

    cfg = TrainConfig(**TINY, norm="bn")
    with pytest.raises(NonFinite, match=r"^in step 2 of epoch 2: the variance of x overflows "
                                        r"float32 .*; the run stopped; the checkpoint after "
                                        r"epoch 1 in .* is kept"):
        train(cfg, out=tmp_path, progress=False, data=tiny_data, on_step=hook)


def test_no_checkpoint_written_is_said(tmp_path, tiny_data):
    cfg = TrainConfig(**TINY, norm="bn")
    with pytest.raises(NonFinite, match=r"in step 2 of epoch 1; the run stopped; no checkpoint "
                                        r"was written$"):
        train(cfg, out=tmp_path, progress=False, data=tiny_data, on_step=_blow_up_after((0, 1)))
    assert not (tmp_path / CHECKPOINT).exists()
    with pytest.raises(NonFinite, match=r"no checkpoint was written \(no output folder\)$"):
        train(cfg, progress=False, data=tiny_data, on_step=_blow_up_after((0, 1)))


def test_a_checkpoint_from_an_earlier_run_is_not_called_this_runs(tmp_path, tiny_data):
    cfg = TrainConfig(**TINY, norm="bn")
    train(cfg, out=tmp_path, progress=False, data=tiny_data)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(NonFinite, match=r"no checkpoint was written \(the checkpoint.npz in .* "
                                        r"is from an earlier run\)$"):
        train(cfg, out=tmp_path, progress=False, data=tiny_data, on_step=_blow_up_after((0, 1)))
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_a_non_finite_gradient_is_not_applied(monkeypatch):
    cfg = config(norm="bn", batch_size=4, accumulation=2)
    data, model, opt = _fresh(cfg)
    before = _snapshot(model, opt)
    real = trainer.accumulate_gradients

    def poisoned(*args):
        grads, totals = real(*args)
        grads["0/w"] = grads["0/w"].copy()
        grads["0/w"].flat[3] = np.inf
        return grads, totals

    monkeypatch.setattr(trainer, "accumulate_gradients", poisoned)
    with pytest.raises(NonFinite, match=r"^layer 0 \(Conv2d\) gradient of w became inf"):
        train_step(model, opt, data.x_train[:8], data.y_train[:8], config=cfg, lr=0.05)
    params, _, velocity = _snapshot(model, opt)
    for a, b in zip(before[0], params, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    for k in velocity:
        np.testing.assert_array_equal(before[2][k], velocity[k])


def test_save_checkpoint_refuses_non_finite_arrays(tmp_path):
    cfg = config(norm="bn")
    data, model, opt = _fresh(cfg)
    bn = model.layers()[1]
    bn.state["running_mean"] = bn.state["running_mean"].copy()
    bn.state["running_mean"][0] = np.nan
    with pytest.raises(NonFinite, match=r"^state/1/running_mean became nan"):
        trainer.save_checkpoint(tmp_path / CHECKPOINT, cfg, model, opt, trainer.Position())
    assert not list(tmp_path.iterdir())


def test_metrics_json_is_strict_json(tmp_path):
    row = {"epoch": 1, "train_loss": float("nan"), "test_loss": float("inf"), "test_acc": 0.5}
    trainer.write_metrics(tmp_path, [row])

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    rows = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert rows == [{"epoch": 1, "train_loss": None, "test_loss": None, "test_acc": 0.5}]


def test_is_finite_is_exact():
    assert trainer.is_finite(np.full(10**6, np.finfo(np.float32).max, np.float32))
    assert trainer.is_finite(np.array([1e308, 1e308]))  # its float64 sum overflows
    assert not trainer.is_finite(np.array([1.0, np.inf, -np.inf]))  # sum nan
    assert not trainer.is_finite(np.array([np.nan], np.float16))
    assert trainer.is_finite(np.array(True)) and trainer.is_finite(np.arange(3))


# -- hand-edited checkpoints and unusable data --------------------------------------------------


def _edit_meta(key, value):
    def edit(arrays, meta):
        if value is _DROP:
            del meta[key]
        else:
            meta[key] = value
    return edit


_DROP = object()


def _edit_array(key, change):
    def edit(arrays, meta):
        if change is _DROP:
            del arrays[key]
        else:
            arrays[key] = change(arrays[key])
    return edit


def _no_meta(arrays, meta):
    meta.clear()
    meta["_drop"] = True


@pytest.mark.parametrize(("edit", "message"), [
    (_edit_meta("epoch", _DROP), r": its metadata lacks 'epoch'$"),
    (_edit_meta("step", "3"), r": metadata 'step' must be a int; got '3'$"),
    (_edit_meta("epoch", 7), r": metadata 'epoch' must be in 0..1; got 7$"),
    (_edit_meta("step", 99), r": metadata 'step' must be in 0..4 \(0 after the last epoch\); "
                             r"got 99$"),
    (_edit_meta("totals", {"loss": 1.0}), r": metadata 'totals' must hold finite numbers >= 0 "
                                          r"for exactly loss, correct, samples"),
    (_edit_meta("history", []), r": metadata 'history' must hold one row \(an object\) per "
                                r"finished epoch, 1; got 0 entries$"),
    (_edit_array("param/0/w", lambda a: a[:1]), r" does not match the model: param/0/w is "
                                                r"float32 \(1, 1, 3, 3\), the model's is float32 "
                                                r"\(4, 1, 3, 3\)$"),
    (_edit_array("velocity/0/w", lambda a: a.astype(np.float64)), r" does not match the "
                                                                   r"model: velocity/0/w is "
                                                                   r"float64"),
    (_edit_array("state/1/running_var", _DROP), r" does not match the model: lacks "
                                                r"state/1/running_var$"),
    (_edit_array("param/0/w", lambda a: np.where(a > 0, np.nan, a).astype(a.dtype)),
     r": param/0/w holds nan$"),
    (lambda arrays, meta: arrays.update(extra=np.zeros(2)), r" does not match the model: has "
                                                            r"arrays the model does not: "
                                                            r"extra$"),
])
def test_hand_edited_checkpoint_is_refused_by_name(tmp_path, tiny_data, edit, message):
    cfg = TrainConfig(**{**TINY, "epochs": 1, "train_subset": 16}, norm="bn")
    train(cfg, out=tmp_path, progress=False, data=tiny_data)
    path = tmp_path / CHECKPOINT
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes().decode())
    edit(arrays, meta)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path}{message}"):
        train(cfg, out=tmp_path, resume=True, progress=False, data=tiny_data)


def test_checkpoint_without_meta_is_refused(tmp_path):
    path = tmp_path / CHECKPOINT
    with open(path, "wb") as f:
        np.savez(f, w=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"is not a refnorm checkpoint: it has no 'meta'"):
        train(config(), out=tmp_path, resume=True, progress=False)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: dataclasses.replace(d, x_test=d.x_test[:0], y_test=d.y_test[:0]),
     r"^the test set of digits is empty: every epoch is evaluated on it"),
    (lambda d: dataclasses.replace(d, x_train=d.x_train[:, :, :1, :1],
                                   x_test=d.x_test[:, :, :1, :1]),
     r"^images of 1x1 are too small for 2 blocks: their 1 2x2 max-pools need at least 2x2$"),
    (lambda d: dataclasses.replace(d, x_test=d.x_test[:, :, :4]),
     r"^test images are \(1, 4, 8\) \(C, H, W\) but training images are \(1, 8, 8\)$"),
])
def test_unusable_data_is_refused_before_training(tiny_data, monkeypatch, change, message):
    def step(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(trainer, "train_step", step)
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**TINY), progress=False, data=change(tiny_data))


@pytest.mark.parametrize(("changes", "message"), [
    ({"seed": -1}, r"seed must be an int >= 0; got -1"),
    ({"lr": float("nan")}, r"lr must be a finite number > 0; got nan"),
    ({"momentum": 1.0}, r"momentum must be a finite number in \[0, 1\); got 1.0"),
    ({"norm": "xn"}, r"norm must be one of none, bn,"),
    ({"num_groups": 3, "norm": "gn"}, r"num_groups=3 must divide every width \(16, 32, 32\)"),
    ({"widths": ()}, r"widths must be a non-empty tuple of ints"),
    ({"train_subset": 0}, r"train_subset must be an int >= 1; got 0"),
])
def test_config_refuses_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)
