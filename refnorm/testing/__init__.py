"""Check your own normalization layer against refnorm, and name its conventions.

- :func:`norm_inputs` — hypothesis strategies for every method's inputs, hard cases
  included (:mod:`refnorm.testing.strategies`);
- :func:`assert_matches` — a user's forward (and vector-Jacobian product) against refnorm's
  on drawn inputs, reporting the shrunk failing input (:mod:`refnorm.testing.compare`);
- :func:`fingerprint` — designed probes that name the conventions an implementation
  follows and the refnorm options it matches (:mod:`refnorm.testing.fingerprint`);
- :mod:`refnorm.testing.adapters` — numpy callables, dlpack callables, stateful objects and
  ``torch.nn.Module`` (torch is optional) seen through one interface.

Importing this module needs hypothesis (the ``test`` extra).
"""

from refnorm.testing.adapters import Impl, as_impl
from refnorm.testing.compare import Mismatch, assert_matches
from refnorm.testing.fingerprint import Report, fingerprint
from refnorm.testing.strategies import Case, norm_inputs

__all__ = ["Case", "Impl", "Mismatch", "Report", "as_impl", "assert_matches", "fingerprint",
           "norm_inputs"]
