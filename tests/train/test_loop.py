"""The training loop: learning, resuming bit-identically, interrupted steps, non-finite values
and the promised errors."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest

import refnorm
from refnorm.train import TrainConfig, checkpoint, loop, train
from refnorm.train.checkpoint import CHECKPOINT, CheckpointError
from refnorm.train.finite import NonFinite
from refnorm.train.folder import OutputFolderError, atomic_write, check_room
from refnorm.train.loop import build_model, check_data, prepare_data, train_step
from refnorm.train.optim import SGD
from refnorm.train.parallel import epoch_steps, statistic_parts
from tests.train.conftest import TINY, config, fresh, params_of, sn_layers


@pytest.mark.parametrize(
    ("norm", "weight"),
    [("none", None), ("bn", None), ("in", None), ("ln", None), ("gn", None), ("sn", None),
     ("syncbn", None), ("syncsn", None), ("gn", "ws"), ("none", "wn"), ("none", "np"),
     ("none", "trelu"), ("bn", "wn")],
)
def test_a_few_steps_reduce_the_loss(norm, weight):
    result = train(config(norm=norm, weight=weight, epochs=3, lr=0.05), progress=False)
    losses = [row["train_loss"] for row in result.history]
    # The mean training loss of the last epoch is below the first one's by a clear margin
    # (measured: by 0.09 (wn) to 0.55 (np) here, at 192 samples and 3 epochs).
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize(("norm", "initialized"), [("none", True), ("bn", False)])
def test_data_dependent_init_sets_wn_layers_with_a_bias_only(norm, initialized):
    """WN without a normalizer: its gains come from the batch (Salimans & Kingma); WN in front
    of BN has no bias to set and keeps g = 1 (it used to stop the run with init_from_batch's
    error)."""
    cfg = config(norm=norm, weight="wn")
    data, model, _ = fresh(cfg)
    wn = [layer for layer in model.layers() if "v" in layer.params]
    assert len(wn) == len(cfg.widths)
    assert all(("b" in layer.params) == initialized for layer in wn)
    loop.data_dependent_init(model, data, cfg)
    for layer in wn:
        assert np.all(layer.params["g"] == 1) != initialized


def test_outputs_are_written(tmp_path):
    train(config(), out=tmp_path, progress=False)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / CHECKPOINT).exists()
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary files


def test_the_metrics_are_written_every_epoch_and_the_curves_when_the_run_finishes(tmp_path):
    """As the README and ``refnorm train --help`` say: a run stopped in its second epoch has
    the first epoch's metrics and checkpoint, and no curves.png."""
    seen = {}

    def stop_in_epoch_two(epoch, step, model):
        if epoch == 1 and step == 1:
            seen["metrics"] = json.loads((tmp_path / "metrics.json").read_text())
            raise KeyboardInterrupt

    result = train(config(), out=tmp_path, progress=False, on_step=stop_in_epoch_two)
    assert result.interrupted
    assert [r["epoch"] for r in seen["metrics"]] == [1]
    assert (tmp_path / CHECKPOINT).exists() and not (tmp_path / "curves.png").exists()
    train(config(), out=tmp_path, progress=False, resume=True)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_run_names_the_place_its_stop_named(tmp_path, capsys):
    """"stopped by Ctrl-C (SIGINT) at step 2 of epoch 2", then "resuming ... at step 2 of
    epoch 2": the resume line counted epochs from 0 ("from epoch 1, step 2")."""
    def stop(epoch, step, model):
        if (epoch, step) == (1, 2):
            raise KeyboardInterrupt

    train(config(), out=tmp_path, progress=True, on_step=stop)
    stopped = capsys.readouterr().err
    assert "stopped by Ctrl-C (SIGINT) at step 2 of epoch 2: checkpoint saved" in stopped
    train(config(), out=tmp_path, progress=True, resume=True)
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("resuming ") and first.endswith(f" at step 2 of epoch 2 -> {tmp_path}")


