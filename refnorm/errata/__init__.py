"""Printed formulas from the papers, transcribed as printed, and their checks.

Each paper's module (``sn_appendix``, ``sn_multi_gpu``, ``sn_distinct``, ``ws_theory``)
reproduces its equations exactly as printed (wrong ones included) and checks every one: a
gradient or an identity built on gradients against central finite differences, a forward
formula as its docstring says, so that the docs' errata page and the tests are built from the
same measurements.

- :mod:`refnorm.errata.findings` — what the modules share: the
  :class:`~refnorm.errata.findings.Finding` record, the error measure and finite
  differences of :mod:`refnorm.gradcheck`, the Markdown table;
- :mod:`refnorm.errata.sn_appendix` — Switchable Normalization, Appendix A, Eq. (6)-(14),
  and Eq. (4) as printed with its float32 behaviour;
- :mod:`refnorm.errata.sn_multi_gpu` — Switchable Normalization, Appendix A for multiple
  GPUs, Eq. (15)-(25);
- :mod:`refnorm.errata.sn_distinct` — the SN of Luo, Peng, Ren & Zhang's study of distinct
  normalizers (2018), Eq. (1), beside the SN journal version's Eq. (3);
- :mod:`refnorm.errata.ws_theory` — Weight Standardization, §2.2-2.3, Eq. (5)-(19);
- :mod:`refnorm.errata.equations` — the concordance of every numbered equation of the papers:
  where refnorm computes it, what checks it, its verdict (the docs' equations page).
"""
