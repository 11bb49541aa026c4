"""``refnorm conform``: fingerprint an implementation from the command line.

``refnorm conform module.path:factory --method bn [--channels C] [--args "2, 6"] [--json]``
imports ``factory`` from ``module.path``, calls it (with ``--args`` as positional
arguments, default ``(C,)``) and fingerprints what it returns (a torch module, a callable or a
stateful object, see :mod:`refnorm.testing.adapters`). Exit status 0 when the
implementation matches a refnorm convention, 1 when it matches none, 2 on a usage error.

Wiring into ``refnorm/cli.py`` is one line: ``conform.add_parser(sub)`` with
``from refnorm.testing import cli as conform``; ``run(args)`` is set as the sub-command's
``run``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from refnorm.testing.reference import METHODS


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``conform`` sub-command to ``subparsers``; return its parser."""
    p = subparsers.add_parser(
        "conform", help="name the conventions of your own normalization layer",
        description=("Probe an implementation with designed inputs and report which "
                     "conventions it follows (variance estimator, eps placement and value, "
                     "momentum, running variance, GN group layout, SN ratios, WS std, WN "
                     "eps) and the refnorm options under which it matches. Exits 0 when it "
                     "matches refnorm, 1 when it matches no known convention."))
    p.add_argument("target", metavar="MODULE:FACTORY",
                   help="e.g. torch.nn:BatchNorm2d or mypkg.layers:make_bn")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--channels", type=int, default=None,
                   help="C passed to the factory when --args is not given (default 4, "
                        "12 for gn)")
    p.add_argument("--args", default=None,
                   help="the factory's positional arguments as a Python literal, e.g. "
                        "'3, 12' for torch.nn:GroupNorm")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=lambda args, parser=None: run(args))
    return p


def _load(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not attr or not module_name:
        raise ValueError(f"target must be MODULE:FACTORY (e.g. torch.nn:BatchNorm2d); got "
                         f"{target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import the module {module_name!r} of {target!r} "
                         f"({type(exc).__name__}: {exc})") from None
    for i, part in enumerate(attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = ".".join([module_name, *attr.split(".")[:i]])
            raise ValueError(f"{where} has no attribute {part!r} (from {target!r})") from None
    return obj


def run(args: argparse.Namespace) -> int:
    """Run ``conform`` for parsed ``args``; return the exit status."""
    from refnorm.testing.probes import fingerprint

    try:
        factory = _load(args.target)
        C = args.channels or (12 if args.method == "gn" else 4)
        call_args = ast.literal_eval(f"({args.args},)") if args.args else (C,)
    except (ValueError, SyntaxError) as exc:
        print(f"refnorm conform: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    impl = factory(*call_args)
    report = fingerprint(args.method, impl, num_channels=args.channels)
    print(report.to_json() if args.json else str(report))
    return 0 if report.match is not None else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``refnorm conform`` as a program of its own (``python -m refnorm.testing.cli``)."""
    parser = argparse.ArgumentParser(prog="refnorm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