def test_the_schedule_runs_over_the_whole_run_not_each_epoch():
    """Every trainer test compared runs with runs (resume, devices), which share a schedule
    restarted every epoch; the history's learning rate is the last step's of each epoch."""
    from refnorm.train.optim import learning_rate
    from refnorm.train.parallel import epoch_steps

    cfg = config(norm="bn", epochs=3, schedule="linear")
    history = train(cfg, progress=False).history
    steps = len(epoch_steps(cfg.train_subset, cfg.batch_size * cfg.accumulation, 1))
    want = [learning_rate("linear", cfg.lr, (e + 1) * steps - 1, steps * cfg.epochs)
            for e in range(cfg.epochs)]
    assert [row["lr"] for row in history] == pytest.approx(want)
    assert want[0] > want[1] > want[2]


def test_each_epoch_draws_its_own_order(monkeypatch):
    """The module docstring's promise: epoch e visits default_rng([seed, e]).permutation."""
    seen = []
    real = loop.run_step

    def spy(run, position, picked):
        seen.append((position.epoch, picked.copy()))
        return real(run, position, picked)

    monkeypatch.setattr(loop, "run_step", spy)
    cfg = config(norm="bn", epochs=2)
    train(cfg, progress=False)
    orders = {e: np.concatenate([p for epoch, p in seen if epoch == e]) for e in (0, 1)}
    for e, order in orders.items():
        want = np.random.default_rng([cfg.seed, e]).permutation(cfg.train_subset)
        np.testing.assert_array_equal(order, want[:len(order)])
    assert not np.array_equal(orders[0], orders[1])


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


def test_resume_without_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint to resume from"):
        train(config(), out=tmp_path, resume=True, progress=False)


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
    data, model, opt = fresh(cfg)
    x, y = data.x_train[:8], data.y_train[:8]
    # momentum and running stats non-zero:
    train_step(model, opt, x, y, batch_size=cfg.batch_size, lr=0.05)
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
        train_step(model, opt, x, y, batch_size=cfg.batch_size, lr=0.05)
    _assert_same(before, _snapshot(model, opt))


def test_an_update_that_overflows_is_undone():
    """train_step's promise: a parameter made infinite by the update (float32 w - lr v with
    lr = 1e39) raises NonFinite with the parameters, the momentum and the running statistics
    as before the step, as for a non-finite gradient or Ctrl-C."""
    cfg = config(norm="bn", batch_size=4, accumulation=2)
    data, model, opt = fresh(cfg)
    x, y = data.x_train[:8], data.y_train[:8]
    train_step(model, opt, x, y, batch_size=cfg.batch_size, lr=0.05)  # momentum non-zero
    before = _snapshot(model, opt)
    with pytest.raises(NonFinite, match=r"parameter \w+ became -?inf"):
        train_step(model, opt, x, y, batch_size=cfg.batch_size, lr=1e39)
    _assert_same(before, _snapshot(model, opt))


def test_a_parameter_the_update_makes_infinite_stops_the_run_at_that_step(tiny_data):
    """The check after every update: lr = 1e39 turns float32 weights into infinities in the
    first update, which stops the run naming the parameter and step 1 (not the NaN loss of
    the step after it)."""
    cfg = TrainConfig(**{**TINY, "norm": "bn", "epochs": 1, "lr": 1e39})
    with pytest.raises(NonFinite, match=r"^layer \d+ \(\w+\) parameter \w+ became -?inf in "
                                        r"step 1 of epoch 1; the run stopped"):
        train(cfg, progress=False, data=tiny_data)


