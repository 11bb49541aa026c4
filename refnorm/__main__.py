"""``python -m refnorm`` and the ``refnorm`` command.

:func:`entry` installs the process's SIGINT and SIGTERM handling before anything heavy is
imported, so that Ctrl-C at any moment (importing numpy, reading a checkpoint, training, or
while the command exits) ends the command quietly with 130 (143 for SIGTERM): during a
training step it stops at the step boundary with a checkpoint (:mod:`refnorm.train.interrupt`),
elsewhere where it lands. ``import refnorm`` is light (:mod:`refnorm` loads its parts on first
use), so the handlers are in place within milliseconds of the interpreter starting.
"""

import os
import sys

from refnorm.launch import share_cores
from refnorm.train.interrupt import Interrupted, Signals, exit_status


def entry() -> None:
    """Run the command line with this process's signal handling; exit with its status."""
    signals = Signals().__enter__()
    share_cores()  # under mpiexec: before numpy, OpenBLAS and numba start their threads
    try:
        from refnorm.cli import main

        status = main()
    except Interrupted as stop:
        status = exit_status(stop.signum)
    except BrokenPipeError:  # stdout's reader left (`refnorm gradcheck --all | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # a quiet exit flush
        status = 128 + 13  # as a process killed by SIGPIPE, never 1 (gradcheck: "a failure")
    finally:
        # Exiting now: a signal from here on must not turn the status into a traceback.
        signals.ignore_until_exit()
    sys.exit(status)


if __name__ == "__main__":
    entry()
