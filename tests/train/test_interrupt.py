"""Interruptions at every point of a step: the resumed run is bit-identical to an uninterrupted one.

A signal (SIGINT or SIGTERM, sent to this process with ``os.kill``) or a raised
``KeyboardInterrupt`` is injected at the k-th call of a function the run goes through:
every layer's forward and backward, the update of each parameter, the gradient
accumulation, the evaluation (SN's batch average, the predictions) and the writes of a
checkpoint and of the metrics. The run must stop at a step boundary with a checkpoint, and
the run resumed from it must end with a checkpoint equal, byte for byte, to the one of the
uninterrupted run (parameters, momentum, every layer's state, the position and the history
but its timings).

The model is the smallest that has every kind of state: SN with the batch average (running
statistics, population statistics set at evaluation, readiness flags), widths (4, 4), 32
training samples in micro-batches of 4 x 2 accumulation, so 4 steps per epoch, 2 epochs.
A run calls (measured with a counting wrapper) per step 18 layer forwards, 18 backwards and
12 parameter updates; epoch 1's steps make forwards 1-72, its evaluation 73-108 (batch
average 18, test and train predictions 9 each), epoch 2's steps 109-180.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from refnorm.layer import Layer
from refnorm.train import evaluate, loop, outputs
from refnorm.train.checkpoint import CHECKPOINT
from refnorm.train.config import TrainConfig
from refnorm.train.folder import LOCK
from refnorm.train.loop import prepare_data, train
from refnorm.train.optim import SGD

CONFIG = TrainConfig(norm="sn", batch_size=4, accumulation=2, epochs=2, widths=(4, 4),
                     train_subset=32, average_samples=8)
STEPS = 4  # per epoch: 32 samples / (4 x 2)


@pytest.fixture(scope="module")
def data():
    full = prepare_data(CONFIG)
    return dataclasses.replace(full, x_test=full.x_test[:40], y_test=full.y_test[:40])


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = train(CONFIG, out=out, progress=False, data=data)
    assert not result.interrupted
    return _read(out / CHECKPOINT)


# Where a function is found, by the name the cases use.
TARGETS = {
    "forward": (Layer, "forward"),
    "backward": (Layer, "backward"),
    "update": (SGD, "update"),
    "accumulate": (loop, "local_step"),
    "evaluate": (loop, "evaluate"),
    "batch_average": (evaluate, "batch_average"),
    "predict": (evaluate, "predict"),
    "progress": (outputs.Progress, "update"),
    "savez": (np, "savez"),
    "fsync": (os, "fsync"),
    "replace": (os, "replace"),
    "write_metrics": (loop, "write_metrics"),
}

# (target, k): forward 1 and 9 are micro-batch 1 of step 1, 10-18 micro-batch 2; 72 the
# last forward of epoch 1's steps, 80/95/105 its batch average and predictions, 109 and 150
# epoch 2's steps. update 13-24 are the 12 parameters of step 2, 48 and 96 the last ones of
# each epoch. fsync 3 / replace 1 / savez 1 write epoch 1's checkpoint, fsync 4 and
# replace 3 its metrics (fsync 1 and 2 are the folder check and the lock).
POINTS = [
    *(("forward", k) for k in (1, 9, 10, 18, 40, 72, 80, 95, 105, 109, 150)),
    *(("backward", k) for k in (1, 9, 10, 18, 19, 72, 100)),
    *(("update", k) for k in (1, *range(13, 25), 48, 96)),
    *(("accumulate", k) for k in (1, 4, 5, 8)),
    ("evaluate", 1), ("batch_average", 1), ("predict", 1), ("predict", 2), ("progress", 4),
    ("savez", 1), ("fsync", 3), ("replace", 1), ("write_metrics", 1), ("fsync", 4),
    ("replace", 3),
]


class Injector:
    """Wraps the TARGETS; at the k-th call of a chosen one, sends a signal (or raises
    KeyboardInterrupt) before the call goes on."""

    def __init__(self, monkeypatch, plan):
        self.plan = list(plan)  # [(target, k, signal number or "raise")]
        self.calls = dict.fromkeys(TARGETS, 0)
        self.fired = []
        for name, (owner, attr) in TARGETS.items():
            monkeypatch.setattr(owner, attr, self._wrap(name, getattr(owner, attr)))

    def _wrap(self, name, original):
        def wrapper(*args, **kwargs):
            self.calls[name] += 1
            for target, k, what in self.plan:
                if (target, k) == (name, self.calls[name]):
                    self.fired.append((target, k))
                    if what == "raise":
                        raise KeyboardInterrupt
                    os.kill(os.getpid(), what)
            return original(*args, **kwargs)

        return wrapper


def _read(path: Path):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    for row in meta["history"]:
        row.pop("seconds")  # wall time: the one thing that differs
    return arrays, meta


def _assert_bit_identical(a, b):
    (arrays_a, meta_a), (arrays_b, meta_b) = a, b
    assert arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        x, y = arrays_a[key], arrays_b[key]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), key
        assert x.tobytes() == y.tobytes(), key
    assert meta_a == meta_b


def _interrupt_and_resume(monkeypatch, tmp_path, data, plan):
    injector = Injector(monkeypatch, plan)
    cut = train(CONFIG, out=tmp_path, progress=False, data=data)
    assert injector.fired == [(t, k) for t, k, _ in plan], "every injection point was reached"
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert not (tmp_path / LOCK).exists()
    saved = _read(tmp_path / CHECKPOINT)[1]
    resumed = train(CONFIG, out=tmp_path, resume=True, progress=False, data=data)
    assert not resumed.interrupted
    return cut, saved


@pytest.mark.parametrize(("target", "k"), POINTS)
def test_sigint_anywhere_resumes_bit_identical(monkeypatch, tmp_path, data, reference,
                                               target, k):
    cut, saved = _interrupt_and_resume(monkeypatch, tmp_path, data,
                                       [(target, k, signal.SIGINT)])
    assert cut.interrupted and cut.signal == signal.SIGINT
    assert (saved["epoch"], saved["step"]) < (CONFIG.epochs, 0)  # stopped before the end
    _assert_bit_identical(reference, _read(tmp_path / CHECKPOINT))


@pytest.mark.parametrize(("target", "k"), [("forward", 10), ("update", 20), ("savez", 1)])
def test_sigterm_saves_at_the_step_boundary(monkeypatch, tmp_path, data, reference, target, k):
    cut, _ = _interrupt_and_resume(monkeypatch, tmp_path, data, [(target, k, signal.SIGTERM)])
    assert cut.interrupted and cut.signal == signal.SIGTERM
    _assert_bit_identical(reference, _read(tmp_path / CHECKPOINT))


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_during_the_save_lets_it_finish(monkeypatch, tmp_path, data, reference,
                                                        first):
    # The first signal lands in step 1; the save at its boundary is np.savez's first call,
    # where a second Ctrl-C arrives (and, through the temporary file, during os.replace).
    plan = [("forward", 10, first), ("savez", 1, signal.SIGINT), ("replace", 1, signal.SIGINT)]
    cut, saved = _interrupt_and_resume(monkeypatch, tmp_path, data, plan)
    assert cut.interrupted and cut.signal == first
    assert (saved["epoch"], saved["step"]) == (0, 1)
    _assert_bit_identical(reference, _read(tmp_path / CHECKPOINT))


@pytest.mark.parametrize(("target", "k"), [("forward", 10), ("backward", 5), ("update", 20),
                                           ("update", 24), ("accumulate", 2), ("evaluate", 1),
                                           ("savez", 1), ("write_metrics", 1)])
def test_keyboard_interrupt_raised_anywhere_resumes_bit_identical(monkeypatch, tmp_path, data,
                                                                  reference, target, k):
    # Without the signal handlers (a run outside the main thread), Ctrl-C is a
    # KeyboardInterrupt raised where it lands: a step undoes itself, a failed save is redone.
    cut, _ = _interrupt_and_resume(monkeypatch, tmp_path, data, [(target, k, "raise")])
    assert cut.interrupted
    _assert_bit_identical(reference, _read(tmp_path / CHECKPOINT))


def test_handlers_are_restored(data):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    train(CONFIG, progress=False, data=data)
    assert {s: signal.getsignal(s) for s in before} == before


# -- the command, in a process of its own ---------------------------------------------------------


class _Process:
    """A ``refnorm`` command in a process of its own, its stderr read line by line as it comes
    (a thread puts each line in a queue, so that a test waits for a line, never for a time)."""

    def __init__(self, argv: list[str], **popen: object) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, **popen)  # type: ignore[call-overload]
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    # The timeouts only end a test whose process hangs; generous, as a loaded machine (a CI
    # runner beside other jobs, a first run compiling kernels) can take a minute to start one.
    def wait_for(self, text: str, timeout: float = 600.0) -> None:
        """Until a line of stderr contains ``text`` (fails if the process ends first)."""
        while True:
            line = self.lines.get(timeout=timeout)
            assert line is not None, f"{text!r} never came:\n{''.join(self.err)}"
            self.err.append(line)
            if text in line:
                return

    def finish(self, timeout: float = 600.0) -> tuple[int, str]:
        self.proc.wait(timeout=timeout)
        while (line := self.lines.get(timeout=timeout)) is not None:
            self.err.append(line)
        return self.proc.returncode, "".join(self.err)


def _train(out: Path, *extra: str, python: tuple[str, ...] = ("-m", "refnorm")) -> _Process:
    return _Process([sys.executable, *python, "train", "--epochs", "30", "--out", str(out),
                     *extra])


@pytest.mark.parametrize(("signals", "status"), [((signal.SIGTERM,), 143),
                                                 ((signal.SIGINT,), 130),
                                                 ((signal.SIGINT, signal.SIGINT), 130)])
def test_cli_stops_on_a_signal_with_a_checkpoint(tmp_path, signals, status):
    proc = _train(tmp_path)
    proc.wait_for("epoch 1:")  # into epoch 2's steps
    proc.proc.send_signal(signals[0])
    proc.wait_for("checkpoint saved")
    for signum in signals[1:]:  # a second Ctrl-C after the save, while the command exits
        proc.proc.send_signal(signum)
    code, err = proc.finish()
    assert code == status, err
    assert "Traceback" not in err
    assert "continue with --resume" in err
    assert (tmp_path / CHECKPOINT).exists() and not (tmp_path / LOCK).exists()
    assert not list(tmp_path.glob(".*.tmp"))


# Runs the command with the trainer's save-and-stop held open: after it has saved (and train()
# has returned, so only the command's own handling is left), it says "held" and waits for its
# stdin to close, so the test can send a signal into exactly that moment.
_HELD = """
import sys
from refnorm.train import loop
from refnorm.__main__ import entry