# -- nothing non-finite is kept -------------------------------------------------------------------


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
    meta = checkpoint.read_checkpoint(tmp_path / CHECKPOINT).meta
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
    with pytest.raises(NonFinite, match=r"^in step 2 of epoch 2: layer 1 \(BatchNorm\): the "
                                        r"variance of x overflows "
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
        train(cfg, out=tmp_path, progress=False, data=tiny_data, on_step=_blow_up_after((0, 1)),
              overwrite=True)
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_a_resumed_run_that_stops_keeps_the_checkpoint_it_resumed_from(tmp_path, tiny_data):
    """Until the resumed run writes its own, the checkpoint it resumed from is the one kept,
    and the message says so (not that no checkpoint was written)."""
    cfg = TrainConfig(**TINY, norm="bn")

    def stop(epoch, step, model):
        if (epoch, step) == (0, 1):
            raise KeyboardInterrupt

    assert train(cfg, out=tmp_path, progress=False, data=tiny_data, on_step=stop).interrupted
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(NonFinite, match=r"in step 3 of epoch 1; the run stopped; the checkpoint "
                                        r"at step 1 of epoch 1 in .* is kept \(it holds only "
                                        r"finite values\)$"):
        train(cfg, out=tmp_path, resume=True, progress=False, data=tiny_data,
              on_step=_blow_up_after((0, 2)))
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_resuming_into_a_folder_that_does_not_exist_says_so(tmp_path, tiny_data):
    missing = tmp_path / "missing"
    with pytest.raises(CheckpointError, match=rf"^no checkpoint to resume from: {missing} is not "
                                              r"a folder$"):
        train(TrainConfig(**TINY), out=missing, resume=True, progress=False, data=tiny_data)
    assert not missing.exists()


def test_a_non_finite_gradient_is_not_applied(monkeypatch):
    cfg = config(norm="bn", batch_size=4, accumulation=2)
    data, model, opt = fresh(cfg)
    before = _snapshot(model, opt)
    real = loop.local_step

    def poisoned(*args, **kwargs):  # a gradient that turns infinite after the local checks
        grads, totals, problem = real(*args, **kwargs)
        grads["0/w"] = grads["0/w"].copy()
        grads["0/w"].flat[3] = np.inf
        return grads, totals, problem

    monkeypatch.setattr(loop, "local_step", poisoned)
    with pytest.raises(NonFinite, match=r"^layer 0 \(Conv2d\) gradient of w became inf"):
        train_step(model, opt, data.x_train[:8], data.y_train[:8], batch_size=cfg.batch_size,
                   lr=0.05)
    params, _, velocity = _snapshot(model, opt)
    for a, b in zip(before[0], params, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    for k in velocity:
        np.testing.assert_array_equal(before[2][k], velocity[k])


# -- unusable data --------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: dataclasses.replace(d, x_test=d.x_test[:0], y_test=d.y_test[:0]),
     r"^the test set of digits is empty: every epoch is evaluated on it"),
    (lambda d: dataclasses.replace(d, x_train=d.x_train[:, :, :1, :1],
                                   x_test=d.x_test[:, :, :1, :1]),
     r"^images of 1x1 are too small for 2 blocks: their 1 2x2 max-pools need at least 2x2$"),
    (lambda d: dataclasses.replace(d, x_test=d.x_test[:, :, :4]),
     r"^test images are \(1, 4, 8\) \(C, H, W\) but training images are \(1, 8, 8\)$"),
    # train(data=...) takes arrays as given: a label outside the classes (a negative one
    # indexes from the end) stopped the run in its first step as non-finite, or after an
    # epoch of training at the evaluation
    (lambda d: dataclasses.replace(d, y_train=np.where(np.arange(len(d.y_train)) == 0, -1,
                                                       d.y_train)),
     r"^the training labels of digits must be class indices in 0\.\.9; got values in -1\.\.\d$"),
    (lambda d: dataclasses.replace(d, y_test=np.where(np.arange(len(d.y_test)) == 0, 10,
                                                      d.y_test)),
     r"^the test labels of digits must be class indices in 0\.\.9; got values in \d\.\.10$"),
])
def test_unusable_data_is_refused_before_training(tiny_data, monkeypatch, change, message):
    def step(*args, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(loop, "run_step", step)  # every step of train() goes through it
    with pytest.raises(ValueError, match=message):
        train(TrainConfig(**TINY), progress=False, data=change(tiny_data))


def test_the_training_subset_keeps_each_image_with_its_label_and_follows_the_seed():
    full = prepare_data(TrainConfig())
    pairs = {(x.tobytes(), int(y)) for x, y in zip(full.x_train, full.y_train, strict=True)}
    subsets = [prepare_data(TrainConfig(train_subset=64, seed=seed)) for seed in (0, 0, 1)]
    for sub in subsets:
        kept = {(x.tobytes(), int(y)) for x, y in zip(sub.x_train, sub.y_train, strict=True)}
        assert len(kept) == 64 and kept <= pairs  # 64 distinct samples, labels unchanged
    np.testing.assert_array_equal(subsets[0].x_train, subsets[1].x_train)
    assert not np.array_equal(subsets[0].x_train, subsets[2].x_train)  # another seed, others
    np.testing.assert_array_equal(subsets[0].x_test, full.x_test)  # the test set is whole


def test_a_training_subset_keeps_the_order_of_the_training_set():
    """The subset's samples stay in the data set's order, so a subset of every sample is the
    data set itself (and trains as a run without ``train_subset``)."""
    full = prepare_data(TrainConfig())
    whole = prepare_data(TrainConfig(train_subset=len(full.y_train)))
    np.testing.assert_array_equal(whole.x_train, full.x_train)
    np.testing.assert_array_equal(whole.y_train, full.y_train)
    sub = prepare_data(TrainConfig(train_subset=64, seed=1))
    rows = (x.tobytes() for x in full.x_train)
    assert all(x.tobytes() in rows for x in sub.x_train)  # a subsequence: each found after the last


@pytest.mark.parametrize("norm", ["sn", "syncsn"])
@pytest.mark.parametrize("inference", ["batch_average", "moving_average"])
def test_the_sn_layers_of_a_run_take_its_sn_inference(norm, inference, tiny_data):
    cfg = TrainConfig(**TINY, norm=norm, sn_inference=inference)
    layers = sn_layers(build_model(cfg, tiny_data))
    assert len(layers) == len(TINY["widths"])  # one SN after each convolution
    assert [layer.inference for layer in layers] == [inference] * len(layers)


def test_a_syncsn_batch_average_without_one_update_of_every_device_is_refused(tiny_data):
    """SyncSN on 2 devices x 4 samples x 2 micro-batches: one update is 16 samples, so
    average_samples=12 gives its batch average no batch to pool; refused before training."""
    cfg = TrainConfig(**{**TINY, "average_samples": 12}, norm="syncsn", devices=2)
    with pytest.raises(ValueError, match=r"SN's batch average pools batches of one update "
                                         r"\(devices x batch_size x accumulation = 16 samples\)"):
        check_data(cfg, tiny_data)
    check_data(dataclasses.replace(cfg, sn_inference="moving_average"), tiny_data)


def test_an_sn_batch_average_of_exactly_one_update_is_accepted(tiny_data):
    """SN on 4 samples x 2 micro-batches: one update is 8 samples, so average_samples=8 gives
    the batch average exactly one batch to pool, which is enough (only fewer is refused)."""
    cfg = TrainConfig(**{**TINY, "average_samples": 8}, norm="sn")
    assert cfg.update_size == 8
    check_data(cfg, tiny_data)


def test_the_trainer_standardizes_each_channel_by_the_training_split():
    # the digits' pixels are k/16 in [0, 1]; the trainer sees them with mean 0 and
    # standard deviation 1 over the training split (1e-5: float32 sums of 92032 values)
    x = prepare_data(TrainConfig()).x_train.astype(np.float64)
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=(0, 2, 3)), 1.0, atol=1e-5)


