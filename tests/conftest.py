"""Shared test configuration: hypothesis profiles and the array backends the suite runs over.

Profiles (select with HYPOTHESIS_PROFILE, default ``ci``):

- ``ci``: hypothesis's own ``ci`` profile (derandomized, no deadline, no example database)
  with a bounded number of examples so the whole suite stays within a few minutes on 2 cores;
- ``thorough``: ten times the examples, for a deeper local run. It must pass as ``ci`` does:
  the property tests draw array values element by element (``hypothesis.extra.numpy``, see
  ``tests/core/strategies.py``) and derive each tolerance from the drawn case, so the rarer
  cases a longer run finds (a group of two close values, a constant array) are covered by
  the same bounds instead of by luck.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("ci", parent=settings.get_profile("ci"), max_examples=25)
settings.register_profile("thorough", parent=settings.get_profile("ci"), max_examples=250)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _backends():
    yield pytest.param(np, id="numpy")
    try:
        import array_api_strict
    except ImportError:  # pragma: no cover - the test extra installs it
        yield pytest.param(None, id="array_api_strict",
                           marks=pytest.mark.skip(reason="array_api_strict not installed"))
    else:
        yield pytest.param(array_api_strict, id="array_api_strict")


BACKENDS = list(_backends())


@pytest.fixture(params=BACKENDS, scope="session")
def xp(request):
    """The array namespace a test runs its inputs in: numpy, then array_api_strict."""
    return request.param


def gpu_skip(devices: int = 1) -> pytest.MarkDecorator:
    """A ``skipif`` mark for the ``gpu``-marked tests (the marker is registered in
    pyproject.toml): skip, with refnorm.backend's one-line reason, without a usable GPU or
    with fewer than ``devices`` of them. ``pytest -m gpu`` runs only those tests."""
    from refnorm.backend import gpu_problem

    problem = gpu_problem()
    if problem is None and devices > 1:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        if count < devices:
            problem = f"needs {devices} GPUs; CuPy sees {count}"
    return pytest.mark.skipif(problem is not None, reason=problem or "")
