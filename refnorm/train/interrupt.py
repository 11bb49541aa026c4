"""Interruptions that take effect at a step boundary.

While a run holds :class:`DeferredSignals`, SIGINT (Ctrl-C) and SIGTERM only set a flag;
the trainer reads it between optimizer steps, saves a checkpoint there and stops. So no
signal lands inside an update (a half-updated set of parameters), inside an evaluation or
inside a checkpoint write, and a second Ctrl-C during the final save lets the save finish.
The exit status a command should return is ``128 + signal number`` (130 for SIGINT, 143
for SIGTERM), as a shell reports a process killed by that signal.

Python runs signal handlers in the main thread only; elsewhere (a run started from another
thread) the handlers are not installed and a Ctrl-C arrives as ``KeyboardInterrupt``, which
the trainer still undoes to the last step boundary.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class DeferredSignals:
    """A context manager recording SIGINT and SIGTERM instead of acting on them.

    Attributes
    ----------
    received : int or None
        The first signal number received, None while none has been.
    count : int
        How many were received (a second Ctrl-C is counted, and otherwise ignored).
    installed : bool
        Whether the handlers are in place (only in the main thread).
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.count = 0
        self.installed = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> DeferredSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
            self.installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
        self.installed = False

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Only set the flag: nothing that could be half-done when the handler interrupts it.
        if self.received is None:
            self.received = signum
        self.count += 1

    @staticmethod
    def exit_status(signum: int) -> int:
        """The status a command returns after stopping on ``signum`` (130, 143)."""
        return 128 + int(signum)