def test_a_normalizer_of_ones_own_trains_as_the_registered_one(tiny_data):
    # refnorm's BN through refnorm.layer.from_functions: the same run, to float64 rounding,
    # one device and two (every device builds its own layers with the factory).
    from refnorm.layer import from_functions
    from refnorm.norms.batch_norm import (
        batch_norm_backward,
        batch_norm_eval_forward,
        batch_norm_forward,
    )

    def forward(x, gamma, beta, running_mean, running_var, training):
        if not training:
            y, cache = batch_norm_eval_forward(x, gamma, beta, running_mean, running_var)
            return y, cache, {"running_mean": running_mean, "running_var": running_var}
        y, cache = batch_norm_forward(x, gamma, beta)
        m = x.size // x.shape[1]
        return y, cache, {"running_mean": 0.9 * running_mean + 0.1 * cache.mean.ravel(),
                          "running_var": 0.9 * running_var + 0.1 * cache.var.ravel() * m
                          / (m - 1)}

    def own_bn(width, dtype, xp, device):
        return from_functions(forward, batch_norm_backward,
                              params={"gamma": np.ones(width, dtype),
                                      "beta": np.zeros(width, dtype)},
                              state={"running_mean": np.zeros(width, dtype),
                                     "running_var": np.ones(width, dtype)})

    for devices in (1, 2):
        cfg = TrainConfig(**{**TINY, "dtype": "float64", "devices": devices})
        theirs = train(cfg, progress=False, data=tiny_data)
        mine = train(cfg, progress=False, data=tiny_data, norm_layer=own_bn)
        assert [type(layer).__name__ for layer in mine.model.layers()][1] == "FunctionLayer"
        a, b = params_of(mine), params_of(theirs)
        for key in b:  # the fast path's sums against the reference's: rounding apart
            np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-12)
        for row_a, row_b in zip(mine.history, theirs.history, strict=True):
            assert row_a["test_acc"] == row_b["test_acc"]
            assert abs(row_a["train_loss"] - row_b["train_loss"]) < 1e-9


