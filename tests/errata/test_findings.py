"""What the errata modules share (refnorm/errata/findings.py): the measure and the tables."""

from __future__ import annotations

import re

import numpy as np
import pytest

from refnorm.errata import findings, sn_appendix, sn_multi_gpu, ws_theory

TABLES = {
    "sn_appendix": lambda: sn_appendix.check_appendix(0),
    "sn_multi_gpu": lambda: sn_multi_gpu.check_multi_gpu(0, (2, 3)),
    "ws_theory": lambda: ws_theory.check_ws_theory(0),
}


def _cells(row: str) -> list[str]:
    """Split a Markdown table row on the pipes that are not escaped."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_row_of_every_errata_table_has_all_cells(name):
    rows = findings.to_markdown(TABLES[name]()).splitlines()
    header = _cells(rows[0])
    assert len(header) == 5
    for row in rows[2:]:
        cells = _cells(row)
        assert len(cells) == len(header), row
        assert all(cells), row  # no cell left empty by a stray pipe


def test_a_pipe_in_a_quantity_is_escaped():
    table = findings.to_markdown([findings.Finding("Eq. (1)", "||g||^2", True, 0.0, "a | b")])
    row = table.splitlines()[2]
    assert r"\|\|g\|\|^2" in row and r"a \| b" in row
    assert len(_cells(row)) == 5


def test_finite_differences_of_a_known_function():
    # f(u) = sum u^3: gradient 3 u^2, Hessian diag(6 u). Central differences are exact for
    # cubics up to rounding (step^2 f''' / 6 = step^2 for the gradient; 1e-6 relative).
    u = np.array([0.5, -1.0, 2.0])
    np.testing.assert_allclose(findings.fd_gradient(lambda v: np.sum(v**3), u), 3 * u**2,
                               rtol=1e-6)
    np.testing.assert_allclose(findings.fd_jacobian(lambda v: 3 * v**2, u), np.diag(6 * u),
                               atol=1e-6)


def test_relative_error_broadcasts_a_printed_scalar():
    assert findings.relative(2.0, np.array([2.0, 2.0])) == 0.0
    assert findings.relative(1.0, np.array([2.0, 2.0])) == pytest.approx(0.5)


def test_agrees_means_a_relative_error_below_one_in_a_million():
    """The errata page: "agrees" means a max relative error below 1e-6, the gradcheck
    tolerance. A printed formula off by 1e-5 of its value disagrees; one at rounding agrees."""
    assert findings.finding("Eq. (7)", "dL/dsigma^2", 1e-5, "").agrees is False
    assert findings.finding("Eq. (7)", "dL/dsigma^2", 2e-6, "").agrees is False
    assert findings.finding("Eq. (7)", "dL/dsigma^2", 5e-7, "").agrees is True


def test_the_table_prints_small_errors_in_scientific_notation():
    """An agreeing formula's error (~1e-11) is shown as such, not rounded away to 0.0."""
    table = findings.to_markdown([findings.Finding("Eq. (7)", "dL/dsigma^2", True, 3.2e-11,
                                                   "agrees")])
    assert "| 3.2e-11 |" in table.splitlines()[2], table
