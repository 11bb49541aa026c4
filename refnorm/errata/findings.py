"""What every errata module shares: the finding record, the error measure, finite
differences and the Markdown table the docs' errata page shows.

The error measure and the finite differences are :mod:`refnorm.gradcheck`'s
(:func:`~refnorm.gradcheck.relative_error`, :func:`~refnorm.gradcheck.numerical_vjp`), so
"agrees" on the errata page means what it means for every backward refnorm checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from refnorm.gradcheck import numerical_vjp, relative_error

AGREES = 1e-6  # the gradcheck tolerance: a printed formula agrees below it


@dataclass(frozen=True)
class Finding:
    """One printed equation checked against finite differences.

    Attributes
    ----------
    equation : str
        Which printed equation (and which reading of it), e.g. "Eq. (15), dot reading".
    quantity : str
        What it claims to compute.
    agrees : bool
        Whether the printed formula matches the truth within the module's tolerance.
    max_rel_error : float
        The measured error (:func:`relative`).
    note : str
        What the verdict means.
    """

    equation: str
    quantity: str
    agrees: bool
    max_rel_error: float
    note: str


def relative(printed, truth) -> float:
    """gradcheck's max relative error of ``printed`` against ``truth``, in float64.

    Scalars are compared as one-element arrays; ``printed`` is broadcast to ``truth``'s
    shape (a printed per-channel sum against per-(n, c) truths, for instance).
    """
    truth = np.atleast_1d(np.asarray(truth, dtype=np.float64))
    printed = np.broadcast_to(np.asarray(printed, dtype=np.float64), truth.shape)
    return relative_error(printed, truth).max_rel_error


def finding(equation: str, quantity: str, error: float, note: str, *,
            tol: float = AGREES) -> Finding:
    """A :class:`Finding` whose verdict is ``error < tol``."""
    return Finding(equation, quantity, bool(error < tol), float(error), note)


def fd_gradient(f: Callable[[np.ndarray], float], u: np.ndarray, *,
                step: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of a scalar function ``f(u)``, shape of ``u``."""
    return numerical_vjp(lambda u: np.asarray(f(u)), {"u": u}, np.float64(1.0), "u", step=step)


def fd_jacobian(grad: Callable[[np.ndarray], np.ndarray], u: np.ndarray, *,
                step: float = 1e-5) -> np.ndarray:
    """Central differences of an exact gradient function: the Hessian (I, I), symmetrized.

    Row i is the finite-difference gradient of ``grad(u)[i]``.
    """
    rows = [numerical_vjp(lambda u: grad(u), {"u": u}, np.eye(u.size)[i], "u", step=step)
            for i in range(u.size)]
    hess = np.stack(rows)
    return 0.5 * (hess + hess.T)


def _cell(text: str) -> str:
    """A table cell: a literal ``|`` (as in ``||dL/dW||^2``) would end the cell."""
    return str(text).replace("|", "\\|")


def to_markdown(findings: list[Finding]) -> str:
    """A Markdown table of findings, one row each."""
    lines = ["| equation | quantity | printed formula | max rel. error vs finite differences "
             "| note |", "|---|---|---|---|---|"]
    for f in findings:
        verdict = "agrees" if f.agrees else "**disagrees**"
        cells = (f.equation, f.quantity, verdict, f"{f.max_rel_error:.1e}", f.note)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)
