"""Checkpoints: what they carry, and every way a bad one is refused by name."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from refnorm.train import checkpoint
from refnorm.train.checkpoint import CHECKPOINT, FORMAT, CheckpointError, load_checkpoint
from refnorm.train.config import TrainConfig
from refnorm.train.evaluate import predict
from refnorm.train.finite import NonFinite
from refnorm.train.folder import OutputFolderError
from refnorm.train.loop import build_model, train
from refnorm.train.optim import SGD
from refnorm.train.position import Position
from tests.train.conftest import TINY, config, fresh, sn_layers


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


def test_checkpoint_carries_sn_population_readiness_in_the_state(tmp_path):
    # SN with the batch average: a checkpoint taken inside the first epoch holds layers with
    # no population statistics yet; one taken after an epoch holds ready ones.
    cfg = config(norm="sn", epochs=2)

    def stop(epoch, step, model):
        if (epoch, step) == (0, 2):
            raise KeyboardInterrupt

    assert train(cfg, out=tmp_path, progress=False, on_step=stop).interrupted
    data, model, opt = fresh(cfg)
    load_checkpoint(tmp_path / CHECKPOINT, cfg, model, opt)
    assert sn_layers(model) and not any(bool(l.state["population_ready"])
                                         for l in sn_layers(model))
    with pytest.raises(RuntimeError, match="population statistics"):
        predict(model, data.x_test[:4])

    done = train(cfg, out=tmp_path, resume=True, progress=False)
    data, model, opt = fresh(cfg)
    load_checkpoint(tmp_path / CHECKPOINT, cfg, model, opt)
    assert all(bool(l.state["population_ready"]) for l in sn_layers(model))
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


def test_save_checkpoint_refuses_non_finite_arrays(tmp_path):
    cfg = config(norm="bn")
    data, model, opt = fresh(cfg)
    bn = model.layers()[1]
    bn.state["running_mean"] = bn.state["running_mean"].copy()
    bn.state["running_mean"][0] = np.nan
    with pytest.raises(NonFinite, match=r"^state/1/running_mean became nan"):
        checkpoint.save_checkpoint(tmp_path / CHECKPOINT, cfg, model, opt, Position())
    assert not list(tmp_path.iterdir())


def _rewrite(path, edit):
    """Apply ``edit(arrays, meta)`` to the checkpoint at ``path``, as a hand edit would."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes().decode())
    edit(arrays, meta)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


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
    (lambda arrays, meta: meta["history"][0].pop("train_loss"),
     r": metadata 'history' row 1: lacks 'train_loss'$"),
    (lambda arrays, meta: meta["history"][0].update(test_acc="0.9"),
     r": metadata 'history' row 1: 'test_acc' must be a finite number; got '0.9'$"),
    (lambda arrays, meta: meta["history"][0].update(epoch=3),
     r": metadata 'history' row 1: 'epoch' must be 1; got 3$"),
    # a run that finished has step 0 (its last epoch done): a later step is refused
    (lambda arrays, meta: meta.update(step=1),
     r": metadata 'step' must be in 0\.\.\d+ \(0 after the last epoch\); got 1$"),
    # JSON's true reads as True, an int: unchecked, it would pass for epoch 1
    pytest.param(_edit_meta("epoch", True), r": metadata 'epoch' must be a int; got True$",
                 id="epoch_true"),
    # one epoch past the run's last (with a history row for it): nothing left to resume
    pytest.param(lambda arrays, meta: meta.update(
        epoch=2, history=[meta["history"][0], {**meta["history"][0], "epoch": 2}]),
                 r": metadata 'epoch' must be in 0..1; got 2$", id="epoch_past_the_last"),
    pytest.param(_edit_meta("totals", {"loss": math.inf, "correct": 0, "samples": 0}),
                 r": metadata 'totals' must hold finite numbers >= 0 for exactly loss, "
                 r"correct, samples", id="totals_infinite"),
    pytest.param(lambda arrays, meta: meta["history"].append({**meta["history"][0], "epoch": 2}),
                 r": metadata 'history' must hold one row \(an object\) per finished epoch, 1; "
                 r"got 2 entries$", id="history_row_too_many"),
    pytest.param(lambda arrays, meta: meta["history"][0].update(test_acc=True),
                 r": metadata 'history' row 1: 'test_acc' must be a finite number; got True$",
                 id="history_bool"),
    pytest.param(lambda arrays, meta: meta["history"][0].update(test_loss=math.inf),
                 r": metadata 'history' row 1: 'test_loss' must be a finite number; got inf$",
                 id="history_infinite"),
])
def test_hand_edited_checkpoint_is_refused_by_name(tmp_path, tiny_data, edit, message):
    cfg = TrainConfig(**{**TINY, "epochs": 1, "train_subset": 16}, norm="bn")
    train(cfg, out=tmp_path, progress=False, data=tiny_data)
    path = tmp_path / CHECKPOINT
    _rewrite(path, edit)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path}{message}"):
        train(cfg, out=tmp_path, resume=True, progress=False, data=tiny_data)


