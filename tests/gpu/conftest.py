"""The ``gpu``-marked tests: CuPy arrays on a real GPU; each module skips without one.

``xp`` is CuPy here, so property tests imported from the CPU suite run on the GPU (the
skip marks come first: without a GPU this fixture is never set up).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def xp():
    """The array namespace of the GPU tests: CuPy."""
    import cupy

    return cupy
