"""One rank of a data-parallel run under ``mpiexec``, for the study's MPI launcher.

    mpiexec -n P python -m refnorm.train.mpi_run CONFIG_JSON OUT

trains ``TrainConfig(**CONFIG_JSON)`` (whose ``devices`` is P) with an
:class:`~refnorm.sync.comm.MPICommunicator`; rank 0 writes ``OUT/metrics.json`` and the
checkpoint. A run that stops on an error it expects (refused data or options, a NaN or an
infinity: every rank raises the same, :func:`refnorm.train.loop.together`) exits 2, or 3 for
a non-finite value, and rank 0 leaves the error in ``OUT/error.json``
(:func:`refnorm.train.loop.error_record`) for the launcher to raise again. A run stopped by
SIGINT or SIGTERM (on any rank: every rank stops at the same step boundary, or before the
first step) exits 130 or 143, as ``refnorm train`` does: its metrics hold only the epochs it
finished.
``refnorm train`` under ``mpiexec`` is the same with the command's options.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from refnorm.launch import share_cores

#: Where rank 0 leaves the error that stopped the run, in ``OUT``.
ERROR = "error.json"


def main(config_json: str, out: str) -> int:
    """Train as this rank; return the exit status (0, 2 refused, 3 non-finite, 130 or 143
    stopped by a signal)."""
    from refnorm.sync.comm import MPICommunicator
    from refnorm.train.checkpoint import CheckpointError
    from refnorm.train.config import TrainConfig
    from refnorm.train.finite import NonFinite
    from refnorm.train.folder import OutputFolderError
    from refnorm.train.interrupt import Interrupted, exit_status
    from refnorm.train.loop import error_record, train

    fields = json.loads(config_json)
    fields["widths"] = tuple(fields["widths"])
    with MPICommunicator() as comm:
        try:
            result = train(TrainConfig(**fields), out=out, progress=False, comm=comm)
        except (NonFinite, CheckpointError, OutputFolderError, ValueError, OSError) as exc:
            if comm.rank == 0:
                try:
                    Path(out, ERROR).write_text(json.dumps(error_record(exc)))
                except OSError:  # OUT itself refused: the launcher reads the status alone
                    print(f"refnorm train: error: {exc}", file=sys.stderr)
            return 3 if isinstance(exc, NonFinite) else 2
        except Interrupted as stop:  # before the first step: loading the data, the checkpoint
            return exit_status(stop.signum)
    if result.interrupted:
        return exit_status(result.signal or signal.SIGINT)
    return 0


if __name__ == "__main__":
    share_cores()
    sys.exit(main(sys.argv[1], sys.argv[2]))
