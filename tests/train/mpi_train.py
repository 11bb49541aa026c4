"""Run under ``mpiexec -n P`` by tests/train/test_parallel_mpi.py: one rank of a data-parallel
training run, through the ``refnorm`` command or the ``train`` function.

    python tests/train/mpi_train.py cli MODE ARGS...        # refnorm ARGS..., after MODE

(``train(config, comm=...)`` itself runs as ``python -m refnorm.train.mpi_run``.)

MODE sets up one thing going wrong on rank 1 (the others run as they are): ``none``;
``sigterm`` (rank 1 sends itself SIGTERM after its 3rd step); ``nan`` (rank 1's first BN
running variance becomes infinite after its 3rd step); ``raise`` (rank 1 raises
RuntimeError after its 3rd step); ``exit`` (rank 1 calls ``os._exit(0)`` after its 3rd step);
``data`` (rank 1 cannot read the data set); ``otherdata`` (rank 1's data differs from the
others' in one pixel, as another file at the same path on another machine would);
``otherlr`` (rank 1 is given ``--lr 0.1`` on top of ARGS).
"""

from __future__ import annotations

import os
import signal
import sys

from refnorm.launch import mpi_launch


def cli(mode: str, args: list[str]) -> None:
    from refnorm.__main__ import entry
    from refnorm.train import loop

    launch = mpi_launch()
    rank = 0 if launch is None else launch[0]
    if rank == 1 and mode in ("sigterm", "nan", "raise", "exit"):
        real = loop.run_step

        def run_step(run, position, picked):
            after = real(run, position, picked)
            if (after.epoch, after.step) == (0, 3):
                if mode == "sigterm":
                    os.kill(os.getpid(), signal.SIGTERM)
                elif mode == "exit":
                    os._exit(0)  # gone without a word: no leave header, no status
                elif mode == "nan":
                    bn = run.model.layers()[1]
                    bn.state = {**bn.state, "running_var": bn.state["running_var"] * float("inf")}
                else:
                    raise RuntimeError("rank 1 broke")
            return after

        loop.run_step = run_step
    if rank == 1 and mode == "data":
        def unreadable(config):
            raise ValueError("cannot read the data set here (rank 1's file system)")

        loop.prepare_data = unreadable
    if rank == 1 and mode == "otherdata":
        import dataclasses

        real_data = loop.prepare_data

        def other(config):
            data = real_data(config)
            x_train = data.x_train.copy()
            x_train.flat[0] += 1.0
            return dataclasses.replace(data, x_train=x_train)

        loop.prepare_data = other
    if rank == 1 and mode == "otherlr":
        args = [*args, "--lr", "0.1"]
    sys.argv = ["refnorm", *args]
    entry()


if __name__ == "__main__":
    cli(sys.argv[2], sys.argv[3:])