original = loop.train

def held(*args, **kwargs):
    result = original(*args, **kwargs)
    print("held", file=sys.stderr, flush=True)
    sys.stdin.read()
    return result

loop.train = held
entry()
"""


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_stop_keeps_the_exit_status(tmp_path, second):
    # Signals stay deferred until the process exits with its status: the second one lands
    # after train() returned (where normal Python handling would raise KeyboardInterrupt).
    proc = _Process([sys.executable, "-c", _HELD, "train", "--epochs", "30", "--out",
                     str(tmp_path)], stdin=subprocess.PIPE)
    proc.wait_for("epoch 1:")
    proc.proc.send_signal(signal.SIGINT)
    proc.wait_for("held")
    proc.proc.send_signal(second)
    assert proc.proc.stdin is not None
    proc.proc.stdin.close()
    code, err = proc.finish()
    assert code == 130, err
    assert "Traceback" not in err and "checkpoint saved" in err


# Runs the command with one step of its start held open, named by argv[1]: "import" (the
# command line's module, which imports numpy) or "read" (the checkpoint's read, blocking as on
# a stalled network file); it says so and waits for its stdin.
_EARLY = """
import sys
import refnorm.__main__

target = sys.argv.pop(1)
if target == "import":
    import builtins
    real_import = builtins.__import__

    def slow_import(name, *args, **kwargs):
        if name == "refnorm.cli":
            print("importing", file=sys.stderr, flush=True)
            sys.stdin.read()
        return real_import(name, *args, **kwargs)

    builtins.__import__ = slow_import
