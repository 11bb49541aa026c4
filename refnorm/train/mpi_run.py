"""One rank of a data-parallel run under ``mpiexec``, for the study's MPI launcher.

    mpiexec -n P python -m refnorm.train.mpi_run CONFIG_JSON OUT

trains ``TrainConfig(**CONFIG_JSON)`` (whose ``devices`` is P) with an
:class:`~refnorm.sync.comm.MPICommunicator`; rank 0 writes ``OUT/metrics.json`` and the
checkpoint. ``refnorm train`` under ``mpiexec`` is the same with the command's options.
"""

from __future__ import annotations

import json
import sys

from refnorm.launch import share_cores


def main(config_json: str, out: str) -> None:
    from refnorm.sync.comm import MPICommunicator
    from refnorm.train.config import TrainConfig
    from refnorm.train.loop import train

    fields = json.loads(config_json)
    fields["widths"] = tuple(fields["widths"])
    with MPICommunicator() as comm:
        train(TrainConfig(**fields), out=out, progress=False, comm=comm)


if __name__ == "__main__":
    share_cores()
    main(sys.argv[1], sys.argv[2])
