"""The micro-batch study, in the papers' terms: (#devices, #samples per device).

Every method is trained at every setting (P devices, b samples per device) with P x b fixed
(the update size), on the same data and seeds, through the data-parallel loop
(:mod:`refnorm.train.loop`): P simulated devices in one process by default, or P processes
under ``mpiexec`` (``launcher="mpi"``). Only what the normalizers' statistics see changes: b
samples for per-device statistics (bn, sn), all P x b for synchronized ones (syncbn,
syncsn). The report (``report.md``) has

- a table of test accuracy, mean +- std over seeds, laid out as the SN paper's Table 2;
- one sentence per claim of the papers, saying whether *this run* supports it: BN degrades
  at micro-batches, GN and SN stay robust, GN+WS matches large-batch BN, SN's learned ratios
  move away from BN as the batch shrinks, WN trains as well as BN but tests worse, SyncBN
  at (P, 2) recovers BN at (1, 2P), SyncSN is at least as good as SN at
  micro-batches. A claim is judged only over 3 seeds or more: a difference counts when it
  exceeds two standard errors of the mean of its per-seed differences (the runs of one seed
  share their training subset and data order, so the two sides are paired by seed);
- plots: accuracy vs setting per method; SN's learned ratios per layer vs setting (SN Fig.
  4/5); train vs test accuracy of WN and BN per epoch (Gitman & Ginsburg Fig. 3).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refnorm.dispatch import process_choice, set_path
from refnorm.norms.switchable_norm import SCOPES
from refnorm.train.config import TrainConfig, check_int
from refnorm.train.folder import FolderLock, atomic_write, new_folders, remove_if_empty
from refnorm.train.interrupt import SIGNALS, Interrupted, exit_status
from refnorm.train.loop import train
from refnorm.train.warmup import warm_kernels


@dataclass(frozen=True)
class StudyConfig:
    """The grid. A method is ``norm``, ``norm+weight`` or a weight method alone (``wn``,
    also spelled ``none+wn``: each method is kept under the one name its runs carry);
    each per-device batch size b in ``batch_sizes`` is the setting (update_size / b devices,
    b samples per device)."""

    methods: tuple[str, ...] = ("bn", "syncbn", "gn", "sn", "syncsn", "gn+ws", "ln", "wn")
    batch_sizes: tuple[int, ...] = (2, 4, 16, 64)
    update_size: int = 64
    epochs: int = 6
    seeds: tuple[int, ...] = (0, 1, 2)
    lr: float = 0.05
    data: str = "digits"
    train_subset: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    launcher: str = "inprocess"

    def __post_init__(self) -> None:
        for name in ("methods", "batch_sizes", "seeds"):
            if not getattr(self, name):  # no run to train, or no setting to report
                raise ValueError(f"{name} must hold at least one value; "
                                 f"got {tuple(getattr(self, name))}")
        check_int("update_size", self.update_size, low=1)
        for b in self.batch_sizes:
            check_int("every batch size", b, low=1)
            if self.update_size % b:
                raise ValueError(f"every batch size must divide update_size={self.update_size}; "
                                 f"got {b}")
        # one name per method, as its runs are labelled ("none+wn" is "wn"): a row per method
        object.__setattr__(self, "methods", tuple(method_name(m) for m in self.methods))
        for name in ("batch_sizes", "methods", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):  # the runs would be repeated and pooled
                raise ValueError(f"{name} must not repeat a value; got {tuple(values)}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}; "
                             f"got {self.launcher!r}")

    def setting(self, b: int) -> tuple[int, int]:
        """(#devices, #samples per device) of per-device batch size ``b``."""
        return self.update_size // b, b


LAUNCHERS = ("inprocess", "mpi")
# Seeds a claim needs before the study judges it: with fewer there is no standard error to
# judge a difference by, and a point or two is within what another seed gives.
JUDGED_FROM = 3


def parse_method(method: str) -> tuple[str, str | None]:
    """``"gn+ws"`` -> ("gn", "ws"); ``"wn"`` -> ("none", "wn"); ``"bn"`` -> ("bn", None)."""
    from refnorm.train.model import NORMS, WEIGHTS

    parts = method.split("+")
    if len(parts) == 1 and parts[0] in WEIGHTS:
        return "none", parts[0]
    norm, weight = parts[0], (parts[1] if len(parts) == 2 else None)
    if norm not in NORMS or weight not in WEIGHTS or len(parts) > 2:
        raise ValueError(f"unknown method {method!r}: use a normalizer ({', '.join(NORMS)}), "
                         f"optionally +ws/+wn/+np/+trelu, or a weight method alone")
    return norm, weight


def method_name(method: str) -> str:
    """The one name of ``method``, as its runs are labelled: ``"none+wn"`` -> ``"wn"``."""
    return _name(*parse_method(method))


def _name(norm: str, weight: str | None) -> str:
    if weight is None:
        return norm
    return weight if norm == "none" else f"{norm}+{weight}"


# the grid of ``refnorm study --quick``: one seed, so its claims are reported, not judged
QUICK = StudyConfig(methods=("bn", "syncbn", "gn", "sn", "gn+ws", "wn"), batch_sizes=(2, 32),
                    update_size=32, epochs=3, train_subset=768, seeds=(0,))


def job_configs(study: StudyConfig) -> list[TrainConfig]:
    configs = []
    for method in study.methods:
        norm, weight = parse_method(method)
        for b in study.batch_sizes:
            for seed in study.seeds:
                devices, per_device = study.setting(b)
                configs.append(TrainConfig(
                    data=study.data, norm=norm, weight=weight, batch_size=per_device,
                    devices=devices, epochs=study.epochs, lr=study.lr, seed=seed,
                    train_subset=study.train_subset, dtype=study.dtype, device=study.device))
    return configs


def _run(config: TrainConfig, launcher: str = "inprocess") -> dict[str, Any]:
    started = time.perf_counter()
    if launcher == "mpi" and config.devices > 1:
        history = run_under_mpiexec(config)
    else:
        result = train(config, progress=False)
        if result.interrupted:  # the signal stops the study, not only this run, with its status
            raise Interrupted(result.signal or signal.SIGINT)
        history = result.history
    return {"config": dataclasses.asdict(config), "history": history,
            "seconds": time.perf_counter() - started}


def run_under_mpiexec(config: TrainConfig) -> list[dict]:
    """Train ``config`` as ``mpiexec -n devices`` processes (:mod:`refnorm.train.mpi_run`);
    return its history. A run that stopped on an error it expects raises that error here, as
    the in-process launcher would (a ValueError for refused data, NonFinite, ...), and one
    stopped by SIGINT or SIGTERM raises :class:`~refnorm.train.interrupt.Interrupted`."""
    import json
    import subprocess
    import tempfile

    from refnorm.train.loop import error_from_record
    from refnorm.train.mpi_run import ERROR

    exe = _mpiexec()
    with tempfile.TemporaryDirectory(prefix="refnorm-study-") as out:
        job = subprocess.run([exe, "-n", str(config.devices), sys.executable, "-m",
                              "refnorm.train.mpi_run", json.dumps(dataclasses.asdict(config)),
                              out], capture_output=True, text=True)
        error = Path(out, ERROR)
        if job.returncode != 0 and error.exists():
            raise error_from_record(json.loads(error.read_text()))
        if job.returncode in (exit_status(signum) for signum in SIGNALS):
            raise Interrupted(job.returncode - 128)  # stopped by a signal, as in-process
        if job.returncode != 0:
            raise RuntimeError(f"mpiexec -n {config.devices} failed ({job.returncode}) for "
                               f"{config.describe()}: {job.stderr.strip()[-2000:]}")
        return json.loads(Path(out, "metrics.json").read_text())


def _mpiexec() -> str:
    """The ``mpiexec`` of the mpi launcher (:func:`refnorm.launch.find_mpiexec`).

    Raises
    ------
    ValueError
        If there is none.
    """
    from refnorm.launch import find_mpiexec

    exe = find_mpiexec()
    if exe is None:
        raise ValueError("launcher 'mpi' needs mpiexec: install the mpi extra (pip install "
                         "'refnorm[mpi]') or put an MPI's mpiexec on PATH")
    return exe


# What a study writes into its folder.
OUTPUTS = ("runs.json", "report.md", "accuracy_vs_batch.png", "sn_ratios.png", "wn_vs_bn.png")


def prepare_output(out: str | Path) -> Path:
    """Create the study's folder ``out`` if needed, before any training; return it.

    Raises
    ------
    OutputFolderError
        If ``out`` is a file, lies under a file or cannot be created, or one of
        :data:`OUTPUTS` in it is a folder.
    """
    from refnorm.train.folder import OutputFolderError, prepare_folder

    folder = prepare_folder(out)
    for name in OUTPUTS:
        if (folder / name).is_dir():
            raise OutputFolderError(f"{folder / name} is a folder, where the study writes its "
                                    f"{name} file: remove it or choose another --out")
    return folder


def run_study(study: StudyConfig, out: str | Path, *, jobs: int | None = None,
              log=print) -> Path:
    """Train the grid, write ``report.md`` and the plots into ``out``; return the report path.

    Before the first run: matplotlib (the train extra), which draws the plots (an
    ImportError says it is missing), every run's data (:func:`check_every_run`), mpiexec for
    the mpi launcher's runs on several devices, then the folder (:func:`prepare_output`), so
    that a refused grid leaves no folder behind. The study holds the folder's lock
    (:class:`~refnorm.train.folder.FolderLock`, as a training run does: a second study or run
    on the folder is refused, ``FolderBusy``); a study that stops before its report (a run's
    error, a diverged run, an interrupt) removes the folders it created while they are
    empty."""
    from refnorm.train.outputs import plotting_problem

    if (problem := plotting_problem("the report's plots")) is not None:
        raise ImportError(problem)
    configs = job_configs(study)
    check_every_run(configs)  # first: a grid refused for its data leaves no folder behind
    if study.launcher == "mpi" and any(c.devices > 1 for c in configs):
        _mpiexec()  # missing: refused now, not after the runs on one device have trained
    made = new_folders(out)
    out = prepare_output(out)
    try:
        with FolderLock(out, notice=log):  # one writer per folder, as for a training run
            return _train_and_report(study, configs, out, jobs, log)
    except BaseException:  # a run that failed, diverged or was stopped: no folder left empty
        remove_if_empty(made)
        raise


def _train_and_report(study: StudyConfig, configs: list[TrainConfig], out: Path,
                      jobs: int | None, log) -> Path:
    """:func:`run_study` once its folder is made: every run, then the report."""
    jobs = jobs or min(len(configs), os.cpu_count() or 1)
    started = time.perf_counter()
    runs = []
    if jobs > 1:
        # the kernels the runs use, compiled here once rather than in every worker at once
        warm_kernels(configs)
        # forkserver, not fork: a process whose numba (OpenMP) threads have run cannot fork
        context = multiprocessing.get_context(
            "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init,
                                 initargs=(process_choice(),)) as pool:
            for i, run in enumerate(pool.map(_run, configs, [study.launcher] * len(configs)), 1):
                runs.append(run)
                log(f"[{i}/{len(configs)}] {_label(run)}: test acc "
                    f"{run['history'][-1]['test_acc']:.3f} ({run['seconds']:.1f} s)")
    else:
        for i, config in enumerate(configs, 1):
            runs.append(_run(config, study.launcher))
            log(f"[{i}/{len(configs)}] {_label(runs[-1])}: test acc "
                f"{runs[-1]['history'][-1]['test_acc']:.3f} ({runs[-1]['seconds']:.1f} s)")
    elapsed = time.perf_counter() - started
    import json

    text = json.dumps(runs, indent=1)
    atomic_write(out / "runs.json", lambda f: f.write(text.encode()))
    write_report(study, runs, out, elapsed)
    return out / "report.md"


def check_every_run(configs: list[TrainConfig]) -> None:
    """Refuse, before the first run trains, a grid with a run its data cannot train (images
    too small for a method's statistics, a subset larger than the data, ...): the error that
    run would raise (:func:`refnorm.train.loop.check_data`), now rather than after the runs
    before it. Each data set and subset is loaded once."""
    from refnorm.train.loop import check_data, prepare_data

    loaded: tuple[tuple, Any] | None = None
    for config in sorted(configs, key=lambda c: (c.data, c.train_subset or 0, c.seed)):
        key = (config.data, config.train_subset, config.seed if config.train_subset else None)
        if loaded is None or loaded[0] != key:
            remedy = (f"the study trains each run on {config.train_subset} of them; give data "
                      f"with at least that many")
            loaded = (key, prepare_data(config, remedy=remedy))
        check_data(config, loaded[1])


def _worker_init(path: str | None) -> None:
    """A study worker: this process's path choice, and one thread (one job per core)."""
    set_path(path)
    _single_thread()


def _single_thread() -> None:
    """One thread per worker process: the study runs one job per core already."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS"):
        os.environ[var] = "1"
    if "numba" in sys.modules:  # imported before the fork: its thread pool is already sized
        sys.modules["numba"].set_num_threads(1)


def _label(run: dict) -> str:
    c = run["config"]
    method = c["norm"] if c["weight"] is None else (
        c["weight"] if c["norm"] == "none" else f"{c['norm']}+{c['weight']}")
    return f"{method} b={c['batch_size']} seed={c['seed']}"


def _method(config: dict) -> str:
    return _name(config["norm"], config["weight"])


# -- the report ---------------------------------------------------------------------------------


def summarize(runs: list[dict]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (method, batch size): final test/train accuracies over seeds, SN ratios."""
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    for run in runs:
        key = (_method(run["config"]), run["config"]["batch_size"])
        last = run["history"][-1]
        cell = cells.setdefault(key, {"test": [], "train": [], "ratios": [], "histories": [],
                                      "seeds": []})
        cell["seeds"].append(run["config"]["seed"])
        cell["test"].append(last["test_acc"])
        cell["train"].append(last["train_acc"])
        cell["ratios"].append({k: v for k, v in last.items() if k.startswith("sn")})
        cell["histories"].append(run["history"])
    return cells


def _mean(xs) -> float:
    return float(np.mean(xs))


@dataclass(frozen=True)
class Claim:
    """One claim of the papers, read against this run."""

    claim: str  # what the paper says, with where
    supported: bool | None  # whether this run supports it; None: not judged (too few seeds)
    evidence: str  # the numbers behind the verdict, and the criterion
    # False when the grid cannot test it at all: it compares two settings, the grid has one
    assessable: bool = True


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds (in points) and its standard error (0 with one seed)."""

    mean: float
    se: float
    n: int

    @staticmethod
    def of(values: list[float], scale: float = 100.0) -> Estimate:
        v = np.asarray(values, dtype=np.float64) * scale
        se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
        return Estimate(float(v.mean()), se, len(v))

    @staticmethod
    def paired(a: dict, b: dict, key: str = "test", scale: float = 100.0) -> Estimate:
        """The mean of ``a[key] - b[key]`` seed by seed over the seeds both cells hold, and its
        standard error: the runs of one seed share their training subset and data order, so
        the spread that seed brings to both sides cancels in their difference (treated as
        independent, it once hid a consistent 2.4-point drop behind a 2.1-point error)."""
        mine = dict(zip(_seeds(a), a[key], strict=True))
        theirs = dict(zip(_seeds(b), b[key], strict=True))
        return Estimate.of([mine[s] - theirs[s] for s in mine if s in theirs], scale)

    def text(self) -> str:
        return f"{self.mean:.1f}" + (f" ± {self.se:.1f}" if self.n > 1 else "")


def _seeds(cell: dict) -> list:
    """The seeds of a cell's runs, in the order of its lists (positions if not recorded)."""
    return list(cell.get("seeds", range(len(cell["test"]))))


def _significant(d: Estimate) -> bool:
    """Whether a difference counts: it exceeds two standard errors."""
    return abs(d.mean) > 2 * d.se


def _lower(d: Estimate) -> bool:
    """Whether a difference is significantly below 0."""
    return d.mean < 0 and _significant(d)


def _higher(d: Estimate) -> bool:
    """Whether a difference is significantly above 0."""
    return d.mean > 0 and _significant(d)


def claims(study: StudyConfig, cells: dict) -> list[Claim]:
    """The claims the grid can test (a claim whose cells the grid lacks is left out).

    A claim that compares two settings is "not assessable" when the grid has one setting
    (a single batch size: the two would be the same runs). A claim is "not judged" with
    fewer than :data:`JUDGED_FROM` seeds common to its cells, or where a run's accuracy is
    not a number; otherwise a difference counts when it exceeds two standard errors of the
    mean of its per-seed differences (:meth:`Estimate.paired`, :func:`_significant`).
    """
    small, large = min(study.batch_sizes), max(study.batch_sizes)
    S, L = study.setting(small), study.setting(large)
    acc = {k: Estimate.of(v["test"]) for k, v in cells.items()}

    def have(*keys):
        return all(k in acc for k in keys)

    def diff(first: tuple, second: tuple, key: str = "test") -> Estimate:
        return Estimate.paired(cells[first], cells[second], key)

    # claim, verdict, evidence, whether it compares two settings, the differences it rests on
    found: list[tuple[str, bool, str, bool, tuple[Estimate, ...]]] = []

    def add(claim: str, verdict: bool, evidence: str, *differences: Estimate,
            two_settings: bool = True) -> None:
        found.append((claim, verdict, evidence, two_settings, differences))

    drop = {m: diff((m, large), (m, small)) for m in study.methods
            if have((m, large), (m, small))}
    if "bn" in drop:
        d = drop["bn"]
        add(f"BN degrades when each device sees {small} samples (SN Table 2)", _higher(d),
            f"BN {acc[('bn', large)].text()}% at {L} vs {acc[('bn', small)].text()}% "
            f"at {S}: a drop of {d.text()} points", d)
    for m in ("gn", "sn"):
        if m in drop and "bn" in drop:
            d = drop[m]
            add(f"{m.upper()} stays robust at micro-batches where BN does not (SN Table 2)",
                not _higher(d) and _higher(drop["bn"]),
                f"{m.upper()} drops {d.text()} points from {L} to {S}, BN "
                f"{drop['bn'].text()} ('supported': no significant drop where BN drops "
                "significantly)", d, drop["bn"])
    if have(("gn+ws", small), ("bn", large)):
        d = diff(("gn+ws", small), ("bn", large))
        add(f"GN+WS at {S} matches BN at {L} (WS Fig. 1, Table 2)", not _lower(d),
            f"GN+WS {acc[('gn+ws', small)].text()}% vs BN "
            f"{acc[('bn', large)].text()}% (difference {d.text()} points; "
            "'supported': not significantly worse)", d)
    if have(("sn", small), ("sn", large)):
        share = {b: {"test": [_sn_bn_share([r]) for r in cells[("sn", b)]["ratios"]],
                     "seeds": _seeds(cells[("sn", b)])} for b in (small, large)}
        d = Estimate.paired(share[large], share[small], scale=1.0)
        add("SN's learned ratios move away from BN as the batch shrinks (SN Fig. 4)",
            _higher(d),
            f"mean BN ratio over layers, means and variances: "
            f"{_mean(share[small]['test']):.2f} at {S} vs {_mean(share[large]['test']):.2f} "
            f"at {L} (difference {d.mean:.3f}" + (f" ± {d.se:.3f})" if d.n > 1 else ")"), d)
    if have(("wn", large), ("bn", large)):
        train = diff(("wn", large), ("bn", large), "train")
        test = diff(("wn", large), ("bn", large))
        add("WN trains as well as BN but tests worse (Gitman & Ginsburg: better training "
            "accuracy, test accuracy about 6% lower)", not _lower(train) and _lower(test),
            f"at {L}: WN minus BN, train accuracy {train.text()} points, test accuracy "
            f"{test.text()} points ('supported': train not significantly lower, test "
            "significantly lower)", train, test, two_settings=False)
    # SyncBN pools the statistics of all P x b samples: BN's on one device with the whole update
    whole = study.update_size
    W = study.setting(whole)
    if have(("syncbn", small), ("bn", whole), ("bn", small)):
        d = diff(("syncbn", small), ("bn", whole))
        add(f"SyncBN at {S} recovers BN at {W}: its statistics are the whole batch's, as one "
            "device's (the synchronized BN scope of SN's Appendix A)", not _significant(d),
            f"SyncBN {acc[('syncbn', small)].text()}% at {S} vs BN "
            f"{acc[('bn', whole)].text()}% at {W} and {acc[('bn', small)].text()}% "
            f"at {S} (difference {d.text()} points; 'supported': no significant difference "
            f"from BN at {W})", d)
    if have(("syncsn", small), ("sn", small)):
        d = diff(("syncsn", small), ("sn", small))
        add("SyncSN is at least as good as SN at micro-batches (SN Table 7)", not _lower(d),
            f"at {S}: SyncSN {acc[('syncsn', small)].text()}% vs SN "
            f"{acc[('sn', small)].text()}% (difference {d.text()} points)", d,
            two_settings=False)
    result = []
    for c, v, e, two, differences in found:
        pairs = min(d.n for d in differences)
        if two and S == L:
            result.append(Claim(c, None, f"{e}; the grid has one setting, {S}: not assessable "
                                "(the claim compares two settings: give two or more "
                                "--batch-sizes)", assessable=False))
        elif not all(np.isfinite([d.mean for d in differences])):
            result.append(Claim(c, None, f"{e}; a run's accuracy is not a number: not "
                                "judged"))
        elif pairs < JUDGED_FROM:
            result.append(Claim(c, None, f"{e}; {pairs} seed{'s' if pairs != 1 else ''}: not "
                                f"judged (a verdict needs {JUDGED_FROM} seeds or more in every "
                                f"cell it compares: --seeds {JUDGED_FROM})"))
        else:
            result.append(Claim(c, v, e + "; ± is one standard error (of a mean over seeds; of "
                                "a difference, the mean of its per-seed differences), and a "
                                "difference counts when it exceeds two standard errors"))
    return result


def _sn_bn_share(ratio_rows: list[dict]) -> float:
    values = [v for row in ratio_rows for k, v in row.items() if k.endswith("_bn")]
    return _mean(values) if values else float("nan")


def convergence_note(study: StudyConfig, cells: dict) -> str | None:
    """Why a per-sample normalizer (GN, LN) trails BN at the large setting in this run, when
    it does by more than 5 points: the run's own train accuracy and last-epoch gain, and,
    over :data:`JUDGED_FROM` seeds or more, what they say (still fitting the training set, or
    fitting it as BN does)."""
    large = max(study.batch_sizes)
    notes = []
    for m in ("gn", "ln"):
        if (m, large) not in cells or ("bn", large) not in cells:
            continue
        mine, bn = cells[(m, large)], cells[("bn", large)]
        gap = (_mean(bn["test"]) - _mean(mine["test"])) * 100
        if gap <= 5:
            continue
        gains = [(h[-1]["test_acc"] - h[-2]["test_acc"]) * 100
                 for h in mine["histories"] if len(h) > 1]
        train = Estimate.paired(mine, bn, "train")
        if train.n < JUDGED_FROM:
            reading = f" ({train.n} seed{'s' if train.n != 1 else ''}: not read further)."
        elif _lower(train):
            reading = (": its train accuracy is significantly below BN's, so it is still "
                       "fitting the training set when the run stops, and part of the gap is "
                       "convergence speed within this run's length.")
        else:
            reading = (": it fits the training set as BN does, so the gap is in "
                       "generalization.")
        notes.append(
            f"{m.upper()} trails BN by {gap:.1f} points at {study.setting(large)}. Its train "
            f"accuracy is {_mean(mine['train']) * 100:.1f}% (BN {_mean(bn['train']) * 100:.1f}%)"
            + (f" and its test accuracy {'still rose' if _mean(gains) >= 0 else 'fell'} "
               f"{abs(_mean(gains)):.1f} points in the last epoch" if gains else "") + reading)
    return " ".join(notes) if notes else None


def write_report(study: StudyConfig, runs: list[dict], out: Path, elapsed: float) -> None:
    cells = summarize(runs)
    subset = (f" (a random subset of {study.train_subset} training samples, drawn per seed)"
              if study.train_subset else "")
    where = ("simulated devices in one process" if study.launcher == "inprocess" else
             "one process per device under mpiexec")
    settings = [study.setting(b) for b in study.batch_sizes]
    lines = ["# Micro-batch study", "",
             f"Data `{study.data}`{subset}; settings (#devices, #samples per device) with "
             f"{study.update_size} samples per update, as in SN Table 2 ({where}); "
             f"{study.epochs} epoch{'s' if study.epochs != 1 else ''}; lr {study.lr} (cosine); "
             f"seeds {list(study.seeds)}; "
             f"{len(runs)} run{'s' if len(runs) != 1 else ''} in {elapsed:.0f} s.", "",
             "## Test accuracy (%)", "",
             "| method | " + " | ".join(f"{p}, {b}" for p, b in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for m in study.methods:
        row = []
        for b in study.batch_sizes:
            if (m, b) not in cells:  # no run of this cell (a run of a study stopped early)
                row.append("—")
                continue
            t = np.array(cells[(m, b)]["test"]) * 100
            row.append(f"{t.mean():.1f} ± {t.std(ddof=1):.1f}" if len(t) > 1
                       else f"{t.mean():.1f}")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    if len(study.seeds) > 1:
        lines += ["", "Mean ± sample standard deviation over seeds (ddof 1, as the claims' "
                  "standard errors)."]
    lines += [""]
    independent = [m for m in study.methods
                   if parse_method(m)[0] in ("none", "in", "ln", "gn")]
    if independent:
        one = len(independent) == 1
        lines += [f"{', '.join(independent)} never compute{'s' if one else ''} statistics "
                  "across samples: P devices then train exactly as one device with all P x b "
                  "samples (the data-parallel loop's tests show it), so "
                  f"{'its row is' if one else 'their rows are'} flat by construction (up to "
                  "float rounding in the order gradients are summed)."]
    synchronized = [m for m in study.methods if parse_method(m)[0] in ("syncbn", "syncsn")]
    if synchronized:
        one = len(synchronized) == 1
        lines += ["", f"{', '.join(synchronized)} pool{'s its' if one else ' their'} statistics "
                  f"over the devices: at every setting {'it computes' if one else 'they compute'}"
                  f" what {'/'.join(m[4:] for m in synchronized)} computes on one device with "
                  f"all {study.update_size} samples."]
    note = convergence_note(study, cells)
    if note:
        lines += ["", note]
    lines += ["", "## The papers' claims, against this run", ""]
    tested = claims(study, cells)
    if not tested:
        lines.append("None: each needs cells this grid does not hold (BN, or SN, at two "
                     "settings; GN or SN beside BN at two settings; GN+WS or WN beside BN; "
                     "SyncBN beside BN on one device with the whole update; SyncSN beside SN).")
    for c in tested:
        verdict = {True: "**supported**", False: "**not supported**",
                   None: "**not judged**"}[c.supported] if c.assessable else "**not assessable**"
        by = "by this run" if c.assessable else "by this grid"
        lines.append(f"- {c.claim}: {verdict} {by}. {c.evidence}.")
    lines += ["", "## Plots", "",
              "![accuracy vs setting](accuracy_vs_batch.png)", ""]
    plot_accuracy(study, cells, out / "accuracy_vs_batch.png")
    large = max(study.batch_sizes)
    plots = {"sn_ratios.png": any(("sn", b) in cells for b in study.batch_sizes),
             "wn_vs_bn.png": ("wn", large) in cells and ("bn", large) in cells}
    if plots["sn_ratios.png"]:
        plot_sn_ratios(study, cells, out / "sn_ratios.png")
        lines += ["![SN ratios per layer](sn_ratios.png)", ""]
    if plots["wn_vs_bn.png"]:
        plot_wn_vs_bn(study, cells, out / "wn_vs_bn.png")
        lines += ["![WN vs BN, train and test accuracy](wn_vs_bn.png)", ""]
    for name, drawn in plots.items():  # an earlier study's plot in this folder is not this one's
        if not drawn:
            (out / name).unlink(missing_ok=True)
    report = "\n".join(lines) + "\n"
    atomic_write(out / "report.md", lambda f: f.write(report.encode()))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(study, cells, path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in study.methods:
        sizes = [b for b in study.batch_sizes if (m, b) in cells]  # a missing cell: no point
        means = [_mean(cells[(m, b)]["test"]) * 100 for b in sizes]
        stds = [float(np.std(cells[(m, b)]["test"], ddof=1)) * 100
                if len(cells[(m, b)]["test"]) > 1 else 0.0 for b in sizes]
        ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(study.batch_sizes, [f"({p}, {b})" for p, b in map(study.setting,
                                                                     study.batch_sizes)])
    ax.set_xlabel("(#devices, #samples per device)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def plot_sn_ratios(study, cells, path) -> None:
    plt = _plt()
    rows = {b: cells[("sn", b)]["ratios"] for b in study.batch_sizes if ("sn", b) in cells}
    sizes = list(rows)
    layers = sorted({k.split("_")[0] for r in rows[sizes[0]] for k in r})
    fig, axes = plt.subplots(2, len(layers), figsize=(3 * len(layers), 5), squeeze=False)
    width = 0.8 / len(sizes)
    for j, layer in enumerate(layers):
        for i, kind in enumerate(("mean", "var")):
            ax = axes[i][j]
            for k, b in enumerate(sizes):
                values = [_mean([r[f"{layer}_{kind}_{s}"] for r in rows[b]]) for s in SCOPES]
                ax.bar(np.arange(3) + k * width, values, width, label=str(study.setting(b)))
            ax.set_xticks(np.arange(3) + width * (len(sizes) - 1) / 2, SCOPES)
            ax.set_ylim(0, 1)
            ax.set_title(f"SN layer {j + 1}, {'means' if kind == 'mean' else 'variances'}",
                         fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def plot_wn_vs_bn(study, cells, path) -> None:
    plt = _plt()
    b = max(study.batch_sizes)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m, color in (("bn", "tab:blue"), ("wn", "tab:orange")):
        history = cells[(m, b)]["histories"][0]
        epochs = [r["epoch"] for r in history]
        ax.plot(epochs, [r["train_acc"] * 100 for r in history], color=color, label=f"{m} train")
        ax.plot(epochs, [r["test_acc"] * 100 for r in history], color=color, linestyle="--",
                label=f"{m} test")
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{study.setting(b)} (#devices, #samples per device), seed {study.seeds[0]}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