def test_checkpoint_without_meta_is_refused(tmp_path):
    path = tmp_path / CHECKPOINT
    with open(path, "wb") as f:
        np.savez(f, w=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"is not a refnorm checkpoint: it has no 'meta'"):
        train(config(), out=tmp_path, resume=True, progress=False)


def test_a_checkpoint_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path,
                                                                             tiny_data):
    # Opening a FIFO for reading blocks until a writer comes: it must never be opened.
    cfg = TrainConfig(**{**TINY, "epochs": 1, "train_subset": 16}, norm="bn")
    os.mkfifo(tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match=r"is not a regular file \(it is a FIFO\); refnorm "
                                              r"reads checkpoints from files only$"):
        train(cfg, out=tmp_path, resume=True, progress=False, data=tiny_data)


def test_a_foreign_array_is_refused_before_any_array_is_read(tmp_path, tiny_data,
                                                             monkeypatch):
    cfg = TrainConfig(**{**TINY, "epochs": 1, "train_subset": 16}, norm="bn")
    train(cfg, out=tmp_path, progress=False, data=tiny_data)
    path = tmp_path / CHECKPOINT
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["huge"] = np.zeros(2**24, dtype=np.uint8)  # 16 MiB, compressed to almost nothing
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    read = []
    real = checkpoint.Saved.arrays
    monkeypatch.setattr(checkpoint.Saved, "arrays", lambda self, names: read.append(names)
                        or real(self, names))
    with pytest.raises(CheckpointError, match="has arrays the model does not: huge$"):
        train(cfg, out=tmp_path, resume=True, progress=False, data=tiny_data)
    assert read == []  # refused from the archive's list of members and their headers


@pytest.mark.parametrize(("norm", "edit", "message"), [
    ("bn", "drop", r"lacks device1/state/\d+/running_mean.*each device's running statistics, "
                   r"which a run of 2 devices with --norm bn keeps"),
    ("syncbn", "add", r"has arrays the model does not: device1/state/\d+/running_mean")])
def test_per_device_statistics_are_in_the_checkpoint_exactly_where_the_run_keeps_them(
        tmp_path, tiny_data, norm, edit, message):
    """A 2-device BN checkpoint without device 1's running statistics was resumed without a
    word (device 1 took device 0's); a synchronized run's checkpoint with such arrays too."""
    cfg = TrainConfig(**{**TINY, "epochs": 1, "accumulation": 1}, norm=norm, devices=2)
    train(cfg, out=tmp_path, progress=False, data=tiny_data)
    path = tmp_path / CHECKPOINT
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    if edit == "drop":
        arrays = {k: v for k, v in arrays.items() if not k.startswith("device1/")}
    else:
        arrays.update({f"device1/{k}": v for k, v in list(arrays.items())
                       if k.startswith("state/") and k.endswith("running_mean")})
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(CheckpointError, match=message):
        train(cfg, out=tmp_path, resume=True, progress=False, data=tiny_data)


def test_an_sn_batch_average_without_one_batch_is_refused_before_training(tiny_data):
    """average_samples=6 below one update (4 x 2 = 8 samples): found after the first epoch
    before (no batch to average), now by check_data, before training."""
    from refnorm.train.loop import check_data
    cfg = TrainConfig(**{**TINY, "average_samples": 6}, norm="sn")  # update: 4 x 2 = 8
    with pytest.raises(ValueError, match=r"SN's batch average pools batches of one update "
                                         r"\(devices x batch_size x accumulation = 8 samples\)"):
        check_data(cfg, tiny_data)
    check_data(dataclasses.replace(cfg, sn_inference="moving_average"), tiny_data)


