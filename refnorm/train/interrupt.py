"""Interruptions that take effect at a step boundary.

While a run holds :class:`Signals`, SIGINT (Ctrl-C) and SIGTERM are handled in two ways:

- inside :meth:`Signals.deferred` (the optimizer steps, the evaluations, the checkpoint and
  metrics writes) the first one only sets a flag; the trainer reads it between steps, saves a
  checkpoint there and stops. So no signal lands inside an update (a half-updated set of
  parameters), inside an evaluation or inside a checkpoint write;
- elsewhere (loading the data, reading a checkpoint, building the model) the first one raises
  :class:`Interrupted` where it lands, so a read that blocks (a FIFO, a stalled network file)
  can still be interrupted.

Once one signal has been received, every later one is counted and ignored: the process is
already stopping, and a second Ctrl-C during the final save, or while the command exits with
its status, must not turn the orderly stop into a traceback. The command line installs one
:class:`Signals` for the whole process (``refnorm.__main__.entry``), which the trainer
shares; the status a command returns after a signal is ``128 + signal number`` (130 for
SIGINT, 143 for SIGTERM), as a shell reports a process killed by that signal.

Python runs signal handlers in the main thread only; elsewhere (a run started from another
thread) no handler is installed and a Ctrl-C arrives as ``KeyboardInterrupt``, which the
trainer still undoes to the last step boundary.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)
SIGNAL_NAMES = {int(signal.SIGINT): "Ctrl-C (SIGINT)", int(signal.SIGTERM): "SIGTERM"}


def exit_status(signum: int) -> int:
    """The status a command returns after stopping on ``signum`` (130, 143)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return SIGNAL_NAMES.get(int(signum), f"signal {signum}")


class Interrupted(KeyboardInterrupt):
    """A signal acted on where it landed (outside a deferred section); ``signum`` says which.

    A ``KeyboardInterrupt``, so code that undoes its work on Ctrl-C undoes it on SIGTERM too.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = int(signum)

    def __reduce__(self) -> tuple[type, tuple[int]]:  # from a study's worker process, whole
        return (type(self), (self.signum,))


class Signals:
    """SIGINT and SIGTERM for a run: deferred inside :meth:`deferred`, raised elsewhere.

    ``with Signals() as signals:`` installs the handlers (in the main thread only) and puts the
    previous ones back on exit; a :class:`Signals` entered while another is installed shares
    that one's record instead (the command line's, held until the process exits).

    Attributes
    ----------
    received : int or None
        The first signal number received, None while none has been.
    count : int
        How many were received (all but the first are ignored).
    installed : bool
        Whether this process's handlers are in place (only in the main thread).
    """

    _current: Signals | None = None  # the installed instance, if any

    def __init__(self) -> None:
        self.received: int | None = None
        self.count = 0
        self.installed = False
        self._deferring = 0
        self._owner = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        shared = Signals._current
        if shared is not None:
            return shared
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
            self.installed = self._owner = True
            Signals._current = self
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._owner:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
        self.installed = self._owner = False
        Signals._current = None

    def ignore_until_exit(self) -> None:
        """The process is about to exit with its status: from now on ignore both signals."""
        self.__exit__()
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)

    def raise_if_received(self) -> None:
        """Act on a signal received in a deferred section before the first step (raise it)."""
        if self.received is not None:
            raise Interrupted(self.received)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside: a signal only sets :attr:`received` (read at the next step boundary)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.received is not None:
            return  # already stopping
        self.received = signum
        if not self._deferring:
            raise Interrupted(signum)
