"""Importing refnorm needs numpy only: no CuPy, MPI, Jupyter or plotting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from refnorm.backend import array_namespace, to_numpy


def test_import_pulls_in_no_optional_dependency():
    code = (
        "import sys, refnorm, refnorm.gradcheck, refnorm.cli\n"
        "heavy = {'cupy', 'mpi4py', 'IPython', 'jupyter_client', 'matplotlib', 'numba',"
        " 'array_api_strict', 'hypothesis'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_array_namespace():
    import numpy as np

    assert array_namespace(np.ones(2), None, np.zeros(1)) is np
    with pytest.raises(TypeError, match="expected an array"):
        array_namespace([1.0])
    with pytest.raises(TypeError, match="at least one array"):
        array_namespace(None)


def test_to_numpy_from_array_api_strict():
    strict = pytest.importorskip("array_api_strict")
    import numpy as np

    a = strict.asarray([[1.0, 2.0]])
    np.testing.assert_array_equal(to_numpy(a), [[1.0, 2.0]])
