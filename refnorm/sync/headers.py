"""Self-describing collectives: what each rank says it is doing, checked before any payload.

Before the arrays of an all-reduce cross between ranks, every rank contributes a small
:class:`CallHeader` — the operation, the layer, how many times this rank has made this call
(its step), the shapes and dtypes — and every rank receives every rank's header. Only when
all headers agree does the payload move; otherwise every rank raises the same error, which
lists every rank's call. A rank that will make no more collectives sends a *leave* header
instead (saying how it ended and what it last did), so that a peer waiting in a collective
learns at once that nobody is coming, rather than waiting forever.

This module holds the header, the agreement rule (:func:`check_headers`), each rank's
running record of its calls (:class:`CallLog`), and the three helpers synchronized layers
use to describe themselves (:func:`allreduce`, :func:`note_local_call`, :func:`layer_label`).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from refnorm.backend import Array

COLLECTIVE, LEAVE = "collective", "leave"
HEADER_BYTES = 4096  # fixed size, so that MPI can gather headers without a size exchange
_TEXT_LIMIT = 600    # characters kept of a free-text field when a header would not fit

Signature = tuple[tuple[tuple[int, ...], str], ...]


def signature(arrays: Sequence[Array]) -> Signature:
    """((shape, dtype), ...) of ``arrays``."""
    return tuple((tuple(int(n) for n in a.shape), str(a.dtype)) for a in arrays)


@dataclass(frozen=True)
class CallHeader:
    """One rank's description of the collective it entered, or of its leaving.

    Attributes
    ----------
    rank : int
    kind : {"collective", "leave"}
    seq : int
        Collectives this rank has entered on this communicator, this one included (for a
        leave header: those it entered before leaving).
    op : str
        What the collective is for, e.g. ``"syncbn forward (count, sum)"``.
    layer : str
        Which layer makes it (``"syncbn#0"``: the first syncbn layer on this communicator),
        or ``""``.
    step : int
        How many times this rank has made this (op, layer) call, this one included.
    arrays : ((shape, dtype), ...)
    detail : str
        For a leave header: how the rank ended and its last calls.
    """

    rank: int
    kind: str
    seq: int
    op: str
    layer: str
    step: int
    arrays: Signature
    detail: str = ""

    def call(self) -> tuple[str, int, str, str, int]:
        """What must agree across ranks before the arrays are compared."""
        return (self.kind, self.seq, self.op, self.layer, self.step)

    def where(self) -> str:
        """The call in words, without the rank."""
        if self.kind == LEAVE:
            return self.detail
        of = f" of layer {self.layer}" if self.layer else ""
        shapes = ", ".join(f"{shape} {dtype}" for shape, dtype in self.arrays)
        return f"collective #{self.seq}: {self.op}{of}, step {self.step}, arrays [{shapes}]"

    def describe(self) -> str:
        verb = "" if self.kind == LEAVE else "entered "
        return f"rank {self.rank} {verb}{self.where()}"

    def to_bytes(self) -> bytes:
        """JSON, at most :data:`HEADER_BYTES`; long fields shrink to a digest, not a crash."""
        data = json.dumps(asdict(self)).encode()
        if len(data) <= HEADER_BYTES:
            return data
        digest = hashlib.sha1(repr(self.arrays).encode()).hexdigest()[:16]
        short = replace(self, op=self.op[:_TEXT_LIMIT], layer=self.layer[:_TEXT_LIMIT],
                        detail=self.detail[:_TEXT_LIMIT],
                        arrays=(((len(self.arrays),), f"arrays with sha1 {digest}"),))
        return json.dumps(asdict(short)).encode()[:HEADER_BYTES]

    @classmethod
    def from_bytes(cls, data: bytes) -> CallHeader:
        fields = json.loads(data.rstrip(b"\0").decode())
        fields["arrays"] = tuple((tuple(shape), dtype) for shape, dtype in fields["arrays"])
        return cls(**fields)


def check_headers(headers: Sequence[CallHeader]) -> str | None:
    """None when every rank made the same call (or every rank left); else the message.

    The message is the same on every rank (it is built from the same headers), names the
    kind of disagreement first, then every rank's call.
    """
    if all(h.kind == LEAVE for h in headers):
        return None
    first = headers[0]
    if all(h.call() == first.call() for h in headers):
        if all(h.arrays == first.arrays for h in headers):
            return None
        headline = ("ranks passed different arrays (shapes, dtypes) to the same collective "
                    "and would deadlock or mix data")
    elif any(h.kind == LEAVE for h in headers):
        left = [h.rank for h in headers if h.kind == LEAVE]
        inside = [h.rank for h in headers if h.kind == COLLECTIVE]
        headline = (f"{_ranks(left)} left while {_ranks(inside)} entered a collective that "
                    "can never complete (uneven batches, a rank in eval mode, or an early "
                    "exit)")
    else:
        headline = ("ranks entered different collectives (a mismatch of training/eval modes, "
                    "layers or steps) and would deadlock or mix data")
    calls = "; ".join(h.describe() for h in headers)
    return f"refnorm.sync: {headline}. {calls}"


def _ranks(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


class CallLog:
    """One rank's record of its calls on one communicator: numbers its collectives and steps,
    and remembers what it did last, for its headers and its leave message."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.seq = 0
        self.steps: Counter[tuple[str, str]] = Counter()
        self.local_calls: Counter[tuple[str, str]] = Counter()
        self.last_collective: CallHeader | None = None
        self.last_local = ""

    def enter(self, arrays: Sequence[Array], op: str, layer: str) -> CallHeader:
        """The header of the next collective (and count it)."""
        self.seq += 1
        self.steps[(op, layer)] += 1
        header = CallHeader(self.rank, COLLECTIVE, self.seq, op, layer,
                            self.steps[(op, layer)], signature(arrays))
        self.last_collective = header
        return header

    def note(self, what: str, layer: str) -> None:
        """A call that needs no collective (e.g. a synchronized layer in eval mode)."""
        self.local_calls[(what, layer)] += 1
        of = f" of layer {layer}" if layer else ""
        self.last_local = f"{what}{of}, call {self.local_calls[(what, layer)]}"

    def leave(self, status: str) -> CallHeader:
        """The header that says this rank makes no more collectives, and where it was."""
        last = self.last_collective
        if last is None:
            after = "before any collective"
        else:
            of = f" of layer {last.layer}" if last.layer else ""
            after = f"after collective #{last.seq} ({last.op}{of}, step {last.step})"
        detail = f"left ({status}) {after}"
        if self.last_local:
            detail += f"; its last call without a collective: {self.last_local}"
        return CallHeader(self.rank, LEAVE, self.seq, "leave", "", 0, (), detail)