else:
    from refnorm.train import checkpoint
    real_read = checkpoint._read_checkpoint

    def slow_read(path):
        print("reading", file=sys.stderr, flush=True)
        sys.stdin.read()
        return real_read(path)

    checkpoint._read_checkpoint = slow_read
refnorm.__main__.entry()
"""


def test_ctrl_c_while_the_command_imports_exits_130_quietly(tmp_path):
    proc = _Process([sys.executable, "-c", _EARLY, "import", "gradcheck", "bn"],
                    stdin=subprocess.PIPE)
    proc.wait_for("importing")
    proc.proc.send_signal(signal.SIGINT)
    code, err = proc.finish()
    assert code == 130, err
    assert "Traceback" not in err


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_reading_a_checkpoint_stays_interruptible(tmp_path, signum, status):
    args = ["train", "--epochs", "1", "--batch-size", "64", "--out", str(tmp_path)]
    assert subprocess.run([sys.executable, "-m", "refnorm", *args],
                          capture_output=True).returncode == 0
    before = (tmp_path / CHECKPOINT).read_bytes()
    proc = _Process([sys.executable, "-c", _EARLY, "read", *args, "--epochs", "2", "--resume"],
                    stdin=subprocess.PIPE)
    proc.wait_for("reading")
    proc.proc.send_signal(signum)
    code, err = proc.finish()
    assert code == status, err
    assert "Traceback" not in err and "before the first step; nothing was saved" in err
    assert (tmp_path / CHECKPOINT).read_bytes() == before and not (tmp_path / LOCK).exists()


def test_signals_put_the_previous_handlers_back():
    from refnorm.train.interrupt import Signals

    def mine(signum, frame):
        pass

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGTERM, mine)
        with Signals() as signals:
            assert signals.installed
            assert signal.getsignal(signal.SIGTERM) is not mine
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_every_signal_is_counted_and_only_the_first_kept():
    """Three signals in a deferred section: all three counted, the first one kept."""
    from refnorm.train.interrupt import Signals

    with Signals() as signals:
        assert signals.installed
        with signals.deferred():
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
        assert (signals.received, signals.count) == (signal.SIGTERM, 3)


def test_a_deferred_section_that_raised_defers_no_more():
    """After a deferred section ended with an exception, every later signal was deferred too, so a
    blocking read outside any step could no longer be interrupted."""
    from refnorm.train.interrupt import Interrupted, Signals

    with Signals() as signals:
        with pytest.raises(ValueError, match="a failed write"), signals.deferred():
            raise ValueError("a failed write")
        with pytest.raises(Interrupted) as info:
            signal.raise_signal(signal.SIGINT)
        assert info.value.signum == signal.SIGINT


def test_signals_after_ignore_until_exit_do_not_end_the_process():
    """A signal while the command exits with its status killed the process instead (status -15, not
    143)."""
    code = ("import os, signal, sys\nfrom refnorm.train.interrupt import Signals\n"
            "signals = Signals().__enter__()\nsignals.ignore_until_exit()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\nos.kill(os.getpid(), signal.SIGINT)\n"
            "print('exiting', flush=True)\nsys.exit(143)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 143 and done.stdout == "exiting\n", done.stderr


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_the_command_imports_gives_its_own_status(tmp_path, signum, status):
    """A signal that lands outside any command's own handling (here: while refnorm.cli and
    numpy are imported) ends the command with 128 + its number: 143 for SIGTERM, not Ctrl-C's
    130."""
    proc = _Process([sys.executable, "-c", _EARLY, "import", "gradcheck", "bn"],
                    stdin=subprocess.PIPE)
    proc.wait_for("importing")
    proc.proc.send_signal(signum)
    code, err = proc.finish()
    assert code == status, err
    assert "Traceback" not in err


# Runs the command with the interpreter's exit held open: after the command has returned its
# status, an exit handler says "exiting" and waits for stdin to close.
_EXITING = """
import atexit
import sys

