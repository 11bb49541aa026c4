"""``refnorm conform``: fingerprint an implementation from the command line.

``refnorm conform module.path:factory --method bn [--channels C] [--args "2, 6"] [--json]``
imports ``factory`` from ``module.path``, calls it (with ``--args`` as positional
arguments, default ``(C,)``) and fingerprints what it returns (a torch module, a callable or a
stateful object, see :mod:`refnorm.testing.adapters`). Exit status 0 when the
implementation matches a refnorm convention, 1 when it matches none, 2 on a usage error,
when building the layer from the target and ``--args`` fails, or when the layer fails on the
probe inputs (the error named in one line).

Wiring into ``refnorm/cli.py`` is one line: ``conform.add_parser(sub)`` with
``from refnorm.testing import cli as conform``; ``run(args)`` is set as the sub-command's
``run``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from refnorm.argtypes import OneLineParser, int_at_least
from refnorm.testing.reference import METHODS


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``conform`` sub-command to ``subparsers``; return its parser."""
    p = subparsers.add_parser(
        "conform", help="name the conventions of your own normalization layer",
        description=("Probe an implementation with designed inputs and report which "
                     "conventions it follows (variance estimator, eps placement and value, "
                     "momentum, running variance, GN group layout, SN ratios, WS std, WN "
                     "eps) and the refnorm options under which it matches. Exits 0 when it "
                     "matches refnorm, 1 when it matches no known convention, 2 when the layer "
                     "cannot be built from the target and --args or fails on the probes."))
    p.add_argument("target", metavar="MODULE:FACTORY",
                   help="e.g. torch.nn:BatchNorm2d or mypkg.layers:make_bn")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--channels", type=int_at_least(1), default=None,
                   help="C for the factory (when --args is not given) and for the probes "
                        "(default 4, 12 for gn; the probes take the layer's own C where it "
                        "has one)")
    p.add_argument("--args", default=None,
                   help="the factory's positional arguments as a Python literal, e.g. "
                        "'3, 12' for torch.nn:GroupNorm; '' for none")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=lambda args, parser=None: run(args))
    return p


def _load(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not attr or not module_name:
        raise ValueError(f"target must be MODULE:FACTORY (e.g. torch.nn:BatchNorm2d); got "
                         f"{target!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the user's own module in cwd
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: whatever its import raises is the answer
        missing = exc.name if isinstance(exc, ImportError) else None
        extra = ("; PyTorch's layers need the torch extra (pip install 'refnorm[torch]')"
                 if (missing or "").partition(".")[0] == "torch" else "")
        raise ValueError(f"cannot import the module {module_name!r} of {target!r} "
                         f"({type(exc).__name__}: {exc}){extra}") from None
    for i, part in enumerate(attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = ".".join([module_name, *attr.split(".")[:i]])
            raise ValueError(f"{where} has no attribute {part!r} (from {target!r})") from None
    return obj


def _call(factory: Any, call_args: tuple, target: str) -> Any:
    """``factory(*call_args)``; any error it raises as one ValueError naming the call."""
    shown = f"{target}({', '.join(map(repr, call_args))})"
    if not callable(factory):
        raise ValueError(f"{target} is a {type(factory).__name__}, not a class or function "
                         f"that builds a layer")
    try:
        return factory(*call_args)
    except Exception as exc:  # the user's code: whatever it raises is the answer
        raise ValueError(f"building the layer as {shown} failed: {type(exc).__name__}: "
                         f"{exc}") from None


def run(args: argparse.Namespace) -> int:
    """Run ``conform`` for parsed ``args``; return the exit status."""
    from refnorm.testing.probes import fingerprint

    def fail(message: str) -> int:
        print(f"refnorm conform: error: {' '.join(message.split())}", file=sys.stderr)
        return 2

    try:
        factory = _load(args.target)
    except ValueError as exc:
        return fail(str(exc))
    C = args.channels or (12 if args.method == "gn" else 4)
    try:
        if args.args is None:
            call_args: tuple = (C,)
        elif not args.args.strip():  # --args "": a factory that takes no arguments
            call_args = ()
        else:
            call_args = ast.literal_eval(f"({args.args},)")
            if not isinstance(call_args, tuple):  # a ")" and a "#" in --args closed it early
                raise ValueError("not a comma-separated list of values")
    except (ValueError, SyntaxError, TypeError) as exc:  # TypeError: e.g. "{[]: 1}"
        return fail(f"--args: expected the factory's positional arguments as a Python "
                    f"literal (e.g. '3, 12'); got {args.args!r} ({type(exc).__name__}: {exc})")
    try:
        impl = _call(factory, call_args, args.target)
    except ValueError as exc:  # the hint only where other arguments could help
        hint = (" (give the factory's positional arguments with --args)"
                if args.args is None and callable(factory) else "")
        return fail(f"{exc}{hint}")
    try:
        report = fingerprint(args.method, impl, num_channels=args.channels)
    except Exception as exc:  # the user's layer failed on refnorm's probe inputs
        channels = f" with --channels {args.channels}" if args.channels else ""
        return fail(f"running the layer built by {args.target}{channels} on the --method "
                    f"{args.method} probes failed: {type(exc).__name__}: {exc}")
    print(report.to_json() if args.json else str(report))
    return 0 if report.match is not None else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``refnorm conform`` as a program of its own (``python -m refnorm.testing.cli
    MODULE:FACTORY --method M ...``, with or without the word ``conform``)."""
    parser = OneLineParser(prog="refnorm")  # one-line errors, as refnorm conform's
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "conform":
        argv = ["conform", *argv]
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
