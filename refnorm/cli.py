"""The ``refnorm`` command: ``refnorm gradcheck [NAME ... | --all] [--json]``.

Later subcommands (``train``, ``study``, ``bench``) join here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

from refnorm import registry
from refnorm.gradcheck import CaseResult, check_registered

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
            "Check each named normalizer's backward (for x and every parameter) against "
            "central finite differences of a vector-Jacobian product in float64, with a "
            "random upstream gradient, on a few shapes and modes. Exits 1 if any max "
            "relative error exceeds the tolerance."
        ),
    )
    gc.add_argument("names", nargs="*", metavar="NAME",
                    help=f"normalizers to check: {', '.join(registry.names())}")
    gc.add_argument("--all", action="store_true", help="check every registered normalizer")
    gc.add_argument("--json", action="store_true",
                    help="print JSON: one object per normalizer and gradient")
    gc.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                    help="largest acceptable max relative error (default: %(default)g)")
    gc.add_argument("--seed", type=int, default=0, help="seed for inputs and upstream gradients")
    gc.set_defaults(run=_run_gradcheck)
    return parser


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
    """One row per gradient: the worst max relative error over the cases, and each case.

    Cases may differ in their parameters (a layer built without a bias has no ``b``): a
    gradient's row lists the cases that have it.
    """
    gradients = list(dict.fromkeys(g for r in results for g in r.errors))
    rows = []
    for grad in gradients:
        cases = [
            {
                "shape": list(r.shape),
                "options": r.options,
                "training": r.training,
                "max_rel_error": r.errors[grad].max_rel_error,
            }
            for r in results
            if grad in r.errors
        ]
        worst = max(c["max_rel_error"] for c in cases)
        rows.append({
            "normalizer": results[0].normalizer,
            "gradient": grad,
            "max_rel_error": worst,
            "tolerance": tolerance,
            "passed": math.isfinite(worst) and worst <= tolerance,
            "cases": cases,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`summarize` rows."""
    header = ("normalizer", "gradient", "max rel error", "tolerance", "cases", "status")
    lines = [header]
    for row in rows:
        lines.append((
            row["normalizer"],
            row["gradient"],
            f"{row['max_rel_error']:.2e}",
            f"{row['tolerance']:.0e}",
            str(len(row["cases"])),
            "ok" if row["passed"] else "FAIL",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
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