def test_a_resumed_run_refuses_other_data_than_its_checkpoints(tmp_path, tiny_data):
    """The checkpoint records the SHA-256 of the arrays its run trains and tests on; resumed
    on other data (the same relative --data from another folder, a changed file) the run
    is refused by name, where it once trained on and reported the other data. On the same
    data it resumes, and a checkpoint written before the record existed is still read."""
    from refnorm.train.data import fingerprint

    cfg = TrainConfig(**{**TINY, "epochs": 2, "train_subset": 16}, norm="bn")
    stop = {"at": True}

    def interrupt(epoch, step, model):
        if stop["at"] and epoch == 0 and step == 1:
            raise KeyboardInterrupt
    assert train(cfg, out=tmp_path, progress=False, data=tiny_data,
                 on_step=interrupt).interrupted
    stop["at"] = False
    saved = checkpoint.read_checkpoint(tmp_path / CHECKPOINT).meta
    assert saved["data"] == fingerprint(tiny_data)
    other = dataclasses.replace(tiny_data, x_train=tiny_data.x_train[::-1].copy())
    with pytest.raises(CheckpointError, match=r"was written by a run on other data than this "
                                              r"run's \(digits: the arrays' SHA-256 is "):
        train(cfg, out=tmp_path, resume=True, progress=False, data=other)
    path = tmp_path / CHECKPOINT  # as written before checkpoints recorded their data
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes().decode())
    del meta["data"]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    result = train(cfg, out=tmp_path, resume=True, progress=False, data=tiny_data)
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_a_checkpoint_written_on_a_gpu_resumes_on_the_cpu(tmp_path, tiny_data):
    """The device a run trained on is not part of what must match: a checkpoint holds numpy
    arrays whatever the device (save_checkpoint), so a run of --device gpu continues on the
    CPU (and the other way round) with the rest of its configuration the same."""
    cfg = TrainConfig(**{**TINY, "epochs": 1, "train_subset": 16}, norm="bn")
    train(cfg, out=tmp_path, progress=False, data=tiny_data)
    _rewrite(tmp_path / CHECKPOINT, lambda arrays, meta: meta["config"].update(device="gpu"))
    model = build_model(cfg, tiny_data)
    opt = SGD(model, lr=cfg.lr, momentum=cfg.momentum)
    position = load_checkpoint(tmp_path / CHECKPOINT, cfg, model, opt)
    assert (position.epoch, position.step) == (1, 0)
    with pytest.raises(CheckpointError, match=r"another configuration; norm: checkpoint 'bn', "
                                              r"this run 'gn'"):
        load_checkpoint(tmp_path / CHECKPOINT, dataclasses.replace(cfg, norm="gn"), model, opt)


@pytest.mark.parametrize(("key", "message"), [
    ("state/1/running_var", r": state/1/running_var holds inf$"),
    ("velocity/0/w", r": velocity/0/w holds inf$"),
])
def test_a_checkpoint_with_a_non_finite_state_or_momentum_is_refused(tmp_path, tiny_data, key,
                                                                     message):
    """Not only the parameters: an infinite running variance or momentum would be restored
    and poison the next step; the checkpoint is refused by the array's name."""
    cfg = TrainConfig(**{**TINY, "epochs": 1, "train_subset": 16}, norm="bn")
    train(cfg, out=tmp_path, progress=False, data=tiny_data)
    path = tmp_path / CHECKPOINT

    def poison(arrays, meta):
        a = arrays[key].copy()
        a.flat[0] = np.inf
        arrays[key] = a

    _rewrite(path, poison)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path}{message}"):
        train(cfg, out=tmp_path, resume=True, progress=False, data=tiny_data)


def test_a_checkpoint_with_negative_running_totals_is_refused(tmp_path, tiny_data):
    cfg = TrainConfig(**{**TINY, "epochs": 1, "train_subset": 16}, norm="bn")
    train(cfg, out=tmp_path, progress=False, data=tiny_data)
    path = tmp_path / CHECKPOINT
    _rewrite(path, lambda arrays, meta: meta["totals"].update(samples=-4))
    with pytest.raises(CheckpointError, match=r"metadata 'totals' must hold finite numbers >= 0 "
                                              r"for exactly loss, correct, samples; got "):
        train(cfg, out=tmp_path, resume=True, progress=False, data=tiny_data)


def test_restoring_a_checkpoint_drops_every_layers_cache(tmp_path, tiny_data):
    """A model that ran a forward, then took a checkpoint's parameters and state, must not
    run a backward on the old forward's cache (its gradients would belong to other
    parameters): every layer's backward asks for a new forward."""
    cfg = TrainConfig(**{**TINY, "epochs": 1, "train_subset": 16}, norm="bn")
    train(cfg, out=tmp_path, progress=False, data=tiny_data)
    model = build_model(cfg, tiny_data)
    opt = SGD(model, lr=cfg.lr, momentum=cfg.momentum)
    model.forward(tiny_data.x_train[:4], training=True)
    load_checkpoint(tmp_path / CHECKPOINT, cfg, model, opt)
    for layer in model.layers():
        with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
            layer.backward(np.zeros(1, np.float32))


