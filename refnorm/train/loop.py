"""The training loop: set up or resume, then epochs of optimizer steps, each evaluated and saved.

One loop serves one device and P data-parallel devices (:mod:`refnorm.train.parallel`): P
simulated devices in this process (``TrainConfig.devices``), or this process as one rank of
a group (``train(config, comm=...)``: MPI under ``mpiexec``, NCCL on GPUs). Each device runs
:func:`run_device` on its own copy of the model; device 0 writes the checkpoints, metrics
and plots.

Everything is seeded: the order of the training set in epoch e is
``default_rng([seed, e]).permutation``, and so are the batches the SN batch average sees;
parameters start from ``seed`` (the same on every device). A run resumed from a checkpoint
therefore ends with bitwise the same parameters as an uninterrupted one.

The loop reads in three levels: :func:`train` (set up or resume, then epochs),
:func:`run_epoch` (the steps of one epoch, evaluation, checkpoint) and :func:`run_step` (one
optimizer update: this device's forward and backward, the devices' decision, the update).
What a run promises, and where it is kept:

- *Interruptions take effect at a step boundary* (:mod:`refnorm.train.interrupt`): inside
  the steps, evaluations and saves SIGINT and SIGTERM only set a flag. A signal received
  before a step starts stops the run before it; one received during a step stops it after
  the step. The run saves a checkpoint there and returns ``interrupted``. A
  ``KeyboardInterrupt`` raised inside a step (a run outside the main thread, a hook) undoes
  the step instead.
- *Every device stops at the same boundary, with the same message*: each step ends with one
  all-reduce of every device's status (:func:`~refnorm.train.parallel.agree`).
- *Nothing non-finite is kept* (:mod:`refnorm.train.finite`); a checkpoint is written only
  after the check, and :func:`~refnorm.train.checkpoint.save_checkpoint` checks again.
- *One writer per output folder, checked first* (:mod:`refnorm.train.folder`): the folder is
  created, locked and tried with a write as large as the run's outputs before any data is
  trained on; every file is written atomically through a uniquely named temporary file.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import importlib
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from refnorm.backend import Array, to_numpy
from refnorm.dispatch import get_path
from refnorm.nn import softmax_cross_entropy, softmax_cross_entropy_backward
from refnorm.sync.comm import InProcessGroup, MeteredCommunicator, SingleProcess, check_comm
from refnorm.sync.data_parallel import allreduce_gradients
from refnorm.sync.headers import allreduce
from refnorm.train.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    Saved,
    checkpoint_arrays,
    config_dict,
    read_checkpoint,
    restore,
    save_checkpoint,
)
from refnorm.train.config import TrainConfig
from refnorm.train.data import Dataset, fingerprint, load, standardize
from refnorm.train.evaluate import data_dependent_init, evaluate
from refnorm.train.finite import (
    NonFinite,
    check_finite,
    named_arrays,
    named_gradients,
    named_params,
    named_states,
)
from refnorm.train.folder import (
    FolderLock,
    OutputFolderError,
    check_room,
    new_folders,
    prepare_folder,
    remove_if_empty,
    remove_stale_temporaries,
    warn,
)
from refnorm.train.interrupt import Signals, signal_name
from refnorm.train.model import ConvNet, on_model
from refnorm.train.optim import SGD, learning_rate
from refnorm.train.outputs import Progress, plotting_problem, write_metrics
from refnorm.train.parallel import (
    Diverged,
    agree,
    average_states,
    check_same_model,
    epoch_steps,
    share_record,
    statistic_parts,
    step_pieces,
)
from refnorm.train.position import Position, Totals

OUTPUTS = (CHECKPOINT, "metrics.json", "metrics.csv", "curves.png", ".room-check")
# Room the outputs beside the checkpoint need: metrics.json, metrics.csv and curves.png of a
# long run (measured: curves.png of 100 epochs is ~40 KiB, the metrics ~60 KiB).
OUTPUTS_BYTES = 256 * 1024
SIGINT = int(signal.SIGINT)


@dataclass
class Result:
    """What :func:`train` returns (device 0's, in a data-parallel run).

    Attributes
    ----------
    interrupted : bool
        The run stopped early on a signal (or ``KeyboardInterrupt``) at a step boundary,
        where a checkpoint was saved (with an output folder).
    signal : int or None
        The signal that stopped it (``signal.SIGINT`` also for a ``KeyboardInterrupt``).
    """

    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    model: ConvNet | None = None
    interrupted: bool = False
    signal: int | None = None


@dataclass
class Run:
    """What one device's run works with, built by :func:`run_device`.

    ``folder`` is the output folder (known to every device, for messages; only device 0
    writes); ``saved`` the position of the checkpoint there that this run wrote or resumed
    from (None while there is none); ``steps`` the sizes of an epoch's optimizer steps;
    ``pending`` a ``KeyboardInterrupt`` raised between steps (in a hook), acted on at the
    next decision; ``stop_after`` a signal received during the current step (the devices
    stop after it).
    """

    config: TrainConfig
    data: Dataset
    model: ConvNet
    opt: SGD
    comm: Any
    folder: Path | None
    bar: Progress
    signals: Signals
    steps: list[int]
    on_step: Callable[[int, int, ConvNet], None] | None = None
    saved: Position | None = None
    pending: int | None = None
    stop_after: int | None = None
    fingerprint: str | None = None  # of data, recorded in the checkpoints

    @property
    def writer(self) -> bool:
        return self.folder is not None and self.comm.rank == 0

    def learning_rate(self, epoch: int, step: int) -> float:
        """The learning rate of optimizer step ``step`` of epoch ``epoch``."""
        c, steps = self.config, len(self.steps)
        return learning_rate(c.schedule, c.lr, epoch * steps + step, steps * c.epochs)


class _Interrupted(Exception):
    """A signal or Ctrl-C; ``position`` is the step boundary to save."""

    def __init__(self, position: Position, signum: int) -> None:
        super().__init__(position)
        self.position, self.signum = position, signum


def build_model(config: TrainConfig, data: Dataset, *, comm: Any = None,
                norm_layer: Callable[..., Any] | None = None) -> ConvNet:
    """The run's model, its arrays in numpy (``device="cpu"``) or CuPy (``"gpu"``), its layers
    on the fast path unless the process chose another (``--path``, ``REFNORM_PATH``); the
    synchronized normalizers synchronize over ``comm``; ``norm_layer`` builds the normalizers
    instead of ``config.norm`` (:class:`~refnorm.train.model.ConvNet`); no gradient with respect
    to the images (``input_grad=False``: the first convolution skips it)."""
    options: dict[str, Any] = {}
    if config.norm in ("sn", "syncsn"):
        options["inference"] = config.sn_inference
    if config.synchronized and comm is not None:
        options["comm"] = comm
    xp = importlib.import_module("cupy") if config.device == "gpu" else np
    return ConvNet(in_channels=data.x_train.shape[1], num_classes=data.num_classes,
                   norm=config.norm, weight=config.weight, widths=config.widths,
                   num_groups=config.num_groups, norm_options=options,
                   norm_layer=norm_layer, seed=config.seed,
                   dtype=np.dtype(config.dtype).type, xp=xp, path=get_path(default="fast"),
                   input_grad=False)


def prepare_data(config: TrainConfig, *, remedy: str = "give at most that many") -> Dataset:
    """The standardized data set, cut to a random ``train_subset`` where one is set (drawn
    from the seed). ``remedy`` ends the error of a subset larger than the training set."""
    data = standardize(load(config.data))
    if config.train_subset is not None:
        if config.train_subset > len(data.y_train):
            raise ValueError(f"train_subset is {config.train_subset}, but {config.data} has "
                             f"{len(data.y_train)} training samples: {remedy}")
        keep = np.random.default_rng([config.seed, 2**20]).permutation(len(data.y_train))
        keep = np.sort(keep[:config.train_subset])
        data = dataclasses.replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])
    return data


def train(
    config: TrainConfig,
    *,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, int, ConvNet], None] | None = None,
    data: Dataset | None = None,
    comm: Any = None,
    overwrite: bool = False,
    norm_layer: Callable[..., Any] | None = None,
) -> Result:
    """Train ``config``; write metrics, curves and checkpoints to ``out`` if given.

    Parameters
    ----------
    config : TrainConfig
    out : directory, optional
        Where ``metrics.csv``, ``metrics.json``, ``curves.png`` and ``checkpoint.npz`` go.
        The run holds its lock (``train.lock``) until it returns. A run that returns or
        raises without having written anything (stopped before its first checkpoint)
        removes the folders it created for ``out``.
    resume : bool
        Continue from ``out/checkpoint.npz`` (which must exist and match ``config``).
    progress : bool
        Print a progress bar to stderr.
    on_step : callable, optional
        ``on_step(epoch, step, model)`` after every optimizer step, on every device (tests
        use it to interrupt a run or to break a model).
    data : Dataset, optional
        Use these arrays instead of loading ``config.data`` (they are used as given).
    overwrite : bool
        Without ``resume``, replace a checkpoint already in ``out`` (else the run is refused,
        so that no run's work is lost by a mistyped folder).
    comm : communicator, optional
        This process is one device of ``comm`` (:class:`~refnorm.sync.comm.MPICommunicator`,
        :class:`~refnorm.sync.nccl.NCCLCommunicator`), whose size must be
        ``config.devices``. Without it, ``config.devices`` devices run in this process
        (:class:`~refnorm.sync.comm.InProcessGroup`, one thread each).
    norm_layer : callable, optional
        Builds every block's normalizer in place of ``config.norm``'s, on every device:
        ``norm_layer(width, dtype=..., xp=..., device=...)`` returns a layer (one made by
        :func:`refnorm.layer.from_functions`, for instance); see
        :class:`~refnorm.train.model.ConvNet`. ``config.norm`` still names the method (it
        must not be ``"none"``), and the checkpoint keeps the layer's arrays under its names.

    Returns
    -------
    Result; ``interrupted`` is True after SIGINT, SIGTERM or Ctrl-C (a checkpoint was saved
    at the step boundary), ``signal`` says which.

    Raises
    ------
    TypeError
        Before training, if ``config``, ``data`` or ``on_step`` is not of its kind, or ``comm``
        is not a communicator (:func:`~refnorm.sync.comm.check_comm`).
    NonFinite
        If a NaN or an infinity appeared; the message names the array (and the device) and
        says which checkpoint is kept, or that none was written.
    OutputFolderError
        Before training, if ``out`` is a file, under a file, unwritable, full, locked by a
        live run, or holds a checkpoint while neither ``resume`` nor ``overwrite`` is given;
        during it, if a write fails (the previous checkpoint is kept).
    CheckpointError
        If ``resume`` finds no usable checkpoint for this configuration.
    ValueError
        If the data cannot train this network (too few samples for one update, an empty test
        set, images too small for its pooling), ``comm`` has another size, or ``norm_layer``
        is not callable or comes with ``config.norm="none"``.
    Interrupted
        If a signal arrived before the first step (loading the data, reading a checkpoint).
    ImportError
        Before training, if ``out`` is given and matplotlib (the train extra), which draws
        ``curves.png``, cannot be imported.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig; got {type(config).__name__}")
    if data is not None and not isinstance(data, Dataset):
        raise TypeError(f"data must be a refnorm.train.data.Dataset; got {type(data).__name__}")
    if on_step is not None and not callable(on_step):
        raise TypeError(f"on_step must be callable; got {type(on_step).__name__}")
    if norm_layer is not None and (config.norm == "none" or not callable(norm_layer)):
        raise ValueError("norm_layer must be a function that builds each block's normalizer, "
                         f"with config.norm naming the method; got {norm_layer!r} with "
                         f"norm={config.norm!r}")
    if comm is not None:
        check_comm(comm)
    if comm is not None and comm.size != config.devices:
        raise ValueError(f"config.devices is {config.devices} but the communicator has "
                         f"{comm.size} devices; they must agree")
    if out is not None and (problem := plotting_problem("curves.png")) is not None:
        raise ImportError(problem)
    group = SingleProcess() if comm is None else comm  # the devices that set up together
    folder = None if out is None else Path(out)
    with Signals() as signals, ExitStack() as stack:
        # Loading the data and reading a checkpoint stay interruptible (a signal raises
        # Interrupted there); from the first step on, signals wait for a step boundary. The
        # data comes first, so that a run refused for its data leaves no folder behind.
        data = together(group, "the data", lambda: _usable_data(config, data))
        digest = fingerprint(data)
        if group.size > 1:
            _same_run_everywhere(group, config, digest)
        with signals.deferred():  # creating and locking the folder is not left half-done
            together(group, "the output folder", lambda: _open_folder(
                folder, stack, config, resume=resume, overwrite=overwrite,
                writer=group.rank == 0))
        signals.raise_if_received()
        saved = None
        if resume:
            saved = together(group, "the checkpoint", lambda: _read(folder))
        setup = _Setup(config, data, folder, saved, signals, progress, on_step, norm_layer,
                       digest)
        with signals.deferred():
            if comm is None and config.devices > 1:
                return InProcessGroup.run(config.devices, run_device,
                                          [setup] * config.devices)[0]
            return run_device(group, setup)


def _same_run_everywhere(comm: Any, config: TrainConfig, digest: str) -> None:
    """Refuse, before anything is written, a run whose processes were given other options
    (another command line on one rank) or read other data (another file at the same
    ``--data`` path on another machine): each would train a model of its own, averaging
    gradients that do not belong together. One all-reduce of 48 bits of a digest of each
    rank's options (its data's location and its device left out: they may differ between
    machines) and 48 bits of its data's SHA-256 (:func:`refnorm.train.data.fingerprint`).

    Raises
    ------
    ValueError
        On every rank alike, naming the first rank that differs from rank 0 and in what.
    """
    import hashlib
    import json

    options = {k: v for k, v in config_dict(config).items() if k not in ("data", "device")}
    words = (hashlib.sha256(json.dumps(options, sort_keys=True).encode()).digest()[:6],
             bytes.fromhex(digest)[:6])
    table = agree(comm, [float(int.from_bytes(w, "big")) for w in words],  # exact in float64
                  what="the run's options and data")
    for column, what, why in (
            (0, "options", "its command line differs"),
            (1, "data", "the data path holds other arrays there: every machine needs the same "
                        "files")):
        other = np.flatnonzero(table[:, column] != table[0, column])
        if other.size:
            raise ValueError(f"rank {int(other[0])} was given other {what} than rank 0 "
                             f"({why}); every rank must run the same training")


@dataclass(frozen=True)
class _Setup:
    """What every device starts from (read once per process)."""

    config: TrainConfig
    data: Dataset
    folder: Path | None
    saved: Saved | None
    signals: Signals
    progress: bool
    on_step: Callable[[int, int, ConvNet], None] | None
    norm_layer: Callable[..., Any] | None = None
    fingerprint: str | None = None  # of data (refnorm.train.data.fingerprint)


def _open_folder(folder: Path | None, stack: ExitStack, config: TrainConfig, *, resume: bool,
                 overwrite: bool, writer: bool) -> None:
    if folder is None:
        return
    if resume and not folder.is_dir():
        raise CheckpointError(f"no checkpoint to resume from: {folder} is not a folder")
    if writer:
        made = new_folders(folder)
        prepare_folder(folder)
        # Called after the lock is let go: a run that wrote nothing leaves no folder behind.
        stack.callback(remove_if_empty, made)
        stack.enter_context(FolderLock(folder, notice=warn))
        remove_stale_temporaries(folder, OUTPUTS)
        for name in OUTPUTS:  # a folder where the run writes a file: refused now, not later
            if (folder / name).is_dir():
                raise OutputFolderError(f"{folder / name} is a folder, where the run writes its "
                                        f"{name} file: remove it or choose another --out")
        if not resume and not overwrite and (folder / CHECKPOINT).exists():
            raise OutputFolderError(_occupied(folder, config))


def _occupied(folder: Path, config: TrainConfig) -> str:
    """Why a new run will not replace the checkpoint in ``folder``, in one sentence."""
    try:
        saved = read_checkpoint(folder / CHECKPOINT).meta
        theirs = saved["config"]
        mine = config_dict(config)
        differ = [f"{k} {theirs.get(k)!r} there, {mine[k]!r} here" for k in mine
                  if theirs.get(k) != mine[k] and k != "device"]
        at = f"epoch {saved['epoch']}, step {saved['step']}"
    except (CheckpointError, KeyError, TypeError, AttributeError) as exc:
        return (f"{folder} holds a {CHECKPOINT} that is not a usable checkpoint ({exc}); "
                "choose another --out, or replace it with --overwrite")
    if differ:
        return (f"{folder} holds the checkpoint ({at}) of another configuration "
                f"({'; '.join(differ)}); choose another --out, or replace it with --overwrite")
    return (f"{folder} holds a checkpoint of this configuration at {at}: continue it with "
            "--resume, or start again with --overwrite")


def _usable_data(config: TrainConfig, data: Dataset | None) -> Dataset:
    data = prepare_data(config) if data is None else data
    check_data(config, data)
    return data


def _read(folder: Path | None) -> Saved:
    if folder is None:
        raise CheckpointError("resume needs the output directory of the run to continue")
    return read_checkpoint(folder / CHECKPOINT)


def run_device(comm: Any, setup: _Setup) -> Result:
    """One device's run: its model, its start (fresh or resumed), its epochs."""
    config, data = setup.config, setup.data
    if comm.size > 1:
        comm = MeteredCommunicator(comm)
    model = build_model(config, data, comm=comm, norm_layer=setup.norm_layer)
    opt = SGD(model, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    bar = Progress(enabled=setup.progress and comm.rank == 0)
    norm = None if setup.norm_layer is not None else config.norm
    steps = epoch_steps(len(data.y_train), config.update_size,
                        statistic_parts(norm, config.devices, config.accumulation))
    run = Run(config, data, model, opt, comm, setup.folder, bar, setup.signals, steps,
              setup.on_step, fingerprint=setup.fingerprint)

    def room() -> None:  # device 0 tries a write as large as the run's outputs
        if run.writer and setup.folder is not None:
            check_room(setup.folder, checkpoint_bytes(model, opt) + OUTPUTS_BYTES)

    together(comm, "room for the outputs", room)
    if setup.saved is None:
        data_dependent_init(model, data, config)
        position = Position()
    else:
        saved = setup.saved
        run.saved = position = together(comm, "restoring the checkpoint", lambda: restore(
            saved, config, model, opt, steps_per_epoch=len(steps), device=comm.rank,
            data=setup.fingerprint))
    into = f" -> {setup.folder}" if setup.folder is not None else ""
    bar.start(f"training {config.describe()}{into}" if setup.saved is None else
              f"resuming {config.describe()} {_where(position)}{into}")  # as a stop says
    return _run_epochs(run, position)


def _run_epochs(run: Run, position: Position) -> Result:
    """The epochs from ``position`` on, the final metrics; a stop saves at its boundary."""
    try:
        while position.epoch < run.config.epochs:
            position = run_epoch(run, position)
        if position.history:
            history = list(position.history)
            _write(run, "the metrics", lambda out: write_metrics(
                out, history, curves=run.config.describe()))
    except _Interrupted as stop:
        return _interrupt(run, stop.position, stop.signum)
    except NonFinite as exc:
        raise exc.moved(kept=_kept(run)) from None
    return Result(run.config, list(position.history), run.model)


def check_data(config: TrainConfig, data: Dataset) -> None:
    """Refuse data this network cannot train on, before training.

    Raises
    ------
    ValueError
        If the training set is smaller than one update, the test set is empty, a label is
        not a class index (``0 .. num_classes - 1``), the test images have another shape
        than the training images, or the images are too small for
        the network's max-pools (each block but the last halves the size), or so small
        that a block's normalizer would compute a statistic over a single value, or SN's
        batch average would have no batch (``average_samples`` below one update).
    """
    if len(data.y_train) < config.update_size:
        what = "devices * batch_size * accumulation" if config.devices > 1 else (
            "batch_size * accumulation")
        raise ValueError(f"one update needs {what} = {config.update_size} samples; the "
                         f"training set has {len(data.y_train)}")
    if len(data.y_test) == 0:
        raise ValueError(f"the test set of {data.name} is empty: every epoch is evaluated on "
                         "it, so it needs at least one sample")
    for split, y in (("training", data.y_train), ("test", data.y_test)):
        if y.size and not 0 <= y.min() <= y.max() < data.num_classes:
            raise ValueError(f"the {split} labels of {data.name} must be class indices in "
                             f"0..{data.num_classes - 1}; got values in {y.min()}..{y.max()}")
    if data.x_test.shape[1:] != data.x_train.shape[1:]:
        raise ValueError(f"test images are {data.x_test.shape[1:]} (C, H, W) but training "
                         f"images are {data.x_train.shape[1:]}")
    pools = len(config.widths) - 1
    smallest = 2 ** pools
    if min(data.x_train.shape[2:]) < smallest:
        h, w = data.x_train.shape[2:]
        raise ValueError(f"images of {h}x{w} are too small for {len(config.widths)} blocks: "
                         f"their {pools} 2x2 max-pools need at least {smallest}x{smallest}")
    _check_statistics(config, data.x_train.shape[2:])
    averaged = min(config.average_samples, len(data.y_train))
    if (config.norm in ("sn", "syncsn") and config.sn_inference == "batch_average"
            and averaged < config.update_size):
        raise ValueError(
            f"SN's batch average pools batches of one update (devices x batch_size x "
            f"accumulation = {config.update_size} samples) from average_samples="
            f"{config.average_samples} of the training samples: not one batch; use a smaller "
            f"--batch-size, --sn-inference moving_average, or a larger average_samples")


def _check_statistics(config: TrainConfig, hw: tuple[int, ...]) -> None:
    """Refuse a run whose normalizer would see one value per statistic in some block (its
    variance would be 0 and the run would stop at its first step).

    Block ``i`` normalizes maps of ``H >> i`` x ``W >> i`` (each 2x2 max-pool before it halves
    them, rounding down); a statistic of IN (and of SN's IN scope) spans one sample's map of
    one channel, GN's a group of C/G channels of one sample, LN's all C channels of one
    sample, BN's one channel's maps of a device's micro-batch (SyncBN's: of every device's).
    """
    H, W = hw
    b, P, G = config.batch_size, config.devices, config.num_groups
    scopes = {  # norm -> (maps per statistic for a block of c channels, what they are)
        "in": (lambda c: 1, "one sample's map of one channel"),
        "sn": (lambda c: 1, "one sample's map of one channel (its IN scope)"),
        "syncsn": (lambda c: 1, "one sample's map of one channel (its IN scope)"),
        "ln": (lambda c: c, "one sample's maps of all its channels"),
        "gn": (lambda c: c // G, "one sample's maps of a group of C/G channels"),
        "bn": (lambda c: b, f"the maps of one channel over batch_size={b} sample(s)"),
        "syncbn": (lambda c: b * P, f"the maps of one channel over devices x batch_size = "
                                    f"{b * P} sample(s)")}
    if config.norm not in scopes:
        return
    maps, scope = scopes[config.norm]
    for i in reversed(range(len(config.widths))):  # the smallest maps first
        h, w = H >> i, W >> i
        if maps(config.widths[i]) * h * w > 1:
            continue
        larger = " or a --batch-size above 1" if config.norm in ("bn", "syncbn") else ""
        raise ValueError(f"images of {H}x{W} leave {h}x{w} maps at block {i + 1}, where --norm "
                         f"{config.norm} computes each statistic over {scope}: one value, and a "
                         f"statistic needs more than one; give images of at least "
                         f"{2 << i}x{2 << i}{larger}")


def checkpoint_bytes(model: ConvNet, opt: SGD) -> int:
    """About the size of a checkpoint of ``model``: its arrays, plus 64 KiB for the archive's
    headers and the metadata (a long run's history)."""
    arrays = checkpoint_arrays(model, opt).values()
    return sum(to_numpy(a).nbytes for a in arrays) + 64 * 1024


# -- what every device does together ----------------------------------------------------------

T = TypeVar("T")
# Errors a device reports to the others instead of leaving them waiting: the ones a run
# expects (bad data, a bad checkpoint, a full disk, a non-finite value, divergence).
_SHARED: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (ValueError, CheckpointError, OutputFolderError, Diverged)}


def together(comm: Any, what: str, work: Callable[[], T]) -> T:
    """``work()`` on this device; if it failed on any device, the same error on every device.

    One all-reduce of a flag per device, and only after a failure one more for its
    message: every device raises the error of the first device that failed, naming it (the
    class kept where it is one of the errors a run expects; an ``OSError`` becomes an
    :class:`OutputFolderError`), so every device stops the same way. An error every device
    found is raised as it is.
    """
    try:
        result, problem = work(), None
    except (ValueError, OSError, OutputFolderError, NonFinite, Diverged) as exc:
        result, problem = None, exc
    if comm.size == 1:
        if problem is not None:
            raise problem
        return result  # type: ignore[return-value]
    failed = np.flatnonzero(agree(comm, [problem is not None], what=what)[:, 0])
    if failed.size == 0:
        return result  # type: ignore[return-value]
    if failed.size == comm.size and problem is not None:
        raise problem  # every device found it (the same model, the same sums): its own words
    source = int(failed[0])
    record = share_record(comm, error_record(problem) if comm.rank == source else None,
                          source=source, what=what)
    raise error_from_record(record, source) from None


def error_record(problem: BaseException | None) -> dict:
    """A run's error as a small JSON-able record, which :func:`error_from_record` raises again
    in another process (another rank, the study that launched the run under ``mpiexec``)."""
    if isinstance(problem, NonFinite):
        return {"kind": "NonFinite", "what": problem.what, "value": problem.value,
                "where": problem.where, "kept": problem.kept, "reason": problem.reason}
    kind = type(problem).__name__ if type(problem).__name__ in _SHARED else (
        "OutputFolderError" if isinstance(problem, OSError) else "ValueError")
    return {"kind": kind, "message": str(problem)}


def error_from_record(record: dict, device: int | None = None) -> Exception:
    """The error :func:`error_record` recorded (on ``device``, named in it where given)."""
    if record.get("kind") == "NonFinite":
        on = "" if device is None else f" on device {device}"
        return NonFinite(f"{record['what']}{on}", float(record["value"]),
                         where=record["where"], kept=record["kept"], reason=record["reason"])
    prefix = "" if device is None else f"device {device}: "
    return _SHARED.get(record.get("kind", ""), ValueError)(
        f"{prefix}{record.get('message', 'failed')}")


# -- epochs and steps ---------------------------------------------------------------------------


def run_epoch(run: Run, position: Position) -> Position:
    """Finish epoch ``position.epoch``: its remaining steps, its evaluation, its checkpoint.

    Returns the position at the start of the next epoch. ``_Interrupted`` carries the step
    boundary to save (an evaluation not yet run is run on resume).
    """
    config, comm = run.config, run.comm
    order = np.random.default_rng([config.seed, position.epoch]).permutation(
        len(run.data.y_train))
    started, first_step = time.perf_counter(), position.step
    if isinstance(comm, MeteredCommunicator):
        comm.clear()
    while position.step < len(run.steps):
        first = sum(run.steps[:position.step])
        picked = order[first:first + run.steps[position.step]]
        position = run_step(run, position, picked)
        try:
            run.bar.update(position, config.epochs, len(run.steps))
            if run.on_step is not None:
                run.on_step(position.epoch, position.step, run.model)
        except KeyboardInterrupt as exc:  # between steps: stop at the next decision
            run.pending = getattr(exc, "signum", SIGINT)
    cost = comm.report(seconds=time.perf_counter() - started,
                       steps=position.step - first_step) if isinstance(
        comm, MeteredCommunicator) else {}
    _decide(run, position, before_the="evaluation")
    if comm.size > 1 and not config.synchronized:
        average_states(comm, run.model.layers())
    with _boundary(position):  # an evaluation not yet run is run on resume
        row = together(comm, "the evaluation", lambda: evaluate(
            run.model, run.opt, run.data, config, position=position,
            lr=run.learning_rate(position.epoch, len(run.steps) - 1),
            seconds=time.perf_counter() - started, comm=comm))
    row.update(cost)
    position = Position(position.epoch + 1, 0, Totals(), (*position.history, row))
    if comm.size > 1:
        together(comm, "the model check", lambda: check_same_model(
            comm, named_arrays(run.model, run.opt), where=f"after epoch {position.epoch}"))
    run.bar.epoch_done(row)
    if run.folder is not None:
        history = list(position.history)
        with _boundary(position):  # a failed save is redone at the stop
            _save(run, position)
            _write(run, "the metrics", lambda out: write_metrics(out, history))
    return position


@contextmanager
def _boundary(position: Position) -> Iterator[None]:
    """A ``KeyboardInterrupt`` raised inside (a run outside the main thread, a hook) stops the
    run at ``position``, the last step boundary. (On several devices, only where every
    device raises it: one device's would leave the others in a collective, which then fails
    with a message naming where each device was.)"""
    try:
        yield
    except KeyboardInterrupt as exc:
        raise _Interrupted(position, getattr(exc, "signum", SIGINT)) from None


def run_step(run: Run, position: Position, picked: np.ndarray) -> Position:
    """One optimizer step over the samples ``picked`` (indices into the training set).

    This device's forward and backward on its pieces of them (:func:`local_step`), one
    decision of all devices (:func:`_decide`), then the gradients summed over the devices
    and the same update everywhere. Returns the position after the step.
    """
    config, comm, model = run.config, run.comm, run.model
    before = run.signals.received or run.pending
    states = [copy.deepcopy(layer.state) for layer in model.layers()]
    pieces = [micro[comm.rank] for micro in step_pieces(len(picked), config.accumulation,
                                                         comm.size)]
    x, y = run.data.x_train, run.data.y_train
    batches = [(x[picked[p]], y[picked[p]]) for p in pieces]
    undone = False
    try:
        grads, totals, problem = local_step(model, batches, total=len(picked))
    except KeyboardInterrupt:  # raised where it landed (no handler): undo this step
        grads, totals, problem, undone = {}, Totals(), None, True
    except ValueError as exc:
        # The data and the network were checked before training, and earlier steps ran: a
        # layer refusing its numbers now (a variance overflowing float32) is divergence.
        grads, totals = {}, Totals()
        problem = NonFinite("a layer's statistics", math.inf, reason=str(exc))
    where = f"in step {position.step + 1} of epoch {position.epoch + 1}"
    try:
        totals = _decide(run, position, before_the=None, undone=undone, before=before,
                         problem=problem, totals=totals)
    except (_Interrupted, NonFinite) as stop:
        for layer, state in zip(model.layers(), states, strict=True):
            layer.state = state
            layer.reset()
        if isinstance(stop, NonFinite):
            raise stop.moved(where=where) from None
        raise
    _update(run, grads, run.learning_rate(position.epoch, position.step), where=where)
    after = dataclasses.replace(position, step=position.step + 1,
                                totals=position.totals + totals)
    if run.stop_after is not None:
        raise _Interrupted(after, run.stop_after)
    return after


def local_step(model: ConvNet, batches: list[tuple[Any, Any]], *,
               total: int) -> tuple[dict[str, Array], Totals, NonFinite | None]:
    """Forward and backward over this device's micro-batches; their summed gradient.

    Each micro-batch's loss is the sum of its samples' cross-entropies divided by ``total``,
    the samples of the whole step over every micro-batch and device: the gradients summed
    over micro-batches (and devices) are then those of the step's mean loss, whatever the
    sizes of the pieces. A piece may be empty (a short last step of a synchronized or
    per-sample normalizer, :func:`~refnorm.train.parallel.statistic_parts`): it adds no loss
    and no gradient, and runs the forward and backward for their collectives.

    Returns
    -------
    grads : dict of key to array (the parameter's shape), keyed as
        :meth:`ConvNet.named_params`
    totals : Totals of this device's samples
    problem : NonFinite or None
        The first non-finite loss, gradient or state; the work goes on regardless (a
        synchronized layer's collectives must still be met), and the devices decide.
    """
    grads: dict[str, Array] = {}
    totals = Totals()
    problem: NonFinite | None = None
    xp = model.xp
    for xb, yb in batches:
        xb, yb = on_model(model, xb), on_model(model, yb)
        logits = model.forward(xb, training=True)                        # (b, classes)
        n = yb.shape[0]
        if n:
            loss, cache = softmax_cross_entropy(logits, yb)
            if problem is None and not math.isfinite(float(loss)):
                problem = NonFinite("the training loss", float(loss))
            dlogits = softmax_cross_entropy_backward(cache) * (n / total)
        else:  # an empty shard of a short last step: no loss, every collective still met
            loss, dlogits = 0.0, xp.zeros_like(logits)
        model.backward(dlogits)
        for key, layer, name in model.named_params():
            g = layer.grads[name]
            grads[key] = g if key not in grads else grads[key] + g
        correct = int(xp.sum(xp.astype(xp.argmax(logits, axis=1) == yb, xp.int64)))
        totals = totals + Totals(float(loss) * n, correct, n)
    if problem is None:
        try:
            check_finite(named_gradients(model, grads))
            check_finite(named_states(model))
        except NonFinite as exc:
            problem = exc
    return grads, totals, problem


def _decide(run: Run, position: Position, *, before_the: str | None, undone: bool = False,
            before: int | None = None, problem: NonFinite | None = None,
            totals: Totals | None = None) -> Totals:
    """The devices' decision at a step boundary: one all-reduce of every device's status.

    A non-finite value on any device stops every device with that device's message; a step
    undone by a ``KeyboardInterrupt``, or a signal (or a hook's interrupt) received before
    the step started, stops every device before the step (``_Interrupted``); a signal
    received during it stops every device after it (``run.stop_after``). Returns the step's
    totals over all devices.
    """
    if before_the is not None:  # before an evaluation: only signals can stop it
        before = run.signals.received or run.pending
    now = run.signals.received
    totals = Totals() if totals is None else totals
    row = [float(before or 0), float(now or 0), float(undone), float(problem is not None),
           totals.loss, float(totals.correct), float(totals.samples)]
    comm = run.comm
    table = np.asarray([row]) if comm.size == 1 else agree(comm, row, what="step status")
    bad = np.flatnonzero(table[:, 3])
    if bad.size:
        source = int(bad[0])
        if comm.size == 1:
            assert problem is not None
            raise problem
        record = share_record(comm, error_record(problem) if comm.rank == source else None,
                              source=source, what="a non-finite value")
        raise error_from_record(record, source)
    stopped_before = np.flatnonzero(table[:, 0])
    if stopped_before.size or table[:, 2].any():
        signum = int(table[stopped_before[0], 0]) if stopped_before.size else SIGINT
        run.pending = None
        raise _Interrupted(position, signum)
    stopped_now = np.flatnonzero(table[:, 1])
    run.stop_after = int(table[stopped_now[0], 1]) if stopped_now.size else None
    return Totals(float(table[:, 4].sum()), int(table[:, 5].sum()), int(table[:, 6].sum()))


def _update(run: Run, grads: dict[str, Array], lr: float, *, where: str) -> None:
    """Sum the gradients over the devices, check them, and apply the same update everywhere.

    A ``KeyboardInterrupt`` raised inside (no handler installed) cannot undo an update the
    other devices made: the update is redone whole and the run stops after this step.
    """
    model, opt = run.model, run.opt
    if run.comm.size > 1:
        # Each device's loss is already its share of the step's mean (local_step): weight 1.
        for key, layer, name in model.named_params():
            layer.grads[name] = grads[key]
        allreduce_gradients(model.layers(), run.comm, weight=1.0)
        grads = {key: layer.grads[name] for key, layer, name in model.named_params()}
    try:
        check_finite(named_gradients(model, grads))  # a sum over devices can overflow
    except NonFinite as exc:
        raise exc.moved(where=where) from None
    params = [dict(layer.params) for layer in model.layers()]
    velocity = dict(opt.velocity)
    while True:
        try:
            opt.step(grads, lr)
            break
        except KeyboardInterrupt as exc:
            for layer, before in zip(model.layers(), params, strict=True):
                layer.params.update(before)
            opt.velocity.update(velocity)
            run.pending = getattr(exc, "signum", SIGINT)
    try:
        check_finite(named_params(model, opt))  # the same on every device: same update
    except NonFinite as exc:
        raise exc.moved(where=where) from None


def train_step(model: ConvNet, opt: SGD, x: Any, y: Any, *, batch_size: int,
               lr: float) -> Totals:
    """One optimizer update on one device: the micro-batches of ``batch_size`` samples of
    ``x``, their mean gradient, one SGD step (the loop's :func:`run_step` without the other
    devices, the signals or the hooks).

    Parameters
    ----------
    model, opt : the network and its optimizer
    x : array (n, C, H, W)
        The update's samples, in micro-batch order (numpy, or already on the model's device).
    y : int array (n,)
    batch_size : int
        Samples per micro-batch.
    lr : float

    Returns
    -------
    Totals of the update's samples (training-mode loss and accuracy)

    Raises
    ------
    NonFinite
        If a micro-batch's loss, a gradient, or after the update a parameter, the momentum
        or a layer's state is not finite; the layers' states are then as before the step.
    KeyboardInterrupt
        Re-raised after undoing the step (states restored; the update is not applied).
    """
    layers = model.layers()
    states = [copy.deepcopy(layer.state) for layer in layers]
    params = [dict(layer.params) for layer in layers]
    velocity = dict(opt.velocity)
    n = y.shape[0]
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, n, batch_size)]
    try:
        grads, totals, problem = local_step(model, batches, total=n)
        if problem is not None:
            raise problem
        check_finite(named_gradients(model, grads))
        opt.step(grads, lr)  # replaces arrays, never writes into them: the old ones stay
        check_finite(named_params(model, opt))
    except (KeyboardInterrupt, NonFinite):
        for layer, state, before in zip(layers, states, params, strict=True):
            layer.state = state
            layer.params.update(before)
            layer.reset()
        opt.velocity.update(velocity)
        raise
    return totals


# -- stopping and saving ------------------------------------------------------------------------


def _interrupt(run: Run, position: Position, signum: int) -> Result:
    """A signal or Ctrl-C: save where training stands (a step boundary) and stop."""
    if run.folder is not None and not _same_place(run.saved, position):
        _save(run, position)
    where = f"stopped by {signal_name(signum)} {_where(position)}"
    run.bar.close(where + (f": checkpoint saved in {run.folder}; continue with --resume"
                           if run.folder is not None else ""))
    return Result(run.config, list(position.history), run.model, interrupted=True,
                  signal=signum)


def _same_place(a: Position | None, b: Position) -> bool:
    return a is not None and (a.epoch, a.step) == (b.epoch, b.step)


def _where(position: Position) -> str:
    if position.step == 0:
        return f"after epoch {position.epoch}" if position.epoch else "before the first step"
    return f"at step {position.step} of epoch {position.epoch + 1}"


def _kept(run: Run) -> str:
    """What a stopped run leaves: which checkpoint, or that none was written."""
    if run.folder is None:
        return "no checkpoint was written (no output folder)"
    if run.saved is None:
        earlier = (f" (the {CHECKPOINT} in {run.folder} is from an earlier run)"
                   if (run.folder / CHECKPOINT).exists() else "")
        return "no checkpoint was written" + earlier
    return (f"the checkpoint {_where(run.saved)} in {run.folder} is kept (it holds only "
            "finite values)")


def _save(run: Run, position: Position) -> None:
    """Device 0 writes the checkpoint of ``position``; with per-device running statistics,
    after gathering every device's (they differ until the end of the epoch)."""
    others = _gather_states(run) if run.comm.size > 1 and not run.config.synchronized else []
    _write(run, "the checkpoint", lambda out: save_checkpoint(
        out / CHECKPOINT, run.config, run.model, run.opt, position, other_devices=others,
        data=run.fingerprint))
    run.saved = position


def _gather_states(run: Run) -> list[dict[str, Any]]:
    """Every device's floating-point state arrays, on device 0 (devices 1..P-1, by key):
    one all-reduce of (P, ...) arrays in which each device fills its own slot."""
    comm = run.comm
    own = {f"state/{i}/{name}": to_numpy(a) for i, layer in enumerate(run.model.layers())
           for name, a in layer.state.items() if to_numpy(a).dtype.kind == "f"}
    keys = sorted(own)
    slots = []
    for key in keys:
        slot = np.zeros((comm.size, *own[key].shape), dtype=own[key].dtype)
        slot[comm.rank] = own[key]
        slots.append(slot)
    gathered = allreduce(comm, slots, op="gather states") if keys else []
    return [{key: np.asarray(g)[p] for key, g in zip(keys, gathered, strict=True)}
            for p in range(1, comm.size)]


def _write(run: Run, what: str, write: Callable[[Path], None]) -> None:
    """Device 0 runs ``write(folder)``; a failed write (a full disk) becomes one sentence
    naming what is kept, on every device."""
    folder = run.folder

    def attempt() -> None:
        if not run.writer or folder is None:
            return
        try:
            write(folder)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno == errno.ENOSPC:
                reason = "the disk is full (no space left on device)"
            raise OutputFolderError(f"cannot write to the output folder {folder}: {reason}; "
                                    f"{_kept(run)}") from None

    together(run.comm, what, attempt)
