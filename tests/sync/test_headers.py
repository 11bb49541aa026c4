"""Self-describing collectives (refnorm/sync/headers.py): the agreement rule, the header's
wire form, each rank's record of its calls, layer labels; and the watchdog's limit
(refnorm/sync/comm.py's timeout_seconds)."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest

from refnorm.sync.comm import DEFAULT_TIMEOUT, TIMEOUT_ENV, timeout_seconds
from refnorm.sync.headers import (
    HEADER_BYTES,
    LEAVE,
    CallHeader,
    CallLog,
    check_headers,
    layer_label,
)


def _header(rank, op="syncbn forward (count, sum)", layer="syncbn#0", step=1, shapes=((3,),)):
    arrays = tuple((s, "float64") for s in shapes)
    return CallHeader(rank, "collective", 1, op, layer, step, arrays)


def test_agreeing_headers_pass_and_so_does_every_rank_leaving():
    assert check_headers([_header(0), _header(1)]) is None
    log0, log1 = CallLog(0), CallLog(1)
    assert check_headers([log0.leave("done"), log1.leave("done")]) is None


def test_each_kind_of_disagreement_is_named_with_every_rank_call():
    shapes = check_headers([_header(0), _header(1, shapes=((4,),))])
    assert shapes is not None and "ranks passed different arrays" in shapes
    assert "rank 1 entered collective #1: syncbn forward (count, sum) of layer syncbn#0, " \
           "step 1, arrays [(4,) float64]" in shapes
    calls = check_headers([_header(0), _header(1, layer="syncbn#1")])
    assert calls is not None and "ranks entered different collectives" in calls
    steps = check_headers([_header(0, step=3), _header(1, step=2)])
    assert steps is not None and "ranks entered different collectives" in steps
    left = check_headers([_header(0), CallLog(1).leave("exit")])
    assert left == ("refnorm.sync: rank 1 left while rank 0 entered a collective that can never "
                    "complete (uneven batches, a rank in eval mode, or an early exit). rank 0 "
                    "entered collective #1: syncbn forward (count, sum) of layer syncbn#0, step "
                    "1, arrays [(3,) float64]; rank 1 left (exit) before any collective")


def test_any_rank_leaving_while_another_waits_is_named_whichever_rank_it_is():
    # rank 0 leaving is no less a disagreement than rank 1 leaving: only all ranks leaving is.
    message = check_headers([CallLog(0).leave("exit"), _header(1), _header(2)])
    assert message is not None
    assert "rank 0 left while ranks 1, 2 entered a collective that can never complete" in message


def test_header_round_trips_through_its_wire_form():
    header = _header(1, shapes=((2, 3, 4), (1,)))
    data = header.to_bytes()
    assert len(data) <= HEADER_BYTES
    assert CallHeader.from_bytes(data + b"\0" * (HEADER_BYTES - len(data))) == header


def test_a_header_too_long_for_the_wire_keeps_its_arrays_comparable():
    many = tuple((i, 3) for i in range(400))  # ~400 arrays: a whole model's gradients
    small, other = _header(0, shapes=many), _header(0, shapes=many[:-1] + ((9, 9),))
    a, b = (CallHeader.from_bytes(h.to_bytes()) for h in (small, other))
    assert len(small.to_bytes()) <= HEADER_BYTES
    assert a.arrays != b.arrays  # a digest of the full signature, so a difference still shows
    assert "(400,) arrays with sha1" in a.where()


def test_call_log_counts_steps_per_call_and_says_what_it_did_last():
    log = CallLog(0)
    a = np.ones(3)
    log.enter([a], "op", "syncbn#0")
    log.enter([a], "other", "syncbn#0")
    third = log.enter([a], "op", "syncbn#0")
    assert (third.seq, third.step) == (3, 2)
    log.note("forward in eval mode (no collective)", "syncsn#0")
    assert log.leave("exit").detail == (
        "left (exit) after collective #3 (op of layer syncbn#0, step 2); its last call without "
        "a collective: forward in eval mode (no collective) of layer syncsn#0, call 1")


def test_layer_labels_count_per_kind_and_per_communicator():
    class Comm:
        pass

    class Layer:
        pass

    comm, other = Comm(), Comm()
    bn0, sn0, bn1 = Layer(), Layer(), Layer()
    assert [layer_label(comm, x, k) for x, k in ((bn0, "syncbn"), (sn0, "syncsn"),
                                                 (bn1, "syncbn"), (bn0, "syncbn"))] == [
        "syncbn#0", "syncsn#0", "syncbn#1", "syncbn#0"]
    assert layer_label(other, bn1, "syncbn") == "syncbn#0"


def test_watchdog_limit_from_argument_environment_or_default(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert timeout_seconds(None) == DEFAULT_TIMEOUT
    assert timeout_seconds(2) == 2.0
    monkeypatch.setenv(TIMEOUT_ENV, "3.5")
    assert timeout_seconds(None) == 3.5
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=r"\$REFNORM_SYNC_TIMEOUT must be a number of "
                                         r"seconds; got 'soon'"):
        timeout_seconds(None)
    for bad in (0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="timeout must be a positive, finite number"):
            timeout_seconds(bad)


def _wire_header(rank, layer="syncbn#0", shapes=((3,),)):
    arrays = tuple((s, "float64") for s in shapes)
    return CallHeader(rank, "collective", 1, "syncbn forward (count, sum)", layer, 1, arrays)


def test_a_header_of_exactly_the_wire_size_crosses_whole():
    """A header of exactly HEADER_BYTES was shrunk to a digest although it fits."""
    short = len(json.dumps(asdict(_wire_header(0, layer=""))).encode())
    header = _wire_header(0, layer="x" * (HEADER_BYTES - short))  # ASCII: one byte per character
    assert len(json.dumps(asdict(header)).encode()) == HEADER_BYTES
    data = header.to_bytes()
    assert CallHeader.from_bytes(data + b"\0" * (HEADER_BYTES - len(data))) == header


def test_a_leave_header_with_a_long_status_still_crosses_the_wire():
    """A rank leaving with a long status (a long exception message) sent cut JSON, and every peer
    crashed decoding it."""
    header = CallLog(1).leave("raised ValueError: " + "x" * 10_000)
    data = header.to_bytes()
    assert len(data) <= HEADER_BYTES
    back = CallHeader.from_bytes(data + b"\0" * (HEADER_BYTES - len(data)))
    assert (back.rank, back.kind) == (1, LEAVE)
    assert back.detail.startswith("left (raised ValueError: xxx")
    assert check_headers([back, CallLog(0).leave("done")]) is None


def test_steps_are_counted_per_layer_not_per_operation():
    """Two layers of one kind shared a step count, so messages named the second layer's first call
    "step 2"."""
    log, a = CallLog(0), np.ones(3)
    op = "syncbn forward (count, sum)"
    first = [log.enter([a], op, "syncbn#0"), log.enter([a], op, "syncbn#1")]
    second = [log.enter([a], op, "syncbn#0"), log.enter([a], op, "syncbn#1")]
    assert [h.step for h in first] == [1, 1] and [h.step for h in second] == [2, 2]


def test_the_watchdogs_default_limit_is_60_seconds(monkeypatch):
    """README "Several devices": a rank that waits longer than MPICommunicator(timeout=...),
    $REFNORM_SYNC_TIMEOUT or 60 s aborts the job (the message's "waited 60 s")."""
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert timeout_seconds(None) == 60.0


@pytest.mark.parametrize("seconds", [np.float32(2.5), np.float64(2.5), np.int64(3)])
def test_a_numpy_number_of_seconds_is_a_watchdog_limit(seconds):
    # A positive, finite numpy scalar (a limit computed with numpy) was refused as "not a
    # positive, finite number of seconds"; a numpy bool is still no number of seconds.
    assert timeout_seconds(seconds) == float(seconds)
    with pytest.raises(ValueError, match="timeout must be a positive, finite number"):
        timeout_seconds(np.True_)
