"""The ``refnorm`` command: ``gradcheck``, ``train`` and ``study``.

- ``refnorm gradcheck [NAME ... | --all] [--json]`` — every backward against finite differences;
- ``refnorm train ...`` — train the conv-net with a chosen normalizer (:mod:`refnorm.train`);
- ``refnorm study [--quick]`` — the micro-batch study and its report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from refnorm import registry
from refnorm.gradcheck import CaseResult, GradError, check_registered

DEFAULT_TOLERANCE = 1e-6


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.run(args, parser)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    gc.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                    help="largest acceptable error beyond the noise floor, relative to the "
                         "gradient's scale (default: %(default)g)")
    gc.add_argument("--seed", type=int, default=0, help="seed for inputs and upstream gradients")
    gc.set_defaults(run=_run_gradcheck)
    _add_train(sub)
    _add_study(sub)
    return parser


def _add_train(sub) -> None:
    tr = sub.add_parser(
        "train", help="train the small conv-net with a chosen normalizer",
        description=("Train refnorm's conv-net. The normalizers see micro-batches of "
                     "--batch-size samples; each update accumulates --accumulation of them. "
                     "Writes metrics.csv, metrics.json, curves.png and checkpoint.npz (every "
                     "epoch, atomically) to --out; --resume continues a run bit-identically; "
                     "Ctrl-C saves a checkpoint and exits."))
    tr.add_argument("--data", default="digits",
                    help="digits (embedded), mnist:DIR (IDX files) or cifar10:DIR (python batches)")
    tr.add_argument("--norm", default="bn", help="none, bn, in, ln, gn, sn, syncbn, syncsn")
    tr.add_argument("--weight", default=None, help="ws, wn, np or trelu (default: plain conv)")
    tr.add_argument("--batch-size", type=int, default=32, help="micro-batch size (default 32)")
    tr.add_argument("--accumulation", type=int, default=1,
                    help="micro-batches per update (default 1)")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--lr", type=float, default=0.05)
    tr.add_argument("--weight-decay", type=float, default=5e-4)
    tr.add_argument("--schedule", default="cosine", help="cosine, linear or constant")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--groups", type=int, default=4, help="GN groups (default 4)")
    tr.add_argument("--sn-inference", default="batch_average",
                    help="batch_average (the paper's) or moving_average")
    tr.add_argument("--out", default="runs/train", help="output directory (default runs/train)")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
    tr.set_defaults(run=_run_train)


def _add_study(sub) -> None:
    st = sub.add_parser(
        "study", help="the micro-batch study: normalizers x batch sizes, with a report",
        description=("Train a grid of normalizers x per-device batch sizes (accumulation keeps "
                     "the update size fixed) and write report.md with a table, a verdict per "
                     "claim of the papers, and plots."))
    st.add_argument("--quick", action="store_true", help="a small grid (under 2 minutes)")
    st.add_argument("--methods", default=None,
                    help="comma-separated, e.g. bn,gn,sn,gn+ws,ln,wn (default: all of these)")
    st.add_argument("--batch-sizes", default=None, help="comma-separated, e.g. 2,4,16,64")
    st.add_argument("--update-size", type=int, default=None)
    st.add_argument("--epochs", type=int, default=None)
    st.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    st.add_argument("--data", default=None, help="as for train (default digits)")
    st.add_argument("--jobs", type=int, default=None, help="parallel runs (default: cores)")
    st.add_argument("--out", default="runs/study", help="output directory (default runs/study)")
    st.set_defaults(run=_run_study)


def _run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from refnorm.train.trainer import CheckpointError, NonFiniteLoss, TrainConfig, train

    try:
        config = TrainConfig(data=args.data, norm=args.norm, weight=args.weight,
                             batch_size=args.batch_size, accumulation=args.accumulation,
                             epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                             schedule=args.schedule, seed=args.seed, num_groups=args.groups,
                             sn_inference=args.sn_inference)
        print(f"training {config.describe()} -> {args.out}", file=sys.stderr)
        result = train(config, out=args.out, resume=args.resume)
    except NonFiniteLoss as exc:
        print(f"refnorm train: {exc}", file=sys.stderr)
        return 3
    except (CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"refnorm train: error: {exc}", file=sys.stderr)
        return 2
    if result.interrupted:
        return 130
    last = result.history[-1] if result.history else None
    if last:
        print(f"final test accuracy {last['test_acc']:.4f} (train {last['train_acc']:.4f}); "
              f"metrics and curves in {args.out}")
    return 0


def _run_study(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import dataclasses

    from refnorm.train.study import QUICK, StudyConfig, run_study

    study = QUICK if args.quick else StudyConfig()
    changes: dict = {}
    if args.methods:
        changes["methods"] = tuple(m.strip() for m in args.methods.split(","))
    if args.batch_sizes:
        changes["batch_sizes"] = tuple(int(b) for b in args.batch_sizes.split(","))
    for name in ("update_size", "epochs", "data"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    changes["seeds"] = tuple(range(args.seeds))
    try:
        study = dataclasses.replace(study, **changes)
        report = run_study(study, args.out, jobs=args.jobs,
                           log=lambda line: print(line, file=sys.stderr))
    except (ValueError, FileNotFoundError) as exc:
        print(f"refnorm study: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {report}")
    return 0


def _run_gradcheck(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.all and args.names:
        parser.error("gradcheck: give NAMEs or --all, not both")
    names = list(registry.names()) if args.all else args.names
    if not names:
        parser.error("gradcheck: name at least one normalizer, or pass --all")
    unknown = [n for n in names if n not in registry.names()]
    if unknown:
        parser.error(
            f"gradcheck: unknown normalizer(s) {', '.join(unknown)}; "
            f"expected some of {', '.join(registry.names())}"
        )
    rows = []
    for name in names:
        rows.extend(summarize(check_registered(name, seed=args.seed), args.tolerance))
    if args.json:
        print(json.dumps(rows, indent=2))
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
            f"{row['tolerance']:.0e}",
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
