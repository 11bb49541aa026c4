"""The ``refnorm`` command and its six sub-commands.

- ``refnorm gradcheck [NAME ... | --all] [--json]`` — every backward against finite differences;
- ``refnorm train ...`` — train the conv-net with a chosen normalizer (:mod:`refnorm.train`);
- ``refnorm study [--quick]`` — the micro-batch study and its report;
- ``refnorm bench [--crossover | --data-parallel | --device gpu]`` — timings
  (:mod:`refnorm.bench`);
- ``refnorm conform MODULE:FACTORY --method M`` — the conventions of your own layer
  (:mod:`refnorm.testing.cli`);
- ``refnorm lessons --student DIR`` — the lessons with their exercises blanked
  (:mod:`refnorm.lessons`).

Usage, argument and folder problems are one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence

from refnorm import lessons, registry
from refnorm.argtypes import OneLineParser, folder_path, int_at_least, json_text
from refnorm.gradcheck import CaseResult, GradError, check_registered
from refnorm.testing import cli as conform
from refnorm.train.interrupt import Interrupted, exit_status, signal_name

DEFAULT_TOLERANCE = 1e-6


def _one_line(text: object) -> str:
    return " ".join(str(text).split())



def _finite_float(*, positive: bool) -> Callable[[str], float]:
    """An argparse type: a finite float, > 0 if ``positive`` else >= 0."""
    bound = "> 0" if positive else ">= 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}; got {text!r}")
        return value

    return parse


def _int_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers >= 1."""
    parse = int_at_least(1)
    try:
        return tuple(parse(part.strip()) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers >= 1 (e.g. 2,4,16); got {text!r}") from None


def _name_list(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated non-empty names."""
    names = tuple(part.strip() for part in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated names (e.g. bn,gn+ws); got {text!r}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the sub-command's parser, so that its --help is the one named
        commands = _commands(parser)
        (commands.get(args.command) or parser).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 2
    return args.run(args, parser)


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The sub-commands' parsers of ``parser``, by name."""
    return next(action.choices for action in parser._actions
                if isinstance(action, argparse._SubParsersAction))


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="refnorm",
        description="A numpy-first reference of normalization methods for deep networks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    gc = sub.add_parser(
        "gradcheck",
        help="check every backward against central finite differences",
        description=(
            "Check each named layer's backward (for x and every parameter) against "
            "central finite differences of a vector-Jacobian product in float64, with a "
            "random upstream gradient, on a few shapes and modes. The error is the "
            "deviation beyond the finite-difference noise floor (rounding of sum(y * dy) "
            "over the step), relative to the gradient's scale. Exits 1 if any error exceeds "
            "the tolerance."
        ),
    )
    gc.add_argument("names", nargs="*", metavar="NAME",
                    help=f"layers to check: {', '.join(registry.names())}")
    gc.add_argument("--all", action="store_true", help="check every registered layer")
    gc.add_argument("--json", action="store_true",
                    help="print JSON: one object per normalizer and gradient")
    gc.add_argument("--tolerance", type=_finite_float(positive=True), default=DEFAULT_TOLERANCE,
                    help="largest acceptable error beyond the noise floor, relative to the "
                         "gradient's scale (default: %(default)g)")
    gc.add_argument("--seed", type=int_at_least(0), default=0,
                    help="seed for inputs and upstream gradients (default %(default)s)")
    gc.set_defaults(run=_run_gradcheck)
    _add_train(sub)
    _add_study(sub)
    _add_bench(sub)
    conform.add_parser(sub).set_defaults(run=_run_conform)
    lessons.add_parser(sub).set_defaults(run=lambda args, parser: lessons.run(args))
    return parser


def _run_conform(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if importlib.util.find_spec("hypothesis") is None:
        print("refnorm conform: error: refnorm.testing needs hypothesis; install it with "
              "pip install 'refnorm[testing]'", file=sys.stderr)
        return 2
    return conform.run(args)


def _add_bench(sub) -> None:
    from refnorm import bench

    b = sub.add_parser(
        "bench", help="time the reference path, the fast path and PyTorch CPU",
        description=("Time forward+backward of every normalizer at (32, 64, 32, 32) and "
                     "(2, 64, 32, 32) float32 and a training step of the study's BN, GN, SN "
                     "and GN+WS models, on the reference path, the fast path (and its kernels "
                     "alone) and PyTorch CPU when torch is importable: interleaved repetitions "
                     "in a random order, medians and spread, effective bandwidth next to the "
                     "machine's copy bandwidth, and which path each layer of the steps ran."))
    bench.add_arguments(b)
    b.set_defaults(run=lambda args, parser: bench.run_args(args))


# ``refnorm train``'s options that set a TrainConfig field (the option's dest -> the field),
# and their defaults. The options default to None so that ``--resume`` can tell the ones given
# (which must match the checkpoint) from the ones left out (taken from the checkpoint).
TRAIN_FIELDS = {"data": "data", "norm": "norm", "weight": "weight", "batch_size": "batch_size",
                "accumulation": "accumulation", "devices": "devices", "epochs": "epochs",
                "lr": "lr", "weight_decay": "weight_decay", "schedule": "schedule",
                "seed": "seed", "groups": "num_groups", "sn_inference": "sn_inference",
                "dtype": "dtype"}
TRAIN_DEFAULTS = {"data": "digits", "norm": "bn", "weight": "none", "batch_size": 32,
                  "accumulation": 1, "devices": 1, "epochs": 10, "lr": 0.05,
                  "weight_decay": 5e-4, "schedule": "cosine", "seed": 0, "groups": 4,
                  "sn_inference": "batch_average", "dtype": "float32"}


def _add_train(sub) -> None:
    from refnorm.train.model import NORMS, WEIGHTS

    positive, natural = int_at_least(1), int_at_least(0)
    tr = sub.add_parser(
        "train", help="train the small conv-net with a chosen normalizer",
        description=("Train refnorm's conv-net. The normalizers see micro-batches of "
                     "--batch-size samples per device; each update accumulates "
                     "--accumulation of them on each of --devices devices. Writes "
                     "metrics.csv, metrics.json and checkpoint.npz (every epoch, "
                     "atomically) and curves.png (when it finishes) to --out, which the run "
                     "locks; --resume continues a run "
                     "bit-identically on the same --path (the options not given come from "
                     "its checkpoint; the path is the process's, not recorded there). "
                     "Ctrl-C or SIGTERM stops at the next step boundary, saves a checkpoint "
                     "and exits 130 or 143; a NaN or an infinity anywhere stops the run with "
                     "exit 3; an argument, data or folder problem exits 2 before training."))
    d = TRAIN_DEFAULTS
    tr.add_argument("--data", help="digits (embedded), mnist:DIR (IDX files) or cifar10:DIR "
                                   f"(python batches) (default {d['data']})")
    tr.add_argument("--norm", choices=NORMS, help=f"{', '.join(NORMS)} (default {d['norm']})")
    tr.add_argument("--weight", choices=["none", *(w for w in WEIGHTS if w)],
                    help="ws, wn, np, trelu, or none: plain convolutions (default none)")
    tr.add_argument("--batch-size", type=positive,
                    help=f"samples per device in one micro-batch (default {d['batch_size']})")
    tr.add_argument("--accumulation", type=positive,
                    help=f"micro-batches per update (default {d['accumulation']})")
    tr.add_argument("--devices", type=positive,
                    help="data-parallel devices P, simulated in this process (default 1; under "
                         "mpiexec, the number of processes): each step trains on P x "
                         "batch-size x accumulation samples")
    tr.add_argument("--epochs", type=positive, help=f"(default {d['epochs']})")
    tr.add_argument("--lr", type=_finite_float(positive=True),
                    help=f"base learning rate (default {d['lr']})")
    tr.add_argument("--weight-decay", type=_finite_float(positive=False),
                    help=f"on convolution and linear weights (default {d['weight_decay']})")
    tr.add_argument("--schedule", choices=("cosine", "linear", "constant"),
                    help=f"learning-rate schedule (default {d['schedule']})")
    tr.add_argument("--seed", type=natural, help=f"(default {d['seed']})")
    tr.add_argument("--groups", type=positive,
                    help=f"GN groups, for --norm gn only; must divide every width (default "
                         f"{d['groups']})")
    tr.add_argument("--sn-inference", choices=("batch_average", "moving_average"),
                    help="SN's inference statistics, for --norm sn or syncsn only: "
                         "batch_average (the paper's) or moving_average (default "
                         f"{d['sn_inference']})")
    _add_compute_options(tr, dtype_default=None)
    tr.add_argument("--out", type=folder_path, default="runs/train",
                    help="output directory (default runs/train)")
    tr.add_argument("--resume", action="store_true",
                    help="continue from OUT/checkpoint.npz (options not given: the checkpoint's)")
    tr.add_argument("--overwrite", action="store_true",
                    help="replace a checkpoint already in OUT (without it such a run is refused; "
                         "not with --resume)")
    tr.set_defaults(run=_run_train)


def _add_compute_options(p: argparse.ArgumentParser, *,
                         dtype_default: str | None = "float32") -> None:
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu", "auto"),
                   help="cpu (default), gpu, or auto (the GPU when CuPy finds one)")
    p.add_argument("--dtype", default=dtype_default, choices=("float32", "float64"),
                   help="parameter and compute dtype (default float32)")
    p.add_argument("--path", default=None, choices=("reference", "fast"),
                   help="reference (readable numpy) or fast (numba kernels); default: "
                        "$REFNORM_PATH, else fast")


def _device_problem(args: argparse.Namespace) -> str | None:
    """Why ``--device`` cannot be honoured, in one sentence; None when it can."""
    from refnorm.backend import gpu_problem

    if args.device == "cpu" or (args.device == "auto" and gpu_problem() is not None):
        return None
    problem = gpu_problem()
    return None if problem is None else f"--device {args.device}: {problem}"


def _device(args: argparse.Namespace) -> str:
    """``--device`` resolved: "gpu" or "cpu" (auto takes the GPU when the probe finds one)."""
    from refnorm.backend import gpu_available

    if args.device == "auto":
        return "gpu" if gpu_available() else "cpu"
    return str(args.device)


def _use_path(args: argparse.Namespace) -> None:
    """``--path`` for this process and the study's worker processes (REFNORM_PATH)."""
    if getattr(args, "path", None) is not None:
        os.environ["REFNORM_PATH"] = args.path


def _add_study(sub) -> None:
    from refnorm.train.study import JUDGED_FROM, QUICK, StudyConfig

    positive = int_at_least(1)
    grid = StudyConfig()
    st = sub.add_parser(
        "study", help="the micro-batch study: normalizers x batch sizes, with a report",
        description=("Train a grid of normalizers x settings (#devices, #samples per device) "
                     "with the update size fixed, through the data-parallel loop, and write "
                     "report.md with a table, a verdict per claim of the papers (judged over 3 "
                     "seeds or more), and plots. A run that diverges (a NaN or an infinity) "
                     "stops the study with exit 3, before any report is written."))
    st.add_argument("--quick", action="store_true",
                    help="a small grid: 12 runs, about 15 s once the fast kernels are compiled")
    st.add_argument("--methods", type=_name_list, default=None,
                    help=f"comma-separated (default {','.join(grid.methods)}; --quick "
                         f"{','.join(QUICK.methods)})")
    st.add_argument("--batch-sizes", type=_int_list, default=None,
                    help="comma-separated samples per device, each dividing --update-size "
                         f"(default {','.join(map(str, grid.batch_sizes))}; --quick "
                         f"{','.join(map(str, QUICK.batch_sizes))})")
    st.add_argument("--update-size", type=positive, default=None,
                    help=f"samples per update, #devices x #samples per device (default "
                         f"{grid.update_size}; --quick {QUICK.update_size})")
    st.add_argument("--epochs", type=positive, default=None,
                    help=f"(default {grid.epochs}; --quick {QUICK.epochs})")
    st.add_argument("--seeds", type=positive, default=None,
                    help=f"number of seeds (default {len(grid.seeds)}, --quick "
                         f"{len(QUICK.seeds)}); the claims are judged with {JUDGED_FROM} or more")
    st.add_argument("--launcher", default="inprocess", choices=("inprocess", "mpi"),
                    help="run P devices as threads of one process (inprocess, default) or as P "
                         "processes under mpiexec (mpi)")
    st.add_argument("--data", default=None, help="as for train (default digits)")
    st.add_argument("--jobs", type=positive, default=None,
                    help="parallel runs (default: the cores, at most one per run)")
    _add_compute_options(st)
    st.add_argument("--out", type=folder_path, default="runs/study",
                    help="output directory (default runs/study)")
    st.set_defaults(run=_run_study)


def _run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from refnorm.launch import mpi_launch

    prog = "refnorm train"
    launch = mpi_launch()
    # Under mpiexec every rank stops the same way (refnorm.train.loop); rank 0 speaks for all.
    quiet = launch is not None and launch[0] != 0

    def fail(message: str) -> int:
        if not quiet:
            print(f"{prog}: error: {_one_line(message)}", file=sys.stderr)
        return 2

    from refnorm.train.outputs import plotting_problem

    if (problem := _device_problem(args) or plotting_problem("curves.png")) is not None:
        return fail(problem)
    if args.resume and args.overwrite:
        return fail("give --resume (continue the run in --out) or --overwrite (start it again), "
                    "not both")
    given = {dest: getattr(args, dest) for dest in TRAIN_FIELDS
             if getattr(args, dest) is not None}
    if launch is not None:
        if args.devices is not None and args.devices != launch[1]:
            return fail(f"--devices {args.devices} but mpiexec started {launch[1]} processes; "
                        f"give --devices {launch[1]} or leave --devices out under mpiexec")
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            return fail(f"started by mpiexec with {launch[1]} processes, but mpi4py is not "
                        "installed: install the mpi extra (pip install 'refnorm[mpi]')")
        given["devices"] = launch[1]
    try:
        config = _train_config(given, args.out if args.resume else None)
        config = dataclasses.replace(config, device=_device(args))
        _check_applies(given, config.norm)
    except (ValueError, TypeError) as exc:
        return fail(str(exc))
    except Interrupted as stop:  # reading the checkpoint to resume stays interruptible
        if not quiet:
            print(f"{prog}: stopped by {signal_name(stop.signum)} before the first step; "
                  "nothing was saved", file=sys.stderr)
        return exit_status(stop.signum)
    _use_path(args)
    if launch is None:
        return _train(config, args, None, quiet=False)
    from refnorm.sync.comm import MPICommunicator
    from refnorm.train.parallel import gpu_communicator

    try:
        mpi = MPICommunicator()
    except ValueError as exc:  # $REFNORM_SYNC_TIMEOUT
        return fail(str(exc))
    with mpi:
        comm = mpi if config.device == "cpu" else gpu_communicator(mpi)
        status = _train(config, args, comm, quiet=quiet)
        if comm is not mpi:
            comm.finish("training ended")
    return status


# Options that only one kind of normalizer reads (the option's dest -> those norms).
NORM_OPTIONS = {"groups": ("gn",), "sn_inference": ("sn", "syncsn")}


def _check_applies(given: dict, norm: str) -> None:
    """Refuse an option given for a normalizer that does not read it.

    Raises
    ------
    ValueError
        Naming the option, the norms it applies to and the run's norm.
    """
    for dest, norms in NORM_OPTIONS.items():
        if given.get(dest) is not None and norm not in norms:
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} applies to --norm {' or '.join(norms)}; this run's norm is "
                             f"{norm}: leave {flag} out")


