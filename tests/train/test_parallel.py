"""Data-parallel training (refnorm/train/parallel.py and the loop): proof by equivalence.

Every comparison runs 2 epochs of at least 20 optimizer steps in float64 whose last step has
fewer samples, split unevenly over the devices (e.g. 5 samples over 2 devices: 2 and 3), so
that the weighting of unequal shards is exercised:

- P devices x b, synchronized (syncbn, syncsn) == 1 device x (P b), plain (bn, sn):
  parameters (SN's ratios included), running statistics and losses;
- P devices x b, per-device statistics (bn, sn) == 1 device x b with accumulation P (the
  micro-batch study's simulation): parameters and losses; BN's running statistics differ by
  design (P devices each update theirs once per step and average them at the end of each
  epoch; one device updates its own P times per step), SN's batch-average population
  statistics are equal (both pool the statistics of the same micro-batches);
- gn, ln, in (per-sample statistics): P devices x b == 1 device x (P b).

The tolerance, 1e-10 relative to each array's largest value: the runs compute the same
numbers with sums grouped differently (per-device partial sums added over devices), so they
differ by float64 rounding only (measured: below 1e-14 after 22 steps).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import types

import numpy as np
import pytest

from refnorm import launch
from refnorm.sync.batch_norm import SyncBatchNorm
from refnorm.sync.nccl import NCCLCommunicator
from refnorm.train import loop
from refnorm.train.checkpoint import CHECKPOINT, CheckpointError
from refnorm.train.config import TrainConfig
from refnorm.train.finite import NonFinite
from refnorm.train.loop import prepare_data, train
from refnorm.train.parallel import Diverged, epoch_steps, gpu_communicator, step_pieces

B = 4  # samples per device in a micro-batch
RTOL = 1e-10
# P -> training samples: 10 full steps of P x B plus a rest split unevenly over P devices,
# with at least 2 samples each (85 = 10 x 8 + 5: the last step is 2 + 3 samples on 2 devices).
SUBSET = {2: 85, 3: 127, 4: 169}
BASE = {"dtype": "float64", "epochs": 2, "widths": (4, 4), "average_samples": 48,
        "weight_decay": 5e-4}


@pytest.fixture(scope="module")
def datasets():
    out = {}
    for P, n in SUBSET.items():
        full = prepare_data(TrainConfig(train_subset=n))
        out[P] = dataclasses.replace(full, x_test=full.x_test[:60], y_test=full.y_test[:60])
    return out


def _run(data, **kw):
    config = TrainConfig(**{**BASE, **kw})
    return train(config, progress=False, data=data)


def _params(result):
    return {key: np.asarray(layer.params[name])
            for key, layer, name in result.model.named_params()}


def _states(result):
    return {f"{i}/{k}": np.asarray(v, dtype=np.float64)
            for i, layer in enumerate(result.model.layers()) for k, v in layer.state.items()}


def _assert_close(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for key in a:
        scale = max(float(np.max(np.abs(b[key]))), 1e-300)
        error = float(np.max(np.abs(a[key] - b[key]))) / scale
        assert error <= RTOL, f"{what} {key}: relative error {error:.2e}"


def _assert_losses_close(a, b):
    for row_a, row_b in zip(a.history, b.history, strict=True):
        for key in ("train_loss", "test_loss"):
            assert abs(row_a[key] - row_b[key]) <= RTOL * abs(row_b[key]), key


def test_the_runs_have_twenty_steps_and_an_uneven_last_batch():
    for P, n in SUBSET.items():
        steps = epoch_steps(n, P * B, P)
        assert 2 * len(steps) >= 20 and steps[-1] < P * B
        sizes = {s.stop - s.start for s in step_pieces(steps[-1], 1, P)[0]}
        assert len(sizes) == 2 and min(sizes) >= 2, (P, steps[-1], sizes)


@pytest.mark.parametrize("P", [2, 3, 4])
@pytest.mark.parametrize(("synchronized", "plain"), [("syncbn", "bn"), ("syncsn", "sn")])
def test_synchronized_devices_equal_one_device_with_the_whole_batch(datasets, P,
                                                                   synchronized, plain):
    many = _run(datasets[P], norm=synchronized, devices=P, batch_size=B)
    one = _run(datasets[P], norm=plain, devices=1, batch_size=P * B)
    _assert_close(_params(many), _params(one), "parameter")
    _assert_close(_states(many), _states(one), "state")
    _assert_losses_close(many, one)


@pytest.mark.parametrize("P", [2, 3, 4])
@pytest.mark.parametrize("norm", ["bn", "sn"])
def test_per_device_statistics_equal_accumulation_over_micro_batches(datasets, P, norm):
    many = _run(datasets[P], norm=norm, devices=P, batch_size=B)
    one = _run(datasets[P], norm=norm, devices=1, batch_size=B, accumulation=P)
    _assert_close(_params(many), _params(one), "parameter")
    for row_a, row_b in zip(many.history, one.history, strict=True):
        assert abs(row_a["train_loss"] - row_b["train_loss"]) <= RTOL * row_b["train_loss"]
    if norm == "bn":  # by design not equal: one device moves its averages P times a step
        moved = _states(many)
        assert any(not np.allclose(moved[k], v) for k, v in _states(one).items()
                   if k.endswith("running_var"))
    else:  # SN's batch average pools the same micro-batches' statistics either way
        _assert_close(_states(many), _states(one), "state")


@pytest.mark.parametrize("P", [2, 3, 4])
@pytest.mark.parametrize("norm", ["gn", "ln", "in"])
def test_per_sample_normalizers_equal_one_device_with_the_whole_batch(datasets, P, norm):
    many = _run(datasets[P], norm=norm, devices=P, batch_size=B, num_groups=2)
    one = _run(datasets[P], norm=norm, devices=1, batch_size=P * B, num_groups=2)
    _assert_close(_params(many), _params(one), "parameter")
    _assert_losses_close(many, one)


def test_weight_methods_combine_with_synchronized_statistics(datasets):
    many = _run(datasets[2], norm="syncbn", weight="ws", devices=2, batch_size=B)
    one = _run(datasets[2], norm="bn", weight="ws", devices=1, batch_size=2 * B)
    _assert_close(_params(many), _params(one), "parameter")


def test_devices_hold_one_model_and_report_their_communication(datasets):
    result = _run(datasets[2], norm="syncbn", devices=2, batch_size=B)
    row = result.history[-1]
    # per step: the status all-reduce, the gradients', and 3 per syncbn layer (2 layers)
    assert row["allreduce_calls_per_step"] >= 8
    assert row["allreduce_bytes_per_step"] > 0 and 0 <= row["collective_share"] <= 1


def test_each_step_communicates_what_the_data_parallel_page_counts(datasets):
    """docs/data-parallel.md, "what is synchronized when": per step one all-reduce of the
    devices' status (P x 7 float64) and one of every parameter gradient, whatever the
    accumulation (2 micro-batches here); per syncbn layer and micro-batch 3 all-reduces of
    1 + 4C values (all float64 in a float64 run)."""
    P, accumulation = 2, 2
    bn = _run(datasets[P], norm="bn", devices=P, batch_size=B, accumulation=accumulation)
    params = sum(int(v.size) for v in _params(bn).values())
    for row in bn.history:
        assert row["allreduce_calls_per_step"] == 2
        assert row["allreduce_bytes_per_step"] == 8 * (P * 7 + params)
    sync = _run(datasets[P], norm="syncbn", devices=P, batch_size=B, accumulation=accumulation)
    widths = [int(layer.params["gamma"].shape[0]) for layer in sync.model.layers()
              if isinstance(layer, SyncBatchNorm)]
    assert len(widths) == 2  # BASE's two convolution widths
    values = accumulation * sum(1 + 4 * C for C in widths)
    for row in sync.history:
        assert row["allreduce_calls_per_step"] == 2 + 3 * accumulation * len(widths)
        assert row["allreduce_bytes_per_step"] == 8 * (P * 7 + params + values)


def _cut_and_resume(tmp_path, config, data) -> list[str]:
    """Train ``config`` whole, and again stopped at step 5 of its first epoch (every device at
    the same boundary) then resumed; assert both end with bit-identical checkpoints. Returns
    the keys of the checkpoint the stopped run saved."""
    whole = train(config, out=tmp_path / "whole", progress=False, data=data)

    def stop(epoch, step, model):  # every device stops at the same boundary
        if (epoch, step) == (0, 5):
            raise KeyboardInterrupt

    cut = train(config, out=tmp_path / "cut", progress=False, data=data, on_step=stop)
    assert cut.interrupted
    saved = list(np.load(tmp_path / "cut" / CHECKPOINT).files)
    train(config, out=tmp_path / "cut", resume=True, progress=False, data=data)
    a, b = np.load(tmp_path / "whole" / CHECKPOINT), np.load(tmp_path / "cut" / CHECKPOINT)
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        if key != "meta":
            assert a[key].tobytes() == b[key].tobytes(), key
    assert _timeless(a) == _timeless(b)
    assert _params(whole).keys() == _params(cut).keys()
    return saved


def test_a_resumed_data_parallel_run_is_bit_identical(tmp_path, datasets):
    config = TrainConfig(**{**BASE, "norm": "bn", "devices": 3, "batch_size": B})
    saved = _cut_and_resume(tmp_path, config, datasets[3])
    assert any(k.startswith("device2/state/") for k in saved)  # per-device statistics


def test_a_resumed_synchronized_run_is_bit_identical_and_saves_one_copy_of_the_statistics(
        tmp_path, datasets):
    """SyncBN's devices hold the same running statistics at every step: the checkpoint holds
    them once (no ``device<p>/`` copies, which a synchronized run's resume refuses as extra),
    and the resumed run ends as the uninterrupted one."""
    config = TrainConfig(**{**BASE, "norm": "syncbn", "devices": 2, "batch_size": B})
    saved = _cut_and_resume(tmp_path, config, datasets[2])
    assert any(k.startswith("state/") for k in saved)
    assert not any(k.startswith("device") for k in saved)


# What a run measures of itself rather than computes: wall time and communication (which,
# over an epoch cut by an interruption, counts the steps before and after it apart).
MEASURED = ("seconds", "step_ms", "collective_seconds", "collective_share",
            "allreduce_calls_per_step", "allreduce_bytes_per_step")


def _timeless(archive) -> list[dict]:
    history = json.loads(archive["meta"].tobytes())["history"]
    return [{k: v for k, v in row.items() if k not in MEASURED} for row in history]


def test_resuming_with_another_number_of_devices_is_refused(tmp_path, datasets):
    config = TrainConfig(**{**BASE, "epochs": 1, "norm": "bn", "devices": 2, "batch_size": B})
    train(config, out=tmp_path, progress=False, data=datasets[2])
    with pytest.raises(CheckpointError, match=r"written by a run on 2 device\(s\) and this run "
                                              r"has 3: resume it with --devices 2"):
        train(dataclasses.replace(config, devices=3, epochs=2), out=tmp_path, resume=True,
              progress=False, data=datasets[2])


@pytest.fixture
def ranked(monkeypatch):
    """Models that know their device: ``model.rank``, for hooks that act on one device."""
    real = loop.build_model

    def build(config, data, *, comm=None, **options):
        model = real(config, data, comm=comm, **options)
        model.rank = 0 if comm is None else comm.rank
        return model

    monkeypatch.setattr(loop, "build_model", build)


def test_a_non_finite_value_on_one_device_stops_every_device(datasets, ranked):
    def poison(epoch, step, model):  # device 1's running variance becomes infinite
        bn = model.layers()[1]
        if (epoch, step) == (0, 3) and model.rank == 1:
            bn.state = {**bn.state, "running_var": bn.state["running_var"] + np.inf}

    config = TrainConfig(**{**BASE, "norm": "bn", "devices": 2, "batch_size": B})
    with pytest.raises(NonFinite, match=r"^layer 1 \(BatchNorm\) state running_var on device 1 "
                                        r"became inf in step 4 of epoch 1; the run stopped; no "
                                        r"checkpoint was written"):
        train(config, progress=False, data=datasets[2], on_step=poison)


def test_devices_that_hold_different_models_are_found_at_the_end_of_the_epoch(datasets,
                                                                             ranked):
    def nudge(epoch, step, model):  # a bug's effect: device 1's weights drift from device 0's
        if (epoch, step) == (0, 4) and model.rank == 1:
            conv = model.layers()[0]
            conv.params = {**conv.params, "w": conv.params["w"] * 1.001}

    config = TrainConfig(**{**BASE, "norm": "gn", "devices": 2, "batch_size": B,
                            "num_groups": 2})
    with pytest.raises(Diverged, match=r"^the devices no longer hold the same model after epoch "
                                       r"1: layer 0 \(Conv2d\) parameter w differs between "
                                       r"device 0 and device 1$"):
        train(config, progress=False, data=datasets[2], on_step=nudge)


def test_an_exception_on_one_device_ends_the_run(datasets, ranked):
    def fail(epoch, step, model):
        if (epoch, step) == (0, 2) and model.rank == 2:
            raise RuntimeError("device 2 broke")

    config = TrainConfig(**{**BASE, "norm": "syncbn", "devices": 3, "batch_size": B})
    with pytest.raises(RuntimeError, match="^device 2 broke$"):
        train(config, progress=False, data=datasets[3], on_step=fail)


def test_a_signal_stops_every_device_at_the_same_boundary(datasets):
    config = TrainConfig(**{**BASE, "norm": "syncbn", "devices": 3, "batch_size": B})
    seen, fired = [], []

    def hook(epoch, step, model):  # on one device, once: the others learn it from the status
        seen.append((epoch, step))
        if (epoch, step) == (0, 2) and not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGTERM)  # recorded: the run is inside its steps

    result = train(config, progress=False, data=datasets[3], on_step=hook)
    assert result.interrupted and result.signal == signal.SIGTERM
    # Every device stopped after the same step (which one depends on when the main thread,
    # polling its device threads, ran the handler): the last step seen, seen by all three.
    assert seen.count(max(seen)) == 3 and max(seen) >= (0, 2)


@pytest.mark.parametrize(("changes", "error", "message"), [
    ({"devices": 0}, ValueError, r"^devices must be an int >= 1; got 0$"),
    ({"devices": 2.5}, TypeError, r"^devices must be an int >= 1; got 2.5$"),
])
def test_bad_device_counts_are_refused(changes, error, message):
    with pytest.raises(error, match=message):
        TrainConfig(**changes)


def test_more_devices_than_the_data_can_feed_is_refused(datasets):
    config = TrainConfig(**{**BASE, "devices": 30, "batch_size": B})
    with pytest.raises(ValueError, match=r"^one update needs devices \* batch_size \* "
                                         r"accumulation = 120 samples; the training set has 85"):
        train(config, progress=False, data=datasets[2])


def test_a_short_last_step_needs_two_samples_for_every_statistic_part():
    """The rule of docs/data-parallel.md: a leftover is a step only when each of the parts
    its batch statistics are split into (statistic_parts) gets two samples."""
    from refnorm.train.parallel import statistic_parts

    assert statistic_parts("bn", 4, 1) == 4            # per-device BN: a part per device
    assert epoch_steps(43, 8, 4) == [8] * 5            # 3 left over < 2 x 4: left out
    assert epoch_steps(45, 8, 4) == [8] * 5            # 5 < 8: left out
    assert epoch_steps(48, 8, 4) == [8] * 6            # nothing left over
    assert epoch_steps(46, 8, 3) == [8] * 5 + [6]      # 6 >= 2 x 3: kept
    assert epoch_steps(43, 8, 1) == [8] * 5 + [3]      # one part: 3 >= 2, kept


@pytest.mark.parametrize(("many", "one"), [({"norm": "syncbn"}, {"norm": "bn"}),
                                           ({"norm": "gn", "num_groups": 2},
                                            {"norm": "gn", "num_groups": 2})])
def test_a_short_last_step_is_kept_or_left_out_alike_on_p_devices_and_on_one(many, one):
    """43 samples in steps of 4 x 2: a last step of 3, which one device x 8 keeps (BN needs
    two values) and 4 devices once left out (each shard needing two): the runs then differed
    in every array. Now both keep it; one device of the four gets an empty shard."""
    full = prepare_data(TrainConfig(train_subset=43))
    data = dataclasses.replace(full, x_test=full.x_test[:40], y_test=full.y_test[:40])
    from refnorm.train.parallel import statistic_parts
    assert epoch_steps(43, 8, statistic_parts(many["norm"], 4, 1))[-1] == 3
    assert [s.stop - s.start for s in step_pieces(3, 1, 4)[0]] == [0, 1, 1, 1]
    a = _run(data, devices=4, batch_size=2, **many)
    b = _run(data, devices=1, batch_size=8, **one)
    _assert_close(_params(a), _params(b), "parameter")
    _assert_close(_states(a), _states(b), "state")
    _assert_losses_close(a, b)


def test_sn_batch_averages_pool_the_same_micro_batches_on_p_devices_and_with_accumulation():
    """average_samples (48 here) is cut to a multiple of the update: 2 devices x 5 and one
    device accumulating 2 micro-batches of 5 pool the same 40 samples (before, 40 against 45:
    the partial batch was left out of batches of 10 and of 5)."""
    from refnorm.train.evaluate import average_batches
    config = TrainConfig(**{**BASE, "devices": 2, "batch_size": 5, "norm": "sn"})
    single = dataclasses.replace(config, devices=1, accumulation=2)
    full = prepare_data(TrainConfig(train_subset=127))
    many, one = average_batches(config, full, 0), average_batches(single, full, 0)
    assert [len(b) for b in many] == [10] * 4 and [len(b) for b in one] == [5] * 8
    np.testing.assert_array_equal(np.concatenate(many), np.concatenate(one))


@pytest.mark.parametrize("odd", [1, 2])
def test_check_same_model_finds_any_device_that_differs(odd):
    """On 3 devices the one whose array differs is named wherever it is (a comparison of
    device 0 with the last device alone would miss device 1; every test had 2 devices)."""
    from refnorm.sync.comm import InProcessGroup
    from refnorm.train.parallel import check_same_model

    arrays = [np.zeros(3), np.zeros(3), np.zeros(3)]
    arrays[odd] = np.array([0.0, 1.0, 0.0])

    def device(comm, a):
        check_same_model(comm, [("conv.w", np.zeros(2)), ("bn.gamma", a)], where="after epoch 1")

    with pytest.raises(Diverged, match=rf"bn.gamma differs between device 0 and device {odd}$"):
        InProcessGroup.run(3, device, arrays)
    InProcessGroup.run(3, lambda comm, a: check_same_model(comm, [("w", a)], where="now"),
                       [np.arange(3.0)] * 3)


@pytest.mark.parametrize(("n", "size"), [(5, 2), (22, 8), (3, 4), (7, 3)])
def test_shard_r_is_the_floor_split(n, size):
    """Rank r holds samples floor(r n / P) up to floor((r + 1) n / P), as documented (an
    evaluation gathers every part, so a wrong rank-to-part map changed no result)."""
    from refnorm.train.parallel import shard

    for rank in range(size):
        assert shard(n, rank, size) == slice(rank * n // size, (rank + 1) * n // size)


def test_a_normalizer_of_ones_own_needs_two_samples_in_every_shard():
    """statistic_parts(None, ...): the loop cannot know a layer of one's own statistics, so it
    asks, as for per-device BN, two samples of every device's every micro-batch."""
    from refnorm.train.parallel import statistic_parts

    assert statistic_parts(None, 4, 2) == statistic_parts("bn", 4, 2) == 8
    assert statistic_parts("gn", 4, 2) == statistic_parts("syncbn", 4, 2) == 2


def test_sn_batch_averages_draw_new_samples_each_epoch():
    """SN's population statistics after epoch e come from default_rng([seed, e, 1]): the same
    epoch averages the same batches, another epoch other ones."""
    from refnorm.train.evaluate import average_batches

    config = TrainConfig(norm="sn", batch_size=8, average_samples=32)
    data = prepare_data(TrainConfig(train_subset=96))
    first, again, later = (np.concatenate(average_batches(config, data, e)) for e in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, later)


def test_step_pieces_are_micro_batches_in_order_each_split_over_the_devices_in_rank_order():
    """pieces[a][p]: micro-batch a is the a-th contiguous part of the step, and device p takes
    the p-th contiguous part of it (10 samples, 2 micro-batches of 5, each 2 + 3 over 2
    devices): with accumulation, a running average sees the micro-batches in sample order."""
    assert step_pieces(10, 2, 2) == [[slice(0, 2), slice(2, 5)], [slice(5, 7), slice(7, 10)]]
    assert step_pieces(7, 3, 1) == [[slice(0, 2)], [slice(2, 4)], [slice(4, 7)]]


def test_average_states_gives_every_device_the_mean_of_the_running_statistics():
    """Per-device BN: at the end of an epoch every device's running mean becomes the mean over
    the devices (here of 1, 2 and 6: 3), in the state's own dtype; a flag is left as it is.
    (The equivalence tests cannot see this: per-device BN's running statistics differ from
    one device's with accumulation by design.)"""
    import refnorm
    from refnorm.sync.comm import InProcessGroup
    from refnorm.train.parallel import average_states

    def device(comm, value):
        bn, sn = refnorm.build("bn", 3), refnorm.build("sn", 3)
        bn.state = {**bn.state, "running_mean": np.full(3, value, np.float32)}
        average_states(comm, [bn, sn])
        return bn.state, sn.state

    for bn, sn in InProcessGroup.run(3, device, [1.0, 2.0, 6.0]):
        np.testing.assert_array_equal(bn["running_mean"], np.full(3, 3.0, np.float32))
        np.testing.assert_array_equal(bn["running_var"], np.ones(3, np.float32))
        assert bn["running_mean"].dtype == np.float32
        assert sn["population_ready"].dtype == np.bool_


def test_a_long_error_message_reaches_every_device_whole():
    """One device's refusal, with a long path in it, is what every device raises: the record
    crosses the devices in full (a message cut short is no longer a record)."""
    from refnorm.sync.comm import InProcessGroup
    from refnorm.train.parallel import share_record

    record = {"kind": "OutputFolderError", "message": "cannot write " + "/very/long" * 150}

    def device(comm, mine):
        return share_record(comm, mine, source=1, what="a setup error")

    assert InProcessGroup.run(2, device, [None, record]) == [record, record]


def test_an_error_message_longer_than_the_shared_buffer_arrives_shortened_on_every_device():
    """A device's refusal with a path of 3 kB in its message: every device raises it, its
    beginning kept and "..." where it was cut (the JSON cut at the buffer's 2048 bytes did
    not parse, and every device raised a JSONDecodeError instead)."""
    from refnorm.sync.comm import InProcessGroup
    from refnorm.train.loop import together
    from refnorm.train.parallel import MESSAGE_BYTES, fit_record

    message = "cannot read " + "/a/long/path" * 250

    def device(comm, _):
        def work():
            if comm.rank == 1:
                raise ValueError(message)
            return "read"

        with pytest.raises(ValueError) as info:
            together(comm, "the data", work)
        return str(info.value)

    for got in InProcessGroup.run(2, device, [None, None]):
        assert got.startswith("device 1: cannot read /a/long/path/a/long/path")
        assert got.endswith("...") and len(got) < len(message)
    for record in ({"kind": "ValueError", "message": "é" * 3000},
                   {"kind": "ValueError", "message": 'a"' * 1500, "where": "x" * 900}):
        text = fit_record(record)
        assert len(text.encode()) <= MESSAGE_BYTES
        shortened = json.loads(text)
        assert shortened["kind"] == "ValueError" and shortened["message"].endswith("...")
        assert record["message"].startswith(shortened["message"][:-3])
        assert len(text.encode()) > MESSAGE_BYTES - 16  # cut no shorter than it needs


def test_a_record_one_byte_over_the_shared_buffer_arrives_shortened_and_one_that_fits_whole():
    """The buffer's exact edge: a record whose JSON is MESSAGE_BYTES bytes crosses whole; one
    byte more and it is shortened to fit (cut at the buffer instead, it did not parse)."""
    from refnorm.sync.comm import InProcessGroup
    from refnorm.train.parallel import MESSAGE_BYTES, share_record

    frame = len(json.dumps({"kind": "ValueError", "message": ""}))  # the JSON around the text
    fits = {"kind": "ValueError", "message": "x" * (MESSAGE_BYTES - frame)}
    over = {"kind": "ValueError", "message": "x" * (MESSAGE_BYTES - frame + 1)}
    assert len(json.dumps(fits)) == MESSAGE_BYTES == len(json.dumps(over)) - 1

    def device(comm, mine):
        return share_record(comm, mine, source=0, what="a setup error")

    assert InProcessGroup.run(2, device, [fits, None]) == [fits, fits]
    for got in InProcessGroup.run(2, device, [over, None]):
        assert got["kind"] == "ValueError" and got["message"].endswith("...")
        assert len(json.dumps(got)) <= MESSAGE_BYTES


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_gradients_that_overflow_only_in_their_sum_over_the_devices_are_named(monkeypatch):
    """Each device's gradient is finite (3e38, below float32's largest 3.4e38) but their sum is
    not: the check after the all-reduce names the summed gradient, before any update
    (unchecked, the update would make the weight infinite and the run blame the parameter)."""
    real = loop.local_step

    def large(model, batches, *, total):
        grads, totals, problem = real(model, batches, total=total)
        grads["0/w"] = grads["0/w"] * 0 + np.float32(3e38)
        return grads, totals, problem

    monkeypatch.setattr(loop, "local_step", large)
    config = TrainConfig(norm="gn", num_groups=2, devices=2, batch_size=4, epochs=1,
                         widths=(4, 4), train_subset=85, dtype="float32")
    with pytest.raises(NonFinite, match=r"^layer 0 \(Conv2d\) gradient of w became inf in step 1 "
                                        r"of epoch 1; the run stopped"):
        train(config, progress=False, data=prepare_data(config))


def test_each_rank_takes_the_gpu_of_its_rank_on_its_machine(monkeypatch):
    """docs/data-parallel.md, "GPUs": with --device gpu under mpiexec each rank uses the GPU of
    its rank on its machine (MPI_LOCALRANKID, modulo the GPUs it sees), and rank 0's NCCL
    unique id is broadcast over MPI to every rank. CuPy and NCCL are stand-ins here."""
    used, built, sent = [], [], []
    cuda = types.SimpleNamespace(Device=lambda i: types.SimpleNamespace(use=lambda: used.append(i)),
                                 runtime=types.SimpleNamespace(getDeviceCount=lambda: 2))
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setattr(NCCLCommunicator, "unique_id", staticmethod(lambda: b"rank 0's id"))
    monkeypatch.setattr(NCCLCommunicator, "from_unique_id", classmethod(
        lambda cls, size, uid, rank, timeout=None: built.append((size, uid, rank, timeout))))

    def bcast(value, root):
        sent.append((value, root))
        return b"rank 0's id"

    for name in launch.LOCAL_RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for rank, local in [(0, 0), (4, 3), (5, 0)]:  # 6 ranks, 4 on the second machine, 2 GPUs each
        monkeypatch.setenv("MPI_LOCALRANKID", str(local))
        gpu_communicator(types.SimpleNamespace(rank=rank, size=6, timeout=7.0,
                                               comm=types.SimpleNamespace(bcast=bcast)))
    assert used == [0, 1, 0]
    assert sent == [(b"rank 0's id", 0), (None, 0), (None, 0)]
    assert built == [(6, b"rank 0's id", rank, 7.0) for rank in (0, 4, 5)]


def test_a_test_set_smaller_than_the_devices_is_evaluated_as_on_one_device(datasets):
    """Each device evaluates its contiguous part of the test set: with 2 test samples on 3
    devices one device has none, and adds nothing to the sums (it stopped the run after its
    first epoch, predicting on no images). GN on 3 devices x b equals one device x (3 b)."""
    data = dataclasses.replace(datasets[3], x_test=datasets[3].x_test[:2],
                               y_test=datasets[3].y_test[:2])
    many = _run(data, norm="gn", devices=3, batch_size=B, epochs=1)
    one = _run(data, norm="gn", devices=1, batch_size=3 * B, epochs=1)
    _assert_losses_close(many, one)
    assert many.history[-1]["test_acc"] == one.history[-1]["test_acc"]


def test_a_communicator_of_another_size_than_the_devices_is_refused(tmp_path, datasets):
    """train(config, comm=...): this process is one device of comm, whose size must be
    config.devices (a run of 2 devices on a communicator of 1 trained half of every update
    as if it were the whole), refused before the output folder is made."""
    from refnorm.sync.comm import SingleProcess

    config = TrainConfig(**{**BASE, "devices": 2, "batch_size": B})
    with pytest.raises(ValueError, match=r"^config.devices is 2 but the communicator has 1 "
                                         r"devices; they must agree$"):
        train(config, out=tmp_path / "run", progress=False, data=datasets[2],
              comm=SingleProcess())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("comm", [42, "mpi"])
def test_a_comm_that_is_not_a_communicator_is_refused_before_training(tmp_path, datasets, comm):
    """train(config, comm=42) failed with "'int' object has no attribute 'size'"; it is now
    the communicators' own TypeError, before the output folder is made."""
    config = TrainConfig(**{**BASE, "devices": 2, "batch_size": B})
    with pytest.raises(TypeError, match=r"^comm must be a communicator .*; got "):
        train(config, out=tmp_path / "run", progress=False, data=datasets[2], comm=comm)
    assert not (tmp_path / "run").exists()
