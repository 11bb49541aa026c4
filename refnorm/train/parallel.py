"""Data parallelism: which samples each device takes, and what the devices agree on.

A run has P devices (``TrainConfig.devices``): P simulated devices in one process
(:class:`~refnorm.sync.comm.InProcessGroup`), P processes under ``mpiexec``
(:class:`~refnorm.sync.comm.MPICommunicator`), or P GPUs
(:class:`~refnorm.sync.nccl.NCCLCommunicator`). The loop (:mod:`refnorm.train.loop`) is the
same for all of them; the communicator is the only difference. What each device does:

- **Its samples.** Each optimizer step draws one global batch of P x b x A samples
  (``devices x batch_size x accumulation``) from the epoch's seeded order, the same samples
  whatever P is. :func:`step_pieces` splits it into A micro-batches and each micro-batch into
  P contiguous shards; device p takes shard p of every micro-batch. The last batch of an
  epoch may be smaller: it is split as evenly as possible (shards then differ by one sample),
  and kept when every batch statistic it needs gets at least two samples: every shard for
  per-device BN and SN, every micro-batch over all devices for SyncBN, SyncSN and the
  per-sample normalizers, whose shards may then hold one sample or none
  (:func:`statistic_parts`, :func:`epoch_steps`). Runs that train the same samples the same
  way keep the same last step: P devices x b and one device x (P b).
- **Its loss.** Device p's loss is the sum of its samples' cross-entropies divided by the
  step's number of samples, so that the sum over devices and micro-batches is the mean over
  the whole global batch, also with unequal shards: parameter gradients are then summed over
  devices with weight 1 (:func:`~refnorm.sync.data_parallel.allreduce_gradients`).
- **One decision per step** (:func:`agree`): after its forward and backward, every device
  puts its status (a signal received, a step undone by Ctrl-C, a non-finite value) and its
  running totals into one row of a small matrix, and one all-reduce gives every device every
  row: all stop at the same step boundary, with the same message.
- **One model.** Synchronized normalizers (``syncbn``, ``syncsn``) keep identical running
  statistics on every device. Per-device normalizers keep their own, averaged over the
  devices once per epoch (:func:`average_states`), before the evaluation and the checkpoint;
  PyTorch's DistributedDataParallel instead broadcasts rank 0's buffers at every forward.
  Every epoch the devices compare checksums of every parameter, momentum and state array
  (:func:`check_same_model`).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from refnorm.backend import Array, array_namespace, to_numpy
from refnorm.launch import local_rank
from refnorm.sync.headers import allreduce

SYNC_NORMS = ("syncbn", "syncsn")
MIN_SHARD = 2  # samples each batch statistic of the last, smaller step needs
MESSAGE_BYTES = 2048  # room for one device's message to all (a NonFinite, a setup error)

def gpu_communicator(mpi: Any) -> Any:
    """One GPU per MPI rank: select this rank's GPU (its rank on this machine, modulo the GPUs
    it has) and build an :class:`~refnorm.sync.nccl.NCCLCommunicator` over the ranks of
    ``mpi`` (an :class:`~refnorm.sync.comm.MPICommunicator`), rank 0's NCCL id broadcast
    over MPI."""
    import cupy

    from refnorm.sync.nccl import NCCLCommunicator

    local = local_rank(default=mpi.rank)
    cupy.cuda.Device(local % cupy.cuda.runtime.getDeviceCount()).use()
    unique_id = mpi.comm.bcast(NCCLCommunicator.unique_id() if mpi.rank == 0 else None, root=0)
    return NCCLCommunicator.from_unique_id(mpi.size, unique_id, mpi.rank,
                                           timeout=mpi.timeout)


# -- samples ----------------------------------------------------------------------------------


# normalizers whose statistics span each device's micro-batch (a shard), not one sample and
# not every device's
PER_DEVICE_NORMS = ("bn", "sn")


def statistic_parts(norm: str | None, devices: int, accumulation: int) -> int:
    """Into how many parts a step's batch statistics divide its samples, each part needing
    :data:`MIN_SHARD` of them: the ``pieces`` of :func:`epoch_steps`.

    Per-device BN and SN (and a normalizer of one's own, ``norm=None``) take statistics over
    every shard, ``devices x accumulation`` of them; SyncBN and SyncSN over each micro-batch
    of all devices together, ``accumulation``; the others over one sample, and their
    micro-batches are asked for two samples each too, as a one-device run's would be.

    Runs that train the same samples the same way therefore keep or leave out the same last
    step: SyncBN on P devices x b and BN on one device x (P b) (``accumulation`` each), GN on
    either, per-device BN on P devices and BN on one device accumulating P micro-batches.
    A kept last step may then give a device of a synchronized or per-sample run a shard of
    one sample, or none.
    """
    if norm in SYNC_NORMS or (norm is not None and norm not in PER_DEVICE_NORMS):
        return accumulation
    return devices * accumulation


def epoch_steps(samples: int, global_batch: int, pieces: int) -> list[int]:
    """The number of samples of each optimizer step of an epoch over ``samples`` samples.

    Full steps of ``global_batch`` samples, then the rest as one smaller step when it gives
    each of the step's ``pieces`` (:func:`statistic_parts`: the parts its batch statistics
    are taken over) at least :data:`MIN_SHARD` samples (a statistic needs two values; a
    smaller rest is left out, as a ``drop_last`` data loader would).
    """
    full, rest = divmod(samples, global_batch)
    return [global_batch] * full + ([rest] if rest >= MIN_SHARD * pieces else [])


def step_pieces(size: int, accumulation: int, devices: int) -> list[list[slice]]:
    """Where each device's part of each micro-batch lies in a step of ``size`` samples.

    Returns ``pieces[a][p]``, the slice of the step's samples that device ``p`` takes in
    micro-batch ``a``: the step is split into ``accumulation`` micro-batches, each into
    ``devices`` contiguous shards, both as evenly as possible (sizes differ by one at most).
    A run on one device with accumulation P and a run on P devices therefore see the same
    pieces, and so do P devices x b and one device x (P b) in each micro-batch.
    """
    micro = _even_bounds(0, size, accumulation)
    return [[slice(a, b) for a, b in _even_bounds(start, stop, devices)] for start, stop in micro]


def _even_bounds(start: int, stop: int, parts: int) -> list[tuple[int, int]]:
    edges = [start + (stop - start) * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def shard(n: int, rank: int, size: int) -> slice:
    """Device ``rank``'s contiguous part of ``n`` items (an evaluation set)."""
    a, b = _even_bounds(0, n, size)[rank]
    return slice(a, b)


