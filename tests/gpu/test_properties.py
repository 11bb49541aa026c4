"""The normalizers' property suite (tests/norms/test_properties.py) on CuPy arrays.

Every test of that module is collected here too, with ``xp`` = CuPy (tests/gpu/conftest.py):
the reference path on the GPU, and its gradients against finite differences in float64 on
the GPU (``check_vjp`` evaluates the forward with CuPy inputs and reads the outputs back).
The tolerances are that module's own.
"""

from __future__ import annotations

import pytest

from tests.conftest import gpu_skip
from tests.norms.test_properties import *  # noqa: F403 - the suite, collected again here

pytestmark = [pytest.mark.gpu, gpu_skip()]
