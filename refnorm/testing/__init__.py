"""Check your own normalization layer against refnorm, and name its conventions.

- :func:`norm_inputs` — hypothesis strategies for every method's inputs, hard cases
  included (:mod:`refnorm.testing.strategies`);
- :func:`assert_matches` — a user's forward (and vector-Jacobian product) against refnorm's
  on drawn inputs, reporting the first diverging convention and the shrunk failing input
  (:mod:`refnorm.testing.compare`), within tolerances derived from each drawn case
  (:mod:`refnorm.testing.tolerance`);
- :func:`fingerprint` — designed probes that name the conventions an implementation
  follows, from its reduction axes (:mod:`refnorm.testing.axes`) on, and the refnorm
  options it matches (:mod:`refnorm.testing.probes`);
- :mod:`refnorm.testing.adapters` — numpy callables, dlpack callables, stateful objects and
  ``torch.nn.Module`` (torch is optional) seen through one interface.

These need hypothesis (``pip install 'refnorm[testing]'``); the names are imported on first
use, so that ``refnorm``'s command line starts without it.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "Impl": "adapters", "as_impl": "adapters",
    "Mismatch": "compare", "assert_matches": "compare",
    "Report": "probes", "fingerprint": "probes",
    "Case": "strategies", "norm_inputs": "strategies",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'refnorm.testing' has no attribute {name!r}")
    return getattr(importlib.import_module(f"refnorm.testing.{_HOME[name]}"), name)


__all__ = ["Case", "Impl", "Mismatch", "Report", "as_impl", "assert_matches", "fingerprint",
           "norm_inputs"]
