"""Printed formulas from the papers, transcribed as printed, and their checks.

Each module reproduces one paper's equations exactly as printed (wrong ones included) and
checks every one against central finite differences, so that the docs' errata page and the
tests are built from the same measurements.

- :mod:`refnorm.errata.sn_appendix` — Switchable Normalization, Appendix A, Eq. (6)-(14),
  and the float32 behaviour of Eq. (4).
"""