def test_a_normalizer_of_ones_own_needs_a_method_to_stand_for():
    with pytest.raises(ValueError, match="norm_layer must be a function .* norm='none'"):
        train(config(norm="none"), progress=False, norm_layer=lambda width, **place: None)


def test_the_metrics_row_scores_each_set_by_its_own_size():
    """train_acc is the fraction of the training set predicted right, test_acc and test_loss
    those of the test set, recomputed here from the model's evaluation-mode logits; the two
    sets differ in size."""
    import dataclasses

    from refnorm.train.config import TrainConfig
    from refnorm.train.evaluate import predict
    from refnorm.train.loop import prepare_data, train

    tiny = {"train_subset": 32, "widths": (4, 4), "batch_size": 4, "accumulation": 2,
            "epochs": 1}
    full = prepare_data(TrainConfig(**tiny))
    data = dataclasses.replace(full, x_test=full.x_test[:40], y_test=full.y_test[:40])
    assert len(data.y_train) != len(data.y_test)
    result = train(TrainConfig(**tiny), data=data, progress=False)
    row = result.history[-1]
    for split in ("train", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        logits = predict(result.model, x).astype(np.float64)
        assert row[f"{split}_acc"] == np.mean(np.argmax(logits, axis=1) == y), split
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    # the row's loss is a float32 computation: within 1e-5 relative
    assert row["test_loss"] == pytest.approx(-log_p[np.arange(len(y)), y].mean(), rel=1e-5)


def test_data_dependent_init_sees_one_update_however_it_is_split():
    """WN's data-dependent init takes one update's samples (batch_size x accumulation): 8 x 2
    and 16 x 1 initialize identically, 8 x 1 (half the samples) differently."""
    from refnorm.train.config import TrainConfig
    from refnorm.train.loop import build_model, data_dependent_init, prepare_data

    base = {"train_subset": 192, "widths": (8, 8, 8), "average_samples": 64, "epochs": 1,
            "norm": "none", "weight": "wn"}
    gains = {}
    for batch_size, accumulation in ((8, 2), (16, 1), (8, 1)):
        cfg = TrainConfig(**base, batch_size=batch_size, accumulation=accumulation)
        data = prepare_data(cfg)
        model = build_model(cfg, data)
        data_dependent_init(model, data, cfg)
        gains[batch_size, accumulation] = np.concatenate(
            [np.ravel(layer.params["g"]) for layer in model.layers() if "v" in layer.params])
    assert not np.all(gains[8, 2] == 1)
    np.testing.assert_array_equal(gains[8, 2], gains[16, 1])
    assert not np.array_equal(gains[8, 2], gains[8, 1])


def test_running_totals_add_field_by_field():
    """The running sample count took the other step's correct count, so an epoch's train_loss and
    train_acc_running were divided by the wrong count. Three steps by hand: loss sums 6.0, 3.5, 1.5
    over 4, 4 and 2 samples, of which 3, 1 and 2 correct."""
    from refnorm.train.position import Totals

    steps = [Totals(6.0, 3, 4), Totals(3.5, 1, 4), Totals(1.5, 2, 2)]
    total = Totals()
    for step in steps:
        total = total + step
    assert total == Totals(11.0, 6, 10)
    assert (total.mean_loss(), total.accuracy()) == (1.1, 0.6)


def test_a_training_set_of_exactly_one_update_trains(tiny_data):
    """devices x batch_size x accumulation samples are one update: enough for a run."""
    cfg = TrainConfig(**{**TINY, "epochs": 1})
    data = dataclasses.replace(tiny_data, x_train=tiny_data.x_train[:cfg.update_size],
                               y_train=tiny_data.y_train[:cfg.update_size])
    steps = []
    result = train(cfg, progress=False, data=data,
                   on_step=lambda epoch, step, model: steps.append((epoch, step)))
    assert steps == [(0, 1)] and len(result.history) == 1


def test_a_group_of_one_channel_on_a_one_pixel_map_is_refused():
    """GN's statistic spans C/G channels of one sample (Wu & He, 2018, Eq. (1), the set S_i of
    a group): with G = C on a 1x1 map it is one value, refused before training; G = C/2
    keeps two."""
    from refnorm.train.loop import _check_statistics

    with pytest.raises(ValueError, match=r"images of 4x4 leave 1x1 maps at block 3, where "
                                         r"--norm gn computes each statistic over one sample's "
                                         r"maps of a group of C/G channels: one value"):
        _check_statistics(TrainConfig(norm="gn", num_groups=32, widths=(32, 32, 32)), (4, 4))
    _check_statistics(TrainConfig(norm="gn", num_groups=16, widths=(32, 32, 32)), (4, 4))


def test_the_room_check_asks_for_at_least_what_the_run_writes(tmp_path, tiny_data, monkeypatch):
    """A disk with room for the metrics but not for the checkpoint must be found before the
    first step: the room tried is at least the checkpoint and the other outputs together
    (widths (64, 64): a checkpoint larger than the 256 KiB the outputs beside it get)."""
    asked = []

    def spy(folder, nbytes):
        asked.append(nbytes)
        return check_room(folder, nbytes)

    monkeypatch.setattr(loop, "check_room", spy)
    cfg = TrainConfig(**{**TINY, "epochs": 1, "widths": (64, 64)})
    train(cfg, out=tmp_path, progress=False, data=tiny_data)
    written = sum((tmp_path / name).stat().st_size
                  for name in (CHECKPOINT, "metrics.json", "metrics.csv", "curves.png"))
    assert len(asked) == 1 and asked[0] >= written, (asked, written)


def test_a_normalizer_of_ones_own_keeps_a_short_last_step_only_with_two_samples_per_shard(
        tiny_data):
    """The loop cannot know over what a layer of one's own takes its statistics: it asks, as
    for per-device BN, two samples of every device's every micro-batch
    (statistic_parts(None, ...)), whatever config.norm names. 21 samples on 2 devices x 4 x 2:
    one full step of 16 and a rest of 5, left out; registered GN (per sample) keeps it."""
    cfg = TrainConfig(**{**TINY, "norm": "gn", "num_groups": 2, "devices": 2, "epochs": 1})
    data = dataclasses.replace(tiny_data, x_train=tiny_data.x_train[:21],
                               y_train=tiny_data.y_train[:21])
    assert epoch_steps(21, cfg.update_size, statistic_parts(None, 2, 2)) == [16]
    assert epoch_steps(21, cfg.update_size, statistic_parts("gn", 2, 2)) == [16, 5]
    seen = []

    def hook(epoch, step, model):
        seen.append(step)

    own_gn = functools.partial(refnorm.build, "gn", num_groups=2)
    train(cfg, progress=False, data=data, norm_layer=own_gn, on_step=hook)
    assert max(seen) == 1
    seen.clear()
    train(cfg, progress=False, data=data, on_step=hook)
    assert max(seen) == 2


def test_an_os_error_on_one_device_is_an_output_folder_error_on_every_device():
    """together(): a device's OSError (its file system refusing a write) reaches every device
    as an OutputFolderError naming that device, as the run's errors promise."""
    from refnorm.sync.comm import InProcessGroup
    from refnorm.train.loop import together

    def work(rank):
        if rank == 1:
            raise PermissionError(13, "Permission denied")
        return rank

    def device(comm):
        try:
            together(comm, "the output folder", lambda: work(comm.rank))
        except Exception as exc:  # every device's own view, compared below
            return type(exc), str(exc)
        return None

    seen = InProcessGroup.run(2, device)
    assert seen == [(OutputFolderError, "device 1: [Errno 13] Permission denied")] * 2


def test_an_epochs_training_loss_and_accuracy_are_over_its_own_steps(tiny_data, monkeypatch):
    """train_loss and train_acc_running of epoch e are the mean cross-entropy and the
    fraction right over the samples of epoch e's steps, in training mode: not a sum running
    on from the epochs before."""
    steps = []
    real = loop.local_step

    def spy(model, batches, *, total):
        grads, totals, problem = real(model, batches, total=total)
        steps.append(totals)
        return grads, totals, problem

    monkeypatch.setattr(loop, "local_step", spy)
    result = train(TrainConfig(**TINY), progress=False, data=tiny_data)  # 2 epochs of 4 steps
    assert len(steps) == 8
    for row, epoch in zip(result.history, (steps[:4], steps[4:]), strict=True):
        samples = sum(t.samples for t in epoch)
        assert samples == len(tiny_data.y_train)
        assert row["train_loss"] == pytest.approx(sum(t.loss for t in epoch) / samples,
                                                  rel=1e-12)
        assert row["train_acc_running"] == sum(t.correct for t in epoch) / samples


def test_a_stop_inside_a_later_epoch_saves_where_it_stopped(tmp_path, tiny_data):
    """The checkpoint of epoch 1's end is not the stop's: a run stopped after step 2 of epoch
    2 saves that boundary, and resumes from it (steps 3 and 4 of epoch 2 only)."""
    def stop(epoch, step, model):
        if (epoch, step) == (1, 2):
            raise KeyboardInterrupt

    cfg = TrainConfig(**TINY)
    assert train(cfg, out=tmp_path, progress=False, data=tiny_data, on_step=stop).interrupted
    meta = checkpoint.read_checkpoint(tmp_path / CHECKPOINT).meta
    assert (meta["epoch"], meta["step"]) == (1, 2)
    steps = []
    train(cfg, out=tmp_path, resume=True, progress=False, data=tiny_data,
          on_step=lambda epoch, step, model: steps.append((epoch, step)))
    assert steps == [(1, 3), (1, 4)]


def test_train_refuses_a_config_that_is_not_a_train_config():
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train({"norm": "bn"}, progress=False)


def test_train_refuses_data_that_is_not_a_dataset():
    with pytest.raises(TypeError, match="data must be a refnorm.train.data.Dataset"):
        train(TrainConfig(epochs=1), data=(np.ones((4, 1, 8, 8)), np.zeros(4, int)),
              progress=False)


def test_train_refuses_an_on_step_that_is_not_callable():
    with pytest.raises(TypeError, match="on_step must be callable"):
        train(TrainConfig(epochs=1, train_subset=64), on_step=3, progress=False)


def test_an_infinite_test_loss_stops_the_run(monkeypatch, tiny_data):
    """Every value of the metrics row must be finite: an infinite test loss (a test image whose
    logits give its label probability 0) stops the run as a NaN does."""
    from refnorm.train import evaluate

    real = evaluate._sums

    def infinite_test_loss(model, x, y, comm):
        loss, correct = real(model, x, y, comm)
        return (float("inf") if len(y) == len(tiny_data.y_test) else loss), correct

    monkeypatch.setattr(evaluate, "_sums", infinite_test_loss)
    with pytest.raises(NonFinite, match="the test loss"):
        train(TrainConfig(**{**TINY, "epochs": 1}), data=tiny_data, progress=False)


def test_each_update_takes_the_schedules_rate_at_its_own_step(monkeypatch, tiny_data):
    """Step s of S (counted over the whole run from 0) is taken at learning_rate(s, S): the first
    at the base rate, the last at the rate one step before the end (the history shows only
    each epoch's last rate, and runs compared with runs shared any shift)."""
    from refnorm.train.optim import learning_rate

    rates = []
    original = SGD.step

    def step(self, grads, lr):
        rates.append(lr)
        original(self, grads, lr)

    monkeypatch.setattr(SGD, "step", step)
    cfg = TrainConfig(**TINY, norm="bn", schedule="linear")
    train(cfg, progress=False, data=tiny_data)
    total = 2 * 4  # 2 epochs of 32 samples in updates of 4 x 2
    assert len(rates) == total and rates[0] == cfg.lr
    assert rates == pytest.approx([learning_rate("linear", cfg.lr, s, total)
                                   for s in range(total)])


def test_an_epochs_training_loss_and_accuracy_are_those_of_the_logits_its_steps_saw(
        tiny_data, monkeypatch):
    """train_loss is the mean over the epoch's samples of -log softmax(logits)[label], and
    train_acc_running the fraction whose largest logit is the label, for the training-mode
    logits of each micro-batch (recomputed here in float64 from the logits the model
    returned and the labels the step took): micro-batches of 4 samples, each's mean loss
    weighted by its size."""
    from refnorm.train.model import ConvNet

    logits, labels = [], []
    real_forward, real_step = ConvNet.forward, loop.local_step

    def forward(self, x, training):
        out = real_forward(self, x, training)
        if training:
            logits.append(np.asarray(out, dtype=np.float64))
        return out

    def local_step(model, batches, *, total):
        labels.extend(np.asarray(y) for _, y in batches)
        return real_step(model, batches, total=total)

    monkeypatch.setattr(ConvNet, "forward", forward)
    monkeypatch.setattr(loop, "local_step", local_step)
    result = train(TrainConfig(**TINY), progress=False, data=tiny_data)  # 2 epochs x 4 steps
    assert len(logits) == len(labels) == 16  # 4 steps x 2 micro-batches per epoch
    for e, row in enumerate(result.history):
        z = np.concatenate(logits[8 * e:8 * e + 8])                          # (32, classes)
        y = np.concatenate(labels[8 * e:8 * e + 8])                          # (32,)
        z = z - z.max(axis=1, keepdims=True)
        nll = np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]
        # the trainer's loss is a float32 mean per micro-batch: within 1e-5 relative
        assert row["train_loss"] == pytest.approx(nll.mean(), rel=1e-5)
        assert row["train_acc_running"] == np.mean(np.argmax(z, axis=1) == y)