def _train_config(given: dict, resume_from: str | None):
    """The TrainConfig of ``given`` options (dest -> value, None when left out): the others
    from the checkpoint in ``resume_from`` when resuming, else their defaults.

    Raises
    ------
    ValueError
        A value TrainConfig refuses, or a checkpoint that cannot be read (CheckpointError).
    """
    from pathlib import Path

    from refnorm.train.checkpoint import CHECKPOINT, read_checkpoint
    from refnorm.train.config import TrainConfig
    from refnorm.train.folder import check_not_busy

    fields: dict = {}
    if resume_from is not None:
        check_not_busy(Path(resume_from))  # a running run's folder: say so, not "no checkpoint"
        saved = read_checkpoint(Path(resume_from) / CHECKPOINT).meta
        config = saved.get("config") if isinstance(saved, dict) else None
        if not isinstance(config, dict):
            raise ValueError(f"checkpoint {Path(resume_from) / CHECKPOINT} has no configuration "
                             "to resume")
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        fields = {k: v for k, v in config.items() if k in known and k != "device"}
        if isinstance(fields.get("widths"), list):
            fields["widths"] = tuple(fields["widths"])
        try:  # a value refused here is the checkpoint's, not the command line's
            TrainConfig(**fields)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"checkpoint {Path(resume_from) / CHECKPOINT} holds a "
                             f"configuration refnorm refuses ({exc}); it was edited or "
                             "written by another version: start the run again with "
                             "--overwrite") from None
    else:
        fields = {TRAIN_FIELDS[k]: v for k, v in TRAIN_DEFAULTS.items()}
    fields.update({TRAIN_FIELDS[k]: v for k, v in given.items() if v is not None})
    if fields.get("weight") == "none":
        fields["weight"] = None
    return TrainConfig(**fields)