def held():
    print("exiting", file=sys.stderr, flush=True)
    sys.stdin.read()

atexit.register(held)
from refnorm.__main__ import entry
entry()
"""


def test_a_signal_while_the_command_exits_keeps_its_status_quietly():
    """A signal that arrives after the command finished, while the interpreter exits, is
    ignored: the status stays the command's (0) and nothing (no traceback) is printed."""
    proc = _Process([sys.executable, "-c", _EXITING, "gradcheck", "in"], stdin=subprocess.PIPE)
    proc.wait_for("exiting")
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.stdin is not None
    proc.proc.stdin.close()
    code, err = proc.finish()
    assert code == 0 and err == "exiting\n", err


# Runs `refnorm study` with its second run held at its first step boundary: the hook says
# "holding run 2" and waits for stdin to close, so the test can send a signal into the middle
# of a run (a signal that lands while a run loads its data is a different path).
_STUDY_HELD = """
import sys
from refnorm.train import study
from refnorm.__main__ import entry

original = study.train
started = []

def held(config, **kwargs):
    started.append(config)
    holding = len(started) == 2

    def hold(epoch, step, model):
        if holding and step == 1:
            print("holding run 2", file=sys.stderr, flush=True)
            sys.stdin.read()

    return original(config, on_step=hold, **kwargs)

study.train = held
entry()
"""


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_study_stopped_by_a_signal_writes_no_report(tmp_path, signum, status):
    """A signal during one of a study's runs stops the whole study, not only that run: the
    command says no report was written, writes none, and exits with 128 + the signal (a
    SIGTERM reached the study as a plain KeyboardInterrupt, and the study exited 130)."""
    out = tmp_path / "study"
    proc = _Process([sys.executable, "-c", _STUDY_HELD, "study", "--methods", "bn",
                     "--batch-sizes", "32", "--update-size", "32", "--epochs", "1",
                     "--seeds", "2", "--jobs", "1", "--out", str(out)], stdin=subprocess.PIPE)
    proc.wait_for("holding run 2")
    proc.proc.send_signal(signum)
    assert proc.proc.stdin is not None
    proc.proc.stdin.close()
    code, err = proc.finish()
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "refnorm study: interrupted; no report was written"
    assert not (out / "report.md").exists() and not (out / "runs.json").exists()
    assert code == status, err