def test_checkpoint_metadata_that_is_not_an_object_is_refused(tmp_path, tiny_data):
    cfg = TrainConfig(**{**TINY, "epochs": 1, "train_subset": 16}, norm="bn")
    train(cfg, out=tmp_path, progress=False, data=tiny_data)
    path = tmp_path / CHECKPOINT
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["meta"] = np.frombuffer(b"[1, 2]", dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path}: its metadata must be a JSON "
                                              r"object; got list$"):
        train(cfg, out=tmp_path, resume=True, progress=False, data=tiny_data)


@pytest.mark.parametrize(("meta", "shown"), [
    # valid JSON (whitespace, then the object) one byte beyond the bound: refused unread
    (lambda raw: np.frombuffer(b" " * (checkpoint.META_BYTES + 1 - len(raw)) + raw, np.uint8),
     rf"uint8 \({checkpoint.META_BYTES + 1},\)"),
    # the same JSON bytes as int8: the record is bytes (uint8), nothing else
    (lambda raw: np.frombuffer(raw, np.int8), r"int8 \(\d+,\)"),
], ids=["too_long", "int8"])
def test_a_meta_record_that_is_not_a_bounded_byte_string_is_refused(tmp_path, tiny_data, meta,
                                                                    shown):
    cfg = TrainConfig(**{**TINY, "epochs": 1, "train_subset": 16}, norm="bn")
    train(cfg, out=tmp_path, progress=False, data=tiny_data)
    path = tmp_path / CHECKPOINT
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["meta"] = meta(arrays["meta"].tobytes())
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path} is not a refnorm checkpoint: "
                                              rf"its 'meta' record is {shown}, not at most "):
        train(cfg, out=tmp_path, resume=True, progress=False, data=tiny_data)


def test_a_run_configured_with_numpy_numbers_writes_and_resumes_its_checkpoint(tmp_path,
                                                                               tiny_data):
    cfg = TrainConfig(**{**TINY, "epochs": 1, "train_subset": np.int64(16),
                         "batch_size": np.int32(4)}, seed=np.int64(0), lr=np.float32(0.05))
    train(cfg, out=tmp_path, progress=False, data=tiny_data)
    assert checkpoint.read_checkpoint(tmp_path / CHECKPOINT).meta["config"]["batch_size"] == 4
    result = train(cfg, out=tmp_path, resume=True, progress=False, data=tiny_data)
    assert [row["epoch"] for row in result.history] == [1]


def test_metadata_nested_too_deep_for_the_json_reader_is_refused_in_one_sentence(tmp_path,
                                                                                 tiny_data):
    # json.loads raises RecursionError (no ValueError) on arrays nested beyond Python's
    # recursion limit: the run and the resume ended in a traceback
    cfg = TrainConfig(**{**TINY, "epochs": 1, "train_subset": 16}, norm="bn")
    train(cfg, out=tmp_path, progress=False, data=tiny_data)
    path = tmp_path / CHECKPOINT
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["meta"] = np.frombuffer(b"[" * 100_000 + b"]" * 100_000, dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)
    with pytest.raises(CheckpointError, match=rf"^checkpoint {path}: its 'meta' record is not "
                                              r"JSON \(maximum recursion depth exceeded"):
        train(cfg, out=tmp_path, resume=True, progress=False, data=tiny_data)
    with pytest.raises(OutputFolderError, match=r"holds a checkpoint.npz that is not a usable "
                                                r"checkpoint .*; choose another --out, or "
                                                r"replace it with --overwrite$"):
        train(cfg, out=tmp_path, progress=False, data=tiny_data)


def test_a_resume_with_other_options_says_how_to_continue(tmp_path):
    """The refusal names what differs and the two ways on: the checkpoint's own options (the
    CLI reads them from it), or a new run elsewhere."""
    train(config(epochs=1), out=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match=r"epochs: checkpoint 1, this run 2: continue it "
                                              r"with its own options \(refnorm train --out "
                                              r"FOLDER --resume takes them from it\), or start "
                                              r"a new run in another folder$"):
        train(config(epochs=2), out=tmp_path, resume=True, progress=False)