# -- agreement --------------------------------------------------------------------------------


def agree(comm: Any, row: Sequence[float], *, what: str) -> np.ndarray:
    """Every device's ``row`` on every device: a (P, len(row)) float64 matrix, one all-reduce.

    Each device fills its own row of a zero matrix; the sum over devices is every row.
    """
    local = np.zeros((comm.size, len(row)))
    local[comm.rank] = row
    (everyone,) = allreduce(comm, [local], op=f"agree ({what})")
    return np.asarray(everyone)


def share_text(comm: Any, text: str | None, *, source: int, what: str) -> str:
    """The text of device ``source`` (at most :data:`MESSAGE_BYTES` bytes of it) on every
    device; the others pass None."""
    buffer = np.zeros(MESSAGE_BYTES)
    if comm.rank == source and text is not None:
        data = text.encode()[:MESSAGE_BYTES]
        buffer[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    (summed,) = allreduce(comm, [buffer], op=f"share ({what})")
    codes = np.asarray(summed).astype(np.uint8)
    return codes[:int(np.flatnonzero(codes)[-1]) + 1].tobytes().decode(errors="replace") \
        if codes.any() else ""


def share_record(comm: Any, record: dict | None, *, source: int, what: str) -> dict:
    """A small JSON-able record of device ``source`` on every device; a record too long for
    :data:`MESSAGE_BYTES` arrives with its longest texts shortened (:func:`fit_record`)."""
    text = None if record is None else fit_record(record)
    return json.loads(share_text(comm, text, source=source, what=what) or "{}")


def fit_record(record: dict, limit: int = MESSAGE_BYTES) -> str:
    """``record`` as JSON of at most ``limit`` bytes: while it is longer, its longest string
    value keeps its beginning and ends in "...". (JSON cut at a byte count would not parse:
    one device's long error message, a long path in it, would break every device's.)"""
    def dumps(r: dict) -> str:
        return json.dumps(r)  # escaped to ASCII: one byte per character

    text = dumps(record)
    while len(text) > limit:
        texts = [k for k, v in record.items() if isinstance(v, str) and len(v) > 3]
        if not texts:
            raise ValueError(f"a record of {len(text)} bytes does not fit in {limit}: {text!r}")
        key = max(texts, key=lambda k: len(record[k]))
        value = record[key]
        keep, most = 0, len(value) - 4  # the most characters kept that fit, by bisection
        while keep < most:
            mid = (keep + most + 1) // 2
            if len(dumps({**record, key: value[:mid] + "..."})) <= limit:
                keep = mid
            else:
                most = mid - 1
        record = {**record, key: value[:keep] + "..."}
        text = dumps(record)
    return text


# -- one model --------------------------------------------------------------------------------


def average_states(comm: Any, layers: Iterable[Any]) -> None:
    """Replace every floating-point state array (running statistics) of every layer by its
    mean over the devices: one all-reduce. Other state (flags, counters) must already agree
    (:func:`check_same_model` says so if it does not)."""
    layers = list(layers)
    keys = [(i, k) for i, layer in enumerate(layers) for k in sorted(layer.state)
            if array_namespace(layer.state[k]).isdtype(layer.state[k].dtype, "real floating")]
    if not keys:
        return
    summed = allreduce(comm, [layers[i].state[k] for i, k in keys], op="average states")
    for (i, k), total in zip(keys, summed, strict=True):
        old = layers[i].state[k]
        xp = array_namespace(old)
        layers[i].state = {**layers[i].state, k: xp.astype(total / comm.size, old.dtype)}


class Diverged(RuntimeError):
    """The devices no longer hold the same model (a bug: they must stay identical)."""


def check_same_model(comm: Any, named: Iterable[tuple[str, Array]], *, where: str) -> None:
    """Compare a checksum (CRC-32 of the bytes) of every named array across the devices.

    Raises
    ------
    Diverged
        On every device, naming the first array whose checksums differ and the devices.
    """
    names, sums = [], []
    for name, a in named:
        names.append(name)
        sums.append(float(zlib.crc32(np.ascontiguousarray(to_numpy(a)).tobytes())))
    table = agree(comm, sums, what="checksums")  # (P, arrays); CRC-32 values are exact
    for j, name in enumerate(names):
        column = table[:, j]
        if np.any(column != column[0]):
            differ = [p for p in range(comm.size) if column[p] != column[0]]
            raise Diverged(f"the devices no longer hold the same model {where}: {name} differs "
                           f"between device 0 and device{'s' if len(differ) > 1 else ''} "
                           f"{', '.join(map(str, differ))}")