def test_interrupted_crosses_a_process_boundary_whole():
    """A study's worker process raises Interrupted for its run's signal; pickled to the
    parent it keeps its class and signal (it was rebuilt from its message, 'SIGTERM', which is
    no signal number)."""
    import pickle

    from refnorm.train.interrupt import Interrupted

    back = pickle.loads(pickle.dumps(Interrupted(signal.SIGTERM)))
    assert type(back) is Interrupted and back.signum == signal.SIGTERM


def test_a_signal_while_the_folder_is_made_stops_before_the_first_step(monkeypatch, tmp_path,
                                                                        data):
    """Making and locking the output folder is deferred (never left half-done); a signal that
    arrives there is acted on as soon as it is done: the run raises Interrupted before its
    first step and writes no checkpoint (not acted on there, the run would train on to its
    first step boundary and save a checkpoint of an untrained model)."""
    from refnorm.train.interrupt import Interrupted

    real, sent, steps = os.fsync, [], []

    def fsync(fd):  # the first fsync checks the new folder, inside the deferred section
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(Interrupted) as info:
        train(CONFIG, out=tmp_path / "run", progress=False, data=data,
              on_step=lambda epoch, step, model: steps.append((epoch, step)))
    assert sent and info.value.signum == signal.SIGTERM and steps == []
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_a_signal_between_steps_stops_before_the_next_step(tmp_path, data):
    """A signal that arrives between two steps (here in the on_step hook after step 2) stops the
    run at that boundary: step 3 is not taken, and the checkpoint is the one after step 2."""
    seen = []

    def hook(epoch, step, model):
        seen.append((epoch, step))
        if (epoch, step) == (0, 2):
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(CONFIG, out=tmp_path, progress=False, data=data, on_step=hook)
    assert result.interrupted and result.signal == signal.SIGTERM
    assert seen == [(0, 1), (0, 2)]
    with np.load(tmp_path / CHECKPOINT) as z:
        meta = json.loads(z["meta"].tobytes().decode())
    assert (meta["epoch"], meta["step"]) == (0, 2)