# -- what synchronized layers call ---------------------------------------------------------------


def array_list(arrays: Sequence[Array]) -> list[Array]:
    """``arrays``, the argument of ``allreduce_sum``, as a list.

    Raises
    ------
    TypeError
        If ``arrays`` is one array: iterating it would all-reduce its rows as separate arrays.
    """
    if hasattr(arrays, "shape"):
        raise TypeError(f"allreduce_sum takes a list of arrays; got one array of shape "
                        f"{tuple(arrays.shape)} (pass [a])")
    return list(arrays)


def allreduce(comm: Any, arrays: Sequence[Array], *, op: str, layer: str = "") -> list[Array]:
    """``comm.allreduce_sum(arrays)``, described by ``op`` and ``layer`` for the header check.

    A communicator that does not describe its calls (not a
    :class:`~refnorm.sync.comm.Communicator`, e.g. a wrapper that logs calls) is called with
    the arrays only.
    """
    if getattr(comm, "describes_calls", False):
        return comm.allreduce_sum(arrays, op=op, layer=layer)
    return comm.allreduce_sum(arrays)


def note_local_call(comm: Any, what: str, layer: str) -> None:
    """Record on ``comm`` a synchronized layer's call that makes no collective (eval mode),
    so that if this rank leaves while a peer waits, the message says what it was doing."""
    if getattr(comm, "describes_calls", False):
        comm.note(what, layer)


_labels: weakref.WeakKeyDictionary[Any, weakref.WeakKeyDictionary[Any, str]] = (
    weakref.WeakKeyDictionary())


def layer_label(comm: Any, layer: Any, kind: str) -> str:
    """``"<kind>#<i>"``: ``layer`` is the i-th layer of this kind to use ``comm``.

    Ranks running the same model in the same order give each layer the same label, so a
    header naming another layer shows that the ranks took different paths.
    """
    try:
        mine = _labels.setdefault(comm, weakref.WeakKeyDictionary())
        if layer not in mine:
            mine[layer] = f"{kind}#{sum(v.startswith(kind + '#') for v in mine.values())}"
        return mine[layer]
    except TypeError:  # an object that cannot be weakly referenced: no ordinal
        return kind