def _train(config, args: argparse.Namespace, comm, *, quiet: bool) -> int:
    """Train on this process's devices and turn the outcome into an exit status."""
    from refnorm.train.checkpoint import CheckpointError
    from refnorm.train.finite import NonFinite
    from refnorm.train.folder import OutputFolderError
    from refnorm.train.loop import train

    prog = "refnorm train"

    def say(text: str) -> None:
        if not quiet:
            print(text, file=sys.stderr)

    try:
        result = train(config, out=args.out, resume=args.resume, progress=not quiet,
                       comm=comm, overwrite=args.overwrite)
    except Interrupted as stop:  # before the first step: loading the data or a checkpoint
        if comm is not None:
            comm.finish(f"stopped by {signal_name(stop.signum)} before the first step")
        say(f"{prog}: stopped by {signal_name(stop.signum)} before the first step; "
            "nothing was saved")
        return exit_status(stop.signum)
    except NonFinite as exc:
        say(f"{prog}: {_one_line(exc)}")
        return 3
    except (CheckpointError, OutputFolderError, ValueError, TypeError, OSError) as exc:
        say(f"{prog}: error: {_one_line(exc)}")
        return 2
    if result.interrupted:
        return exit_status(result.signal or signal.SIGINT)
    last = result.history[-1] if result.history else None
    if last and not quiet:
        print(f"final test accuracy {last['test_acc']:.4f} (train {last['train_acc']:.4f}); "
              f"metrics and curves in {args.out}")
    return 0


