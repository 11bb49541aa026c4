"""Argument types for the command lines (``refnorm``, ``refnorm bench``, ``refnorm conform``,
``refnorm lessons``): each parses one string or raises ``argparse.ArgumentTypeError``, which
argparse reports as ``argument --NAME: <message>``.

On the lowest floor of the package's imports, so that every command line can share them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``refnorm train: error: argument --seed: ...``, exit 2
    (argparse would print the whole usage first), and no abbreviated options: ``refnorm
    study --seed 5`` is an error, not ``--seeds 5`` (five times the runs). Its subcommands'
    parsers are of this class too."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{"allow_abbrev": False, **kwargs})

    def print_help(self, file: Any = None) -> None:
        """As argparse's, but a write to a reader that left raises (argparse ignores it, and
        ``--help | head -0`` exited 0 where every other output ends with 141)."""
        (file or sys.stdout).write(self.format_help())

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``low``, written in the digits 0-9 alone (Python's ``int``
    would also take ``" 3"``, ``"3_0"`` for 30 and other scripts' digits)."""
    def parse(text: str) -> int:
        value = int(text) if re.fullmatch(r"[+-]?[0-9]+", text) else low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}; got {text!r}")
        return value

    return parse


def folder_path(text: str) -> str:
    """An argparse type: a non-empty path (an empty one would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            f"expected a folder path; got {'an empty string' if not text else repr(text)}")
    return text


def json_text(value: Any) -> str:
    """``value`` as JSON text, indented, with every infinite or NaN float (at any depth) as the
    string ``"inf"``, ``"-inf"`` or ``"nan"``: JSON has no such numbers, and ``json.dumps``
    writes ``Infinity``, which parsers other than Python's refuse."""
    def finite(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: finite(item) for k, item in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(item) for item in v]
        return v

    return json.dumps(finite(value), indent=2, default=str)
