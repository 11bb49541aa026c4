"""Statistics across devices: communicators, synchronized BN and SN, data-parallel steps.

- :mod:`refnorm.sync.comm` — :class:`SingleProcess`, :class:`InProcessGroup` (P simulated
  devices in one process), :class:`MPICommunicator` (mpi4py + the mpich wheel, with a
  watchdog); what "a synchronized step never hangs" guarantees is in its docstring;
- :mod:`refnorm.sync.headers` — the header every collective sends first (operation, layer,
  step, shapes), checked on every rank before the payload, and the leave header;
- :mod:`refnorm.sync.batch_norm` — synchronized BN (``syncbn``);
- :mod:`refnorm.sync.switchable` — synchronized SN (``syncsn``), Appendix A Eq. 15-25, its own
  forward/backward pair built from the single-device SN pieces;
- :mod:`refnorm.sync.data_parallel` — gradients reduced across devices once per step.
"""

from refnorm.sync.batch_norm import SyncBatchNorm, sync_batch_norm_backward, sync_batch_norm_forward
from refnorm.sync.comm import Communicator, InProcessGroup, MPICommunicator, SingleProcess
from refnorm.sync.data_parallel import allreduce_gradients
from refnorm.sync.nccl import NCCLCommunicator  # imports CuPy only when one is built
from refnorm.sync.switchable import (
    SyncSwitchableNorm,
    sync_switchable_norm_backward,
    sync_switchable_norm_forward,
)

__all__ = [
    "Communicator",
    "InProcessGroup",
    "MPICommunicator",
    "NCCLCommunicator",
    "SingleProcess",
    "SyncBatchNorm",
    "SyncSwitchableNorm",
    "allreduce_gradients",
    "sync_batch_norm_backward",
    "sync_batch_norm_forward",
    "sync_switchable_norm_backward",
    "sync_switchable_norm_forward",
]