def _run_study(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import dataclasses

    from refnorm.train.finite import NonFinite
    from refnorm.train.outputs import plotting_problem
    from refnorm.train.study import QUICK, StudyConfig, run_study

    problem = _device_problem(args) or plotting_problem("the report's plots")
    if problem is not None:
        print(f"refnorm study: error: {problem}", file=sys.stderr)
        return 2
    study = QUICK if args.quick else StudyConfig()
    changes: dict = {}
    if args.methods:
        changes["methods"] = args.methods
    if args.batch_sizes:
        changes["batch_sizes"] = args.batch_sizes
    for name in ("update_size", "epochs", "data", "dtype"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    changes["device"] = _device(args)
    changes["launcher"] = args.launcher
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    _use_path(args)
    try:
        study = dataclasses.replace(study, **changes)
        report = run_study(study, args.out, jobs=args.jobs,
                           log=lambda line: print(line, file=sys.stderr))
    except NonFinite as exc:  # one run diverged: as refnorm train, exit 3
        print(f"refnorm study: {_one_line(exc)}; no report was written", file=sys.stderr)
        return 3
    except (ValueError, TypeError, OSError) as exc:
        print(f"refnorm study: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Interrupted (a signal) or a worker's Ctrl-C
        print("refnorm study: interrupted; no report was written", file=sys.stderr)
        return exit_status(getattr(stop, "signum", signal.SIGINT))
    print(f"report: {report}")
    return 0


def _run_gradcheck(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    def fail(message: str) -> int:
        print(f"refnorm gradcheck: error: {message} (see refnorm gradcheck --help)",
              file=sys.stderr)
        return 2

    if args.all and args.names:
        return fail("give NAMEs or --all, not both")
    names = list(registry.names()) if args.all else list(dict.fromkeys(args.names))
    if not names:
        return fail("name at least one normalizer, or pass --all")
    unknown = [n for n in names if n not in registry.names()]
    if unknown:
        return fail(f"unknown normalizer(s) {', '.join(map(repr, unknown))}; expected some of "
                    f"{', '.join(registry.names())}")
    rows = []
    for name in names:
        rows.extend(summarize(check_registered(name, seed=args.seed), args.tolerance))
    if args.json:
        print(json_text(rows))  # a NaN or infinite error as a string: strict JSON
    else:
        print(format_table(rows))
    return 0 if all(row["passed"] for row in rows) else 1


def summarize(results: list[CaseResult], tolerance: float) -> list[dict]:
    """One row per gradient: the worst error over the cases, and each case.

    The error is :mod:`refnorm.gradcheck`'s measure (``GradError.max_rel_error``): the
    deviation from finite differences beyond their noise floor, relative to the gradient's
    scale. Each case also lists the plain deviation, the floor and the ratio without it. Cases
    may differ in their parameters (a layer built without a bias has no ``b``): a gradient's
    row lists the cases that have it.
    """
    gradients = list(dict.fromkeys(g for r in results for g in r.errors))
    rows = []
    for grad in gradients:
        cases = [_case(r, r.errors[grad]) for r in results if grad in r.errors]
        worst = max(c["max_rel_error"] for c in cases)
        rows.append({
            "normalizer": results[0].normalizer,
            "gradient": grad,
            "max_rel_error": worst,
            "noise_ratio": max(c["noise_ratio"] for c in cases),
            "tolerance": tolerance,
            "passed": math.isfinite(worst) and worst <= tolerance,
            "cases": cases,
        })
    return rows


def _case(result: CaseResult, error: GradError) -> dict:
    noise = error.fd_noise
    ratio = error.max_abs_error / noise if noise > 0 else math.inf
    return {
        "shape": list(result.shape),
        "options": result.options,
        "training": result.training,
        "max_rel_error": error.max_rel_error,
        "max_abs_error": error.max_abs_error,
        "fd_noise": noise,
        "noise_ratio": 0.0 if error.max_abs_error == 0.0 else ratio,
        "raw_rel_error": error.raw_rel_error,
    }


def format_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`summarize` rows.

    "error" is the measure compared with the tolerance; "deviation / noise" is the worst
    ``max|analytic - numeric|`` over the finite-difference noise floor (below 1: within it).
    """
    header = ("normalizer", "gradient", "error", "deviation/noise", "tolerance", "cases",
              "status")
    lines = [header]
    for row in rows:
        lines.append((
            row["normalizer"],
            row["gradient"],
            f"{row['max_rel_error']:.2e}",
            f"{row['noise_ratio']:.2f}",
            f"{row['tolerance']:g}",
            str(len(row["cases"])),
            "ok" if row["passed"] else "FAIL",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    failed = sum(not row["passed"] for row in rows)
    text.append("")
    if failed:
        text.append(f"{failed} of {len(rows)} gradients exceed the tolerance")
    else:
        text.append(f"all {len(rows)} gradients within the tolerance")
    return "\n".join(text)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
