"""The paper concordance: every numbered equation of the papers refnorm follows, where refnorm
computes it, which test checks it, and whether the printed form holds.

The docs page "equations" is built from this module when the documentation is built; the
test suite (``tests/errata/test_equations.py``) holds the registry, the code and the tests to
each other without building anything.

Two halves:

- **the registry** (:data:`PAPERS`, :data:`EQUATIONS`): per paper, per equation, the printed
  equation in LaTeX, what it is, the verdict and the tests that back the verdict. It is the
  only hand-kept part.
- **the tags**, read from the code (:func:`scan`): a line that computes a printed equation
  ends with a comment that names it, ``# Eq. (9)``, with the paper named once in the module
  docstring (the paper whose ``cite`` phrase, see :class:`Paper`, comes first there), or in
  the tag itself, ``# WS Eq. (8)`` (prefixes ``SN`` for the journal version, ``SND``,
  ``WS``, ``GG``). One tag may name several equations, ``# Eq. (12)-(14)``, ``# Eq. (6), (7),
  (8)``. Only comments after code count: a comment on a line of its own heads a block, it
  does not compute. The fast kernels (``refnorm/kernels/``) are tested equal to the reference
  and carry no tags: the concordance points at the reference.

The verdicts:

- :data:`VERIFIED`, *implemented and verified*: a listed test compares the tagged function
  with finite differences (float64, a random upstream gradient) or with an independent
  formula;
- :data:`PRINTED_WRONG`, *printed form wrong*: an errata test shows the printed form
  failing and the corrected one, which refnorm implements, passing (the row links the errata
  page's section);
- :data:`DEFINITION`, *definition only*: the equation names a quantity that other equations
  use;
- :data:`NOT_IMPLEMENTED`, *not implemented*, with the reason.

Gitman & Ginsburg print their formulas unnumbered; refnorm numbers their display formulas
1-7 in order of appearance (``# GG Eq. (5)`` is the fifth).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import io
import re
import tokenize
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]   # refnorm/
ROOT = PACKAGE.parent                           # the repository (tests/ lives here)
UNSCANNED = ("kernels",)                        # refnorm/kernels/: no tags, see above

VERIFIED = "verified"
PRINTED_WRONG = "printed wrong"
DEFINITION = "definition only"
NOT_IMPLEMENTED = "not implemented"
VERDICTS = (VERIFIED, PRINTED_WRONG, DEFINITION, NOT_IMPLEMENTED)


@dataclass(frozen=True)
class Paper:
    """One paper of the concordance.

    Attributes
    ----------
    key : str
        The short name in anchors (``eq-<key>-<n>``): snj, snd, ws, gg.
    name : str
        How the coverage figures name it ("SN journal").
    title : str
        Authors, title and year, as the page's section cites it (MyST).
    cite : str
        The phrase by which a module docstring names the paper.
    prefix : str
        The paper's name in a tag (``# WS Eq. (8)``).
    unit : str
        What it numbers: "numbered equations", or "display formulas" where refnorm numbers
        them.
    """

    key: str
    name: str
    title: str
    cite: str
    prefix: str
    unit: str = "numbered equations"


PAPERS = {p.key: p for p in (
    Paper("snj", "SN journal",
          "Luo, Zhang, Ren, Peng & Li, *Switchable Normalization for Learning-to-Normalize "
          "Deep Representation* (journal version, 2019)", "journal version", "SN"),
    Paper("snd", "SN study of distinct normalizers",
          "Luo, Peng, Ren & Zhang, *Do Normalization Layers in a Deep ConvNet Really Need to "
          "Be Distinct?* (preprint, 2018)", "study of distinct normalizers", "SND"),
    Paper("ws", "WS",
          "Qiao, Wang, Liu, Shen & Yuille, *Weight Standardization* (2019)", "Qiao", "WS"),
    Paper("gg", "Gitman & Ginsburg",
          "Gitman & Ginsburg, *Comparison of Batch Normalization and Weight Normalization "
          "Algorithms for the Large-Scale Image Classification* (2017)", "Gitman & Ginsburg",
          "GG", "display formulas"),
)}
PREFIXES = {p.prefix: p.key for p in PAPERS.values()}


@dataclass(frozen=True)
class Equation:
    """One numbered equation and what refnorm does with it.

    Attributes
    ----------
    paper : str
        A key of :data:`PAPERS`.
    number : int
    latex : str
        The printed equation (no ``|``: it would end a table cell; ``\\lVert``, ``\\lvert``).
    what : str
        What it is, one line (MyST).
    verdict : str
        One of :data:`VERDICTS`.
    tests : tuple of str
        ``"tests/path.py::test_name"``: the tests that back the verdict.
    note : str
        Added to the verdict (MyST): for :data:`NOT_IMPLEMENTED`, the reason (required).
    errata : str
        The errata page's label for the section that checks the printed form (required for
        :data:`PRINTED_WRONG`).
    untagged : str
        What the code cell says when no line is tagged (only for equations nothing computes).
    """

    paper: str
    number: int
    latex: str
    what: str
    verdict: str
    tests: tuple[str, ...]
    note: str = ""
    errata: str = ""
    untagged: str = ""

    @property
    def anchor(self) -> str:
        """``eq-<paper>-<n>``, the row's id on the page."""
        return f"eq-{self.paper}-{self.number}"


# -- the registry ------------------------------------------------------------------------------

_SN = "tests/norms/test_switchable_norm.py"
_SNE = "tests/norms/test_switchable_norm_equations.py"
_SYNC = "tests/sync/test_switchable.py::test_sync_switchable_norm_equals_one_device"
_APPENDIX = "tests/errata/test_sn_appendix.py::test_printed_appendix_verdicts"
_MULTI = "tests/errata/test_sn_multi_gpu.py::test_printed_multi_gpu_verdicts"
_WS = "tests/weights/test_standardization.py"
_WS_THEORY = "tests/errata/test_ws_theory.py::test_printed_ws_theory"
_D = r"\frac{\partial L}{\partial "   # d L / d (closed by the caller)

def _ratio(k: str, others: tuple[str, str]) -> str:
    """``dL/dlambda_k = w_k (1 - w_k) S_k - w_k w_j S_j - ...``, S_k as the page defines it."""
    a, b = others
    return (_D + r"\lambda_{\rm " + k + r"}} = w_{\rm " + k + r"}(1 - w_{\rm " + k
            + r"})S_{\rm " + k + r"} - w_{\rm " + k + r"}w_{\rm " + a + r"}S_{\rm " + a
            + r"} - w_{\rm " + k + r"}w_{\rm " + b + r"}S_{\rm " + b + r"}")


EQUATIONS: tuple[Equation, ...] = (
    # -- SN journal, §3 -----------------------------------------------------------------------
    Equation(
        "snj", 1,
        r"\hat h_{ncij} = \gamma\,\frac{h_{ncij} - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta",
        "a normalization layer: standardize with a mean and a variance, then scale and shift "
        "(BN, IN and LN differ only in the statistics)",
        VERIFIED,
        ("tests/norms/test_batch_norm.py::test_forward_is_the_printed_formula",
         "tests/core/test_standardize.py::"
         "test_output_is_x_minus_mu_times_rstd_with_eps_inside_the_sqrt",
         "tests/norms/test_properties.py::test_gradients_match_finite_differences")),
    Equation(
        "snj", 2,
        r"\mu_k = \frac{1}{\lvert I_k\rvert}\sum_{(n,c,i,j)\in I_k} h_{ncij},\quad "
        r"\sigma_k^2 = \frac{1}{\lvert I_k\rvert}\sum_{(n,c,i,j)\in I_k}(h_{ncij} - \mu_k)^2",
        r"the mean and (biased) variance over a set of pixels $I_k$: "
        r"$(i, j)$ for IN, $(c, i, j)$ for LN, $(n, i, j)$ for BN",
        VERIFIED,
        ("tests/core/test_moments.py::test_moments_match_numpy",
         "tests/norms/test_batch_norm.py::test_forward_is_the_printed_formula",
         "tests/norms/test_properties.py::test_output_is_standardized_per_group")),
    Equation(
        "snj", 3,
        r"\hat h_{ncij} = \gamma\,\frac{h_{ncij} - \sum_{k\in\Omega} w_k\mu_k}"
        r"{\sqrt{\sum_{k\in\Omega} w'_k\sigma_k^2 + \epsilon}} + \beta",
        r"Switchable Normalization: the ratio-weighted means and variances of "
        r"$\Omega = \{\mathrm{in}, \mathrm{ln}, \mathrm{bn}\}$",
        VERIFIED,
        (f"{_SNE}::test_forward_is_eq3_with_the_direct_statistics_of_each_scope",
         f"{_SN}::test_gradients_match_finite_differences")),
    Equation(
        "snj", 4,
        r"\mu_{\rm ln} = \tfrac{1}{C}\sum_{c}\mu_{\rm in},\ \ "
        r"\sigma_{\rm ln}^2 = \tfrac{1}{C}\sum_{c}(\sigma_{\rm in}^2 + \mu_{\rm in}^2)"
        r" - \mu_{\rm ln}^2,\ \ \text{BN likewise over } n",
        "the LN and BN statistics from the IN moments (the IN mean and variance over "
        "$(i, j)$), one pass over the data",
        VERIFIED,
        (f"{_SN}::test_stable_statistics_equal_the_direct_ones",
         "tests/errata/test_sn_appendix.py::"
         "test_eq4_printed_form_fails_in_float32_and_stable_form_does_not",
         "tests/errata/test_sn_appendix.py::test_printed_eq4_equals_the_stable_statistics_in_float64"),
        note="in the equal law-of-total-variance form; the printed one-pass form loses the "
             "variance in float32 (see {ref}`errata <errata-snj-eq4>`)"),
    Equation(
        "snj", 5,
        r"w_k = \frac{e^{\lambda_k}}{\sum_{z\in\{\mathrm{in},\mathrm{ln},\mathrm{bn}\}}"
        r" e^{\lambda_z}}",
        r"the ratios: a softmax of the control parameters $\lambda_k$ ($w'_k$ likewise of "
        r"$\lambda'_k$)",
        VERIFIED,
        (f"{_SNE}::test_ratios_are_the_softmax_of_eq5",
         f"{_SN}::test_gradients_match_finite_differences")),
    # -- SN journal, Appendix A, one GPU --------------------------------------------------------
    Equation(
        "snj", 6, _D + r"\tilde h_{ncij}} = " + _D + r"\hat h_{ncij}}\cdot\gamma",
        r"the gradient of the standardized $\tilde h$",
        VERIFIED,
        (f"{_SNE}::test_statistic_gradients_match_finite_differences", _APPENDIX)),
    Equation(
        "snj", 7,
        _D + r"\sigma^2} = -\frac{1}{2(\sigma^2 + \epsilon)}\sum_{i,j}^{H,W}"
        + _D + r"\tilde h_{ncij}}\cdot\tilde h_{ncij}",
        r"the gradient of the mixed variance $\sigma^2$, per $(n, c)$",
        VERIFIED,
        (f"{_SNE}::test_statistic_gradients_match_finite_differences", _APPENDIX)),
    Equation(
        "snj", 8,
        _D + r"\mu} = -\frac{1}{\sqrt{\sigma^2 + \epsilon}}\sum_{i,j}^{H,W}"
        + _D + r"\tilde h_{ncij}}",
        r"the gradient of the mixed mean $\mu$, per $(n, c)$",
        VERIFIED,
        (f"{_SNE}::test_statistic_gradients_match_finite_differences", _APPENDIX)),
    Equation(
        "snj", 9,
        r"\begin{aligned}" + _D + r"h_{ncij}} &= " + _D + r"\tilde h_{ncij}}"
        r"\frac{1}{\sqrt{\sigma^2+\epsilon}}"
        r" + \frac{2w_{\rm in}(h_{ncij}-\mu_{\rm in})}{HW}" + _D + r"\sigma^2}"
        r" + \frac{2w_{\rm ln}(h_{ncij}-\mu_{\rm ln})}{CHW}\sum_{c=1}^{C}" + _D
        + r"\sigma^2_c}\\ &\quad + \frac{2w_{\rm bn}(h_{ncij}-\mu_{\rm bn})}{NHW}"
        r"\sum_{n=1}^{N}" + _D + r"\sigma^2_n}"
        r" + \frac{w_{\rm in}}{HW}" + _D + r"\mu} + \frac{w_{\rm ln}}{CHW}\sum_{c=1}^{C}"
        + _D + r"\mu_c} + \frac{w_{\rm bn}}{NHW}\sum_{n=1}^{N}" + _D + r"\mu_n}"
        r"\end{aligned}",
        "the gradient of the input, term by term through every scope's mean and variance",
        VERIFIED,
        (f"{_SN}::test_gradients_match_finite_differences",
         f"{_SN}::test_appendix_backward_equals_compact_backward", _APPENDIX),
        note=r"with separate ratios the variance terms take $w'_k$"),
    Equation(
        "snj", 10,
        _D + r"\gamma} = \sum_{n,c,i,j}^{N,C,H,W}" + _D + r"\hat h_{ncij}}\cdot"
        r"\tilde h_{ncij}",
        r"the gradient of the scale $\gamma$",
        PRINTED_WRONG,
        (_APPENDIX, f"{_SN}::test_gradients_match_finite_differences"),
        note=r"the sum over $c$ is right for one $\gamma$ shared by all channels; SN's "
             r"$\gamma$ is per channel, and refnorm sums over $(n, i, j)$",
        errata="errata-snj-appendix"),
    Equation(
        "snj", 11,
        _D + r"\beta} = \sum_{n,c,i,j}^{N,C,H,W}" + _D + r"\hat h_{ncij}}",
        r"the gradient of the shift $\beta$",
        PRINTED_WRONG,
        (_APPENDIX, f"{_SN}::test_gradients_match_finite_differences"),
        note=r"as Eq. (10): refnorm sums over $(n, i, j)$ for the per-channel $\beta$",
        errata="errata-snj-appendix"),
    Equation(
        "snj", 12, _ratio("in", ("ln", "bn")),
        r"the gradient of the control parameter $\lambda_{\rm in}$ (tied ratios)",
        VERIFIED,
        (f"{_SNE}::test_ratio_gradients_are_the_softmax_jacobian",
         f"{_SN}::test_gradients_match_finite_differences", _APPENDIX),
        note=r"with separate ratios, $\lambda$ takes the mean part of $S_k$ and "
             r"$\lambda'$ the variance part"),
    Equation(
        "snj", 13, _ratio("ln", ("in", "bn")),
        r"the gradient of $\lambda_{\rm ln}$, read by symmetry with Eq. (12) and (14)",
        VERIFIED,
        (f"{_SNE}::test_ratio_gradients_are_the_softmax_jacobian",
         f"{_SN}::test_gradients_match_finite_differences", _APPENDIX)),
    Equation(
        "snj", 14, _ratio("bn", ("in", "ln")),
        r"the gradient of $\lambda_{\rm bn}$",
        VERIFIED,
        (f"{_SNE}::test_ratio_gradients_are_the_softmax_jacobian",
         f"{_SN}::test_gradients_match_finite_differences", _APPENDIX)),
    # -- SN journal, Appendix A, multiple GPUs --------------------------------------------------
    Equation(
        "snj", 15,
        r"\hat h_{p,ncij} = \gamma\tilde h_{p,ncij} + \beta,\quad \tilde h_{p,ncij} = "
        r"\frac{h_{p,ncij} - \mu_p}{\sqrt{\sigma_p^2 + \epsilon}}",
        r"synchronized SN on device $p$: IN and LN statistics local, the BN scope's "
        r"$\mu_{\rm sybn}$, $\sigma^2_{\rm sybn}$ over every device",
        VERIFIED, (_SYNC, _MULTI)),
    Equation(
        "snj", 16,
        _D + r"\gamma} = \sum_{p,n,i,j}^{P,N,C,H,W}" + _D + r"\hat h_{p,ncij}}\cdot"
        r"\tilde h_{p,ncij}",
        r"the gradient of $\gamma$ over every device (per channel)",
        VERIFIED, (_SYNC, _MULTI),
        note="each device returns its part; the data-parallel step adds them once"),
    Equation(
        "snj", 17,
        _D + r"\beta} = \sum_{p,n,i,j}^{P,N,H,W}" + _D + r"\hat h_{p,ncij}}",
        r"the gradient of $\beta$ over every device (per channel)",
        VERIFIED, (_SYNC, _MULTI),
        note="each device returns its part; the data-parallel step adds them once"),
    Equation(
        "snj", 18, _ratio("in", ("ln", "bn")),
        r"the gradient of $\lambda_{\rm in}$ over every device",
        VERIFIED,
        (_SYNC, "tests/sync/test_switchable.py::test_control_parameter_gradients_are_reduced_once",
         _MULTI),
        note="each device returns its part; the data-parallel step adds them once"),
    Equation(
        "snj", 19, _ratio("ln", ("in", "bn")),
        r"the gradient of $\lambda_{\rm ln}$ over every device, read by symmetry with "
        r"Eq. (18)",
        VERIFIED,
        (_SYNC, "tests/sync/test_switchable.py::test_control_parameter_gradients_are_reduced_once",
         _MULTI),
        note="each device returns its part; the data-parallel step adds them once"),
    Equation(
        "snj", 20, _ratio("bn", ("in", "ln")),
        r"the gradient of $\lambda_{\rm bn}$ over every device, read by symmetry with "
        r"Eq. (18)",
        VERIFIED,
        (_SYNC, "tests/sync/test_switchable.py::test_control_parameter_gradients_are_reduced_once",
         _MULTI),
        note="each device returns its part; the data-parallel step adds them once"),
    Equation(
        "snj", 21,
        r"\begin{aligned}" + _D + r"\sigma^2_{p,nc}} &= -\frac{1}{2\sqrt{\sigma^2_{p,nc}"
        r"+\epsilon}}\sum_{i,j}^{H,W}" + _D + r"\tilde h_{p,ncij}}\cdot\tilde h_{p,ncij}"
        r" - \frac{\gamma}{2\sqrt{\sigma^2_{p,nc}+\epsilon}}\sum_{i,j}^{H,W}" + _D
        + r"\hat h_{p,ncij}}\cdot\tilde h_{p,ncij},\\ " + _D + r"\mu_{p,nc}} &= "
        r"-\frac{1}{\sqrt{\sigma^2_{p,nc}+\epsilon}}\sum_{i,j}^{H,W}" + _D
        + r"\tilde h_{p,ncij}} - \frac{\gamma}{\sqrt{\sigma^2_{p,nc}+\epsilon}}"
        r"\sum_{i,j}^{H,W}" + _D + r"\hat h_{p,ncij}}\end{aligned}",
        r"the gradients of the mixed variance and mean on device $p$",
        PRINTED_WRONG,
        (_MULTI, "tests/errata/test_sn_multi_gpu.py::test_printed_eq21_is_the_formula_as_printed"),
        note=r"a square root where Eq. (7) has none, and each sum counted twice "
             r"($\partial L/\partial\tilde h = \gamma\,\partial L/\partial\hat h$); refnorm "
             r"uses Eq. (7)-(8) on each device",
        errata="errata-snj-multi-gpu"),
    Equation(
        "snj", 22,
        _D + r"h_{p,ncij}} = \underbrace{" + _D + r"\tilde h_{p,ncij}}\frac{\partial\tilde "
        r"h_{p,ncij}}{\partial h_{p,ncij}}}_{\rm Term1} + \underbrace{\sum_{\ddot p,\ddot n,"
        r"\ddot c}" + _D + r"\sigma^2_{\ddot p,\ddot n\ddot c}}\frac{\partial\sigma^2_{\ddot "
        r"p,\ddot n\ddot c}}{\partial h_{p,ncij}}}_{\rm Term2} + \underbrace{\sum_{\ddot p,"
        r"\ddot n,\ddot c}" + _D + r"\mu_{\ddot p,\ddot n\ddot c}}\frac{\partial\mu_{\ddot p,"
        r"\ddot n\ddot c}}{\partial h_{p,ncij}}}_{\rm Term3}",
        r"the gradient of the input on device $p$, through every device's statistics",
        VERIFIED, (_SYNC, _MULTI)),
    Equation(
        "snj", 23,
        r"\mathrm{Term1} = " + _D + r"\hat h_{p,ncij}}\cdot\frac{\gamma}"
        r"{\sqrt{\sigma^2_{p,nc}+\epsilon}}",
        r"the direct term of $\partial L/\partial h_p$",
        VERIFIED, (_SYNC, _MULTI)),
    Equation(
        "snj", 24,
        r"\begin{aligned}\mathrm{Term2} &= w_{\rm in}\frac{2(h_{p,ncij}-\mu_{{\rm in},p,nc})}"
        r"{HW}" + _D + r"\sigma^2_{p,nc}} + w_{\rm ln}\frac{2(h_{p,ncij}-\mu_{{\rm ln},p,n})}"
        r"{CHW}\sum_{\ddot c}^{C}" + _D + r"\sigma^2_{p,n\ddot c}}\\ &\quad + w_{\rm bn}"
        r"\frac{2(h_{p,ncij}-\mu_{{\rm sybn},c})}{PNHW}\sum_{\ddot p,\ddot n}^{P,N}" + _D
        + r"\sigma^2_{\ddot p,\ddot nc}}\end{aligned}",
        "the terms through the three scopes' variances",
        VERIFIED, (_SYNC, _MULTI),
        note=r"refnorm divides the BN terms by the whole batch's count, which is $PNHW$ when "
             r"every device holds $N$ samples ({ref}`errata <errata-snj-multi-gpu>`)"),
    Equation(
        "snj", 25,
        r"\begin{aligned}\mathrm{Term3} &= w_{\rm in}\frac{1}{HW}" + _D + r"\mu_{p,nc}}"
        r" + w_{\rm ln}\frac{1}{CHW}\sum_{\ddot c}^{C}" + _D + r"\mu_{p,n\ddot c}}\\ &\quad"
        r" + w_{\rm bn}\frac{1}{PNHW}\sum_{\ddot p,\ddot n}^{P,N}" + _D
        + r"\mu_{\ddot p,\ddot nc}}\end{aligned}",
        "the terms through the three scopes' means",
        VERIFIED, (_SYNC, _MULTI),
        note=r"the BN term over the whole batch's count, as in Eq. (24)"),
    # -- SN study of distinct normalizers ---------------------------------------------------------
    Equation(
        "snd", 1,
        r"\hat h_{\rm sn} = \frac{h - \sum_{z\in\Omega}\lambda_z^\mu\mu_z}"
        r"{\sum_{z\in\Omega}\lambda_z^\sigma\sigma_z}",
        "SN with separate ratios for the means and the standard deviations",
        NOT_IMPLEMENTED,
        ("tests/errata/test_sn_distinct.py::"
         "test_study_form_differs_from_the_journal_form_only_between_scopes",
         "tests/errata/test_sn_distinct.py::test_printed_eq1_is_the_formula_as_printed"),
        note="refnorm follows the journal version's Eq. (3) and the official code: a weighted "
             "average of *variances*, plus $\\epsilon$, under the square root, where this "
             "divides by a weighted average of standard deviations; the two differ whenever "
             "the scopes' variances differ ({ref}`errata <errata-snd-eq1>`). Both keep "
             "separate ratios for the means and the variances"),
    # -- WS, §2.1 ------------------------------------------------------------------------------
    Equation(
        "ws", 1, r"y = \hat W * x",
        r"a convolution with weights $\hat W \in \mathbb{R}^{O\times I}$ and no bias",
        VERIFIED, ("tests/nn/test_conv.py::test_forward_matches_direct_loops",
                   "tests/nn/test_conv.py::test_gradients_match_finite_differences")),
    Equation(
        "ws", 2,
        r"\hat W = \Big[\hat W_{i,j}\ \Big\vert\ \hat W_{i,j} = \frac{W_{i,j} - "
        r"\mu_{W_{i,\cdot}}}{\sigma_{W_{i,\cdot}} + \epsilon}\Big]",
        r"Weight Standardization: each output channel's weights standardized, $\epsilon$ "
        r"added to $\sigma$",
        VERIFIED, (f"{_WS}::test_forward_conventions",
                   f"{_WS}::test_gradients_match_finite_differences"),
        note=r"printed with $\epsilon$ inside $\sigma$'s subscript, "
             r"$\sigma_{W_{i,\cdot}+\epsilon}$; read as $\sigma + \epsilon$, as the official code "
             r"adds it"),
    Equation(
        "ws", 3, r"y = \hat W * x",
        r"the convolution with the standardized weights $\hat W = \mathrm{WS}(W)$",
        VERIFIED, (f"{_WS}::test_layer_is_eq3_a_convolution_with_the_standardized_weights",
                   f"{_WS}::test_check_cases_pass")),
    Equation(
        "ws", 4,
        r"\mu_{W_{i,\cdot}} = \frac{1}{I}\sum_{j=1}^{I}W_{i,j},\quad \sigma_{W_{i,\cdot}} = "
        r"\sqrt{\frac{1}{I}\sum_{i=1}^{I}(W_{i,j} - \mu_{W_{i,\cdot}})^2}",
        r"the mean and (biased) standard deviation of one output channel's $I$ weights",
        VERIFIED, (f"{_WS}::test_forward_conventions",),
        note="the second sum runs over $j$ (printed with $i$)"),
    # -- WS, §2.2 ------------------------------------------------------------------------------
    Equation(
        "ws", 5,
        r"\dot W_{c,\cdot} = W_{c,\cdot} - \frac{1}{I}\mathbf{1}\langle\mathbf{1},"
        r"W_{c,\cdot}\rangle",
        r"Eq. (2) in two steps, for the analysis ($\epsilon = 0$): centring",
        VERIFIED, (f"{_WS}::test_forward_is_eq5_then_eq6",)),
    Equation(
        "ws", 6,
        r"\hat W_{c,\cdot} = \dot W_{c,\cdot}\Big/\sqrt{\tfrac{1}{I}\langle\mathbf{1},"
        r"\dot W_{c,\cdot}^{\circ 2}\rangle}",
        "and scaling to unit mean square",
        VERIFIED, (f"{_WS}::test_forward_is_eq5_then_eq6",)),
    Equation(
        "ws", 7, r"y_c = x_c\hat W_{c,\cdot}",
        r"one output channel of the convolution as a matrix product ($x_c$: the $b$ "
        r"windows that meet its weights, $b \times I$; im2col)",
        VERIFIED, ("tests/nn/test_conv.py::test_forward_matches_direct_loops",
                   "tests/nn/test_conv.py::test_im2col_columns_are_the_zero_padded_windows")),
    Equation(
        "ws", 8,
        r"\nabla_{\dot W_{c,\cdot}}L = \frac{1}{\sigma_{W_{c,\cdot}}}\Big(\nabla_{\hat W_{c,"
        r"\cdot}}L - \frac{1}{I}\langle\hat W_{c,\cdot},\nabla_{\hat W_{c,\cdot}}L\rangle"
        r"\hat W_{c,\cdot}\Big)",
        r"the backward through the scaling (Eq. 6)",
        VERIFIED, (f"{_WS}::test_gradients_match_finite_differences", _WS_THEORY),
        note=r"refnorm's form holds for the $\epsilon$ of Eq. (2) too"),
    Equation(
        "ws", 9,
        r"\nabla_{W_{c,\cdot}}L = \nabla_{\dot W_{c,\cdot}}L - \frac{1}{I}\mathbf{1}"
        r"\langle\mathbf{1},\nabla_{\dot W_{c,\cdot}}L\rangle",
        r"the backward through the centring (Eq. 5): a zero-mean gradient",
        VERIFIED, (f"{_WS}::test_gradients_match_finite_differences",
                   f"{_WS}::test_gradient_is_centred_and_orthogonal_to_w_hat_up_to_eps",
                   _WS_THEORY)),
    # -- WS, §2.3: the analysis, computed to be checked -------------------------------------------
    Equation(
        "ws", 10,
        r"\lVert\nabla_{\dot W_{c,\cdot}}L\rVert^2 = \frac{1}{\sigma^2_{W_{c,\cdot}}}\Big("
        r"\lVert\nabla_{\hat W_{c,\cdot}}L\rVert^2 + \frac{1}{I^2}\langle\hat W_{c,\cdot},"
        r"\nabla_{\hat W_{c,\cdot}}L\rangle^2\big(\langle\hat W_{c,\cdot},\hat W_{c,\cdot}"
        r"\rangle - 2I\big)\Big)",
        "the gradient norm through Eq. (8) (analysis)",
        VERIFIED, (_WS_THEORY,)),
    Equation(
        "ws", 11,
        r"\lVert\nabla_{\dot W_{c,\cdot}}L\rVert^2 = \frac{1}{\sigma^2_{W_{c,\cdot}}}\Big("
        r"\lVert\nabla_{\hat W_{c,\cdot}}L\rVert^2 - {}",
        r"Eq. (10) with $\lVert\hat W_{c,\cdot}\rVert^2 = I$, first line (analysis)",
        VERIFIED, (_WS_THEORY,),
        note="checked with its second line, Eq. (12)"),
    Equation(
        "ws", 12,
        r"\frac{1}{I}\langle\hat W_{c,\cdot},\nabla_{\hat W_{c,\cdot}}L\rangle^2\Big)",
        "second line of Eq. (11): by how much Eq. (8) lowers the gradient norm (analysis)",
        VERIFIED, (_WS_THEORY,)),
    Equation(
        "ws", 13,
        r"\lVert\nabla_{W_{c,\cdot}}L\rVert^2 = \lVert\nabla_{\dot W_{c,\cdot}}L\rVert^2 - "
        r"\frac{1}{I}\langle\mathbf{1},\nabla_{\dot W_{c,\cdot}}L\rangle^2",
        "the gradient norm through Eq. (9) (analysis)",
        VERIFIED, (_WS_THEORY,)),
    Equation(
        "ws", 14,
        r"\frac{1}{I}\langle\mathbf{1},\nabla_{\dot W_{c,\cdot}}L\rangle^2 = "
        r"\frac{1}{I\sigma^2_{W_{c,\cdot}}}\Big(\langle\mathbf{1},\nabla_{\hat W_{c,\cdot}}L"
        r"\rangle - \frac{1}{I}\langle\hat W_{c,\cdot},\nabla_{\hat W_{c,\cdot}}L\rangle"
        r"\langle\mathbf{1},\hat W_{c,\cdot}\rangle\Big)^2",
        "the reduction of Eq. (13) through Eq. (8) (analysis)",
        VERIFIED, (_WS_THEORY,
                   "tests/errata/test_ws_theory.py::test_printed_eq14_is_the_formula_as_printed")),
    Equation(
        "ws", 15,
        r"\lVert\nabla_{W_{c,\cdot}}L\rVert^2 = \lVert\nabla_{\dot W_{c,\cdot}}L\rVert^2 - "
        r"\frac{1}{I\sigma^2_{W_{c,\cdot}}}\langle\mathbf{1},\nabla_{\hat W_{c,\cdot}}L"
        r"\rangle^2",
        r"Eq. (13)-(14) with $\langle\mathbf{1},\hat W_{c,\cdot}\rangle = 0$ (analysis)",
        VERIFIED, (_WS_THEORY,),
        note=r"with a hat in its last term; read with a dot it fails "
             r"({ref}`errata <errata-ws-theory>`)"),
    Equation(
        "ws", 16,
        r"H_{i,j} = \frac{\partial^2 L}{\partial W_{c,i}\partial W_{c,j}},\quad "
        r"\dot H_{i,j} = \frac{\partial^2 L}{\partial\dot W_{c,i}\partial\dot W_{c,j}}",
        r"the Hessians of the loss in $W_{c,\cdot}$ and in $\dot W_{c,\cdot}$",
        DEFINITION,
        ("tests/errata/test_findings.py::test_finite_differences_of_a_known_function",
         _WS_THEORY),
        note="computed by central differences of exact gradients for the checks of "
             "Eq. (17)-(19)"),
    Equation(
        "ws", 17,
        r"H_{i,j} = \dot H_{i,j} - \frac{1}{I}\sum_{k=1}^{I}(\dot H_{i,k} + \dot H_{k,j}) + "
        r"\frac{1}{I^2}\sum_{p=1}^{I}\sum_{q=1}^{I}\dot H_{p,q}",
        "the Hessian through the centring (analysis)",
        VERIFIED, (_WS_THEORY,)),
    Equation(
        "ws", 18, r"\sum_{i=1}^{I}\sum_{j=1}^{I}H_{i,j} = 0",
        "the centred Hessian sums to zero (analysis)",
        VERIFIED, (_WS_THEORY,)),
    Equation(
        "ws", 19,
        r"\begin{aligned}\lVert H\rVert_F &= \sum_{i,j}H_{i,j}^2 = \lVert\dot H\rVert_F + "
        r"\frac{1}{I^2}\Big(\sum_{i,j}\dot H_{i,j}\Big)^2 - \frac{1}{I}\sum_{i}\Big(\sum_{j}"
        r"\dot H_{i,j}\Big)^2 - \frac{1}{I}\sum_{j}\Big(\sum_{i}\dot H_{i,j}\Big)^2\\ &\le "
        r"\lVert\dot H\rVert_F - \frac{1}{I^2}\Big(\sum_{i,j}\dot H_{i,j}\Big)^2"
        r"\end{aligned}",
        "centring lowers the Hessian's Frobenius norm (analysis)",
        VERIFIED, (_WS_THEORY, "tests/errata/test_ws_theory.py::test_hessian_reduction_is_real"),
        note=r"with $\lVert\cdot\rVert_F$ read as the squared norm, as its first step "
             r"defines it"),
    # -- Gitman & Ginsburg, display formulas in order of appearance -------------------------------
    Equation(
        "gg", 1,
        r"o_j = \gamma_j\frac{x_j - \mathbb{E}_B[x_j]}{\sqrt{\mathrm{Var}_B[x_j] + \epsilon}} "
        r"+ \beta_j",
        r"Batch Normalization of channel $j$ (§3.1)",
        VERIFIED,
        ("tests/norms/test_batch_norm.py::test_forward_is_the_printed_formula",
         "tests/norms/test_batch_norm.py::test_staged_backward_matches_finite_differences")),
    Equation(
        "gg", 2,
        r"\mathbb{E}_B[x_j] = \frac{1}{mHW}\sum_{i=1}^{m}\sum_{p=1}^{H}\sum_{q=1}^{W}"
        r"x^i_{j,pq}",
        r"the batch mean of channel $j$ ($\mathrm{Var}_B$ likewise)",
        VERIFIED,
        ("tests/core/test_moments.py::test_moments_match_numpy",
         "tests/norms/test_batch_norm.py::test_forward_is_the_printed_formula")),
    Equation(
        "gg", 3,
        r"o_j = \gamma_j\frac{W_j * x}{\lVert W_j\rVert_F + \epsilon} + \beta_j",
        r"Weight Normalization of output channel $j$ (§3.2)",
        VERIFIED,
        ("tests/weights/test_weight_norm.py::test_layer_is_the_printed_formula",
         "tests/weights/test_weight_norm.py::test_gradients_match_finite_differences")),
    Equation(
        "gg", 4,
        r"\mathbb{E}_B[o] \approx \mathbb{E}_B[x] = 0,\ \mathrm{Var}_B[o] \approx "
        r"\mathrm{Var}_B[x] = I \;\Rightarrow\; \lVert o_j\rVert_2 \approx "
        r"\sqrt{\frac{D_{l+1}}{D_l}}\,\lVert x\rVert_2",
        "what a WN layer with near-orthogonal weights preserves (Arpit et al.)",
        NOT_IMPLEMENTED,
        ("tests/weights/test_weight_norm.py::test_orthonormal_rows_keep_normalized_inputs_"
         "normalized",),
        note="it states a property of WN's output, not a computation; the test shows "
             "refnorm's WN layer keeping it",
        untagged="a property of {class}`~refnorm.weights.weight_norm.WeightNorm`'s output"),
    Equation(
        "gg", 5,
        r"o_j = \frac{1}{\sqrt{\frac{1}{2}\left(1 - \frac{1}{\pi}\right)}}\left[\mathrm{ReLU}"
        r"\left(\gamma_j\frac{W_j * x}{\lVert W_j\rVert_F + \epsilon} + \beta_j\right) - "
        r"\sqrt{\frac{1}{2\pi}}\right]",
        "Normalization Propagation: WN, then a ReLU re-normalized with the rectified "
        "Gaussian's mean and standard deviation",
        VERIFIED,
        ("tests/weights/test_norm_prop.py::test_layer_is_gitman_ginsburg_display_formula_5",
         "tests/weights/test_norm_prop.py::"
         "test_rectified_gaussian_constants_by_quadrature_and_monte_carlo",
         "tests/weights/test_norm_prop.py::test_relu_gradient_matches_finite_differences",
         "tests/weights/test_norm_prop.py::test_keeps_standard_normal_inputs_standard")),
    Equation(
        "gg", 6,
        r"o_j = \mathrm{TReLU}_{\alpha_j}\left(\frac{W_j * x}{\lVert W_j\rVert_F + \epsilon}"
        r"\right) := \mathrm{ReLU}\left(\frac{W_j * x}{\lVert W_j\rVert_F + \epsilon} - "
        r"\alpha_j\right) + \alpha_j",
        r"WN with translated ReLU: unit-norm filters, a learned threshold $\alpha_j$",
        VERIFIED,
        ("tests/weights/test_trelu.py::test_is_max_of_z_and_alpha",
         "tests/weights/test_trelu.py::test_gradients_match_finite_differences",
         "tests/weights/test_trelu.py::test_layer_uses_unit_norm_filters")),
    Equation(
        "gg", 7, r"o_j^{\rm last} = \gamma_j x_j^{\rm last} + \beta_j",
        "with TReLU WN, the network's only scale and shift, after its last layer",
        VERIFIED,
        ("tests/train/test_model.py::test_np_and_trelu_carry_their_own_nonlinearity",
         "tests/train/test_model.py::test_channel_affine_backward_matches_finite_differences")),
)


def equations(paper: str) -> list[Equation]:
    """The registered equations of ``paper``, in order.

    Raises
    ------
    ValueError
        If ``paper`` is not a key of :data:`PAPERS` (an empty table would read as a paper
        with no equations).
    """
    if paper not in PAPERS:
        raise ValueError(f"paper must be one of {', '.join(PAPERS)}; got {paper!r}")
    return sorted((e for e in EQUATIONS if e.paper == paper), key=lambda e: e.number)


def lookup(paper: str, number: int) -> Equation | None:
    """The registered equation, or None."""
    return next((e for e in EQUATIONS if e.paper == paper and e.number == number), None)


# -- the tags ----------------------------------------------------------------------------------

_NAMES = "|".join(sorted(PREFIXES, key=len, reverse=True))   # SND before SN
_TAG = re.compile(r"(?:\b(?P<prefix>" + _NAMES + r")\s+)?\bEq\.\s*\((?P<first>\d+)\)"
                  r"(?P<more>(?:\s*(?:-|–|,|and|&)\s*\(\d+\))*)")
_MORE = re.compile(r"\s*(-|–|,|and|&)\s*\((\d+)\)")


@dataclass(frozen=True)
class Tag:
    """A tagged line.

    Attributes
    ----------
    paper : str
    number : int
    path : str
        Relative to the repository, ``refnorm/norms/switchable_norm.py``.
    line : int
    module : str
        ``refnorm.norms.switchable_norm``.
    scope : tuple of str
        The enclosing top-level function or class, and for a class the method:
        ``("in_moments",)``, ``("SwitchableNorm", "_forward")``, ``()`` at module level.
    """

    paper: str
    number: int
    path: str
    line: int
    module: str
    scope: tuple[str, ...]

    @property
    def in_errata(self) -> bool:
        """Whether the line is a transcription or check in :mod:`refnorm.errata`."""
        return self.module.startswith("refnorm.errata.")


@dataclass
class Scan:
    """What :func:`scan` found: the tags, and what is wrong with them."""

    tags: list[Tag] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def parse_tag(comment: str) -> list[tuple[str | None, int]]:
    """The ``(prefix or None, number)`` pairs one comment names.

    >>> parse_tag("# (N, C, 1)  Eq. (12)-(14)")
    [(None, 12), (None, 13), (None, 14)]
    >>> parse_tag("# SN Eq. (2), GG Eq. (2)")
    [('SN', 2), ('GG', 2)]
    """
    out: list[tuple[str | None, int]] = []
    for m in _TAG.finditer(comment):
        prefix, last = m.group("prefix"), int(m.group("first"))
        out.append((prefix, last))
        for sep, num in _MORE.findall(m.group("more")):
            n = int(num)
            numbers = range(last + 1, n + 1) if sep in "-–" else [n]
            out += [(prefix, k) for k in numbers]
            last = n
    return out


def module_paper(docstring: str | None) -> str | None:
    """The paper a module docstring cites first (by :attr:`Paper.cite`), or None."""
    found = [(docstring.find(p.cite), p.key) for p in PAPERS.values()
             if docstring and p.cite in docstring]
    return min(found)[1] if found else None


def _scopes(tree: ast.Module) -> list[tuple[int, int, tuple[str, ...]]]:
    """(first line, last line, scope) of every top-level function and class, and of every
    method of a top-level class."""
    out: list[tuple[int, int, tuple[str, ...]]] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append((node.lineno, node.end_lineno or node.lineno, (node.name,)))
            if isinstance(node, ast.ClassDef):
                out += [(m.lineno, m.end_lineno or m.lineno, (node.name, m.name))
                        for m in node.body
                        if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return out


def _trailing_comments(source: str) -> Iterable[tuple[int, str]]:
    """``(line, comment)`` for every comment that follows code on its line."""
    code_lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
            tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            if tok.start[0] in code_lines:
                yield tok.start[0], tok.string
        elif tok.type not in skip:
            code_lines.update(range(tok.start[0], tok.end[0] + 1))


def scan_file(path: Path, root: Path = ROOT) -> Scan:
    """The tags of one Python file (see the module docstring for their form)."""
    rel = path.relative_to(root).as_posix()
    module = ".".join(path.relative_to(root).with_suffix("").parts)
    module = module.removesuffix(".__init__")
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    default = module_paper(ast.get_docstring(tree))
    scopes = _scopes(tree)
    result = Scan()
    for line, comment in _trailing_comments(source):
        for prefix, number in parse_tag(comment):
            where = f"{rel}:{line}"
            paper = PREFIXES[prefix] if prefix else default
            if paper is None:
                result.problems.append(
                    f"{where}: {comment!r} names no paper and the module docstring cites none "
                    f"(cite one of {[p.cite for p in PAPERS.values()]}, or write e.g. "
                    f"'WS Eq. ({number})')")
                continue
            if lookup(paper, number) is None:
                result.problems.append(
                    f"{where}: {comment!r} names {PAPERS[paper].name} Eq. ({number}), "
                    "which the registry lacks")
                continue
            inner = [s for s in scopes if s[0] <= line <= s[1]]
            scope = max(inner, key=lambda s: len(s[2]))[2] if inner else ()
            result.tags.append(Tag(paper, number, rel, line, module, scope))
    return result


def scan(package: Path = PACKAGE) -> Scan:
    """The tags of every module of refnorm but the kernels', in path and line order."""
    result = Scan()
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] in UNSCANNED:
            continue
        found = scan_file(path, package.parent)
        result.tags += found.tags
        result.problems += found.problems
    return result


def tags_of(equation: Equation, tags: Iterable[Tag]) -> list[Tag]:
    """The tags that name ``equation``."""
    return [t for t in tags if (t.paper, t.number) == (equation.paper, equation.number)]


def registry_problems(tags: Iterable[Tag]) -> list[str]:
    """What is wrong between the registry and the tags.

    Whether the cited tests exist is checked by ``tests/errata/test_equations.py``: the tests
    are not part of the package.
    """
    tags = list(tags)
    out = []
    for e in EQUATIONS:
        name = f"{PAPERS[e.paper].name} Eq. ({e.number})"
        mine = tags_of(e, tags)
        code = [t for t in mine if not t.in_errata]
        if e.verdict not in VERDICTS:
            out.append(f"{name}: unknown verdict {e.verdict!r}")
        if e.verdict in (VERIFIED, DEFINITION) and not mine:
            out.append(f"{name} is {e.verdict!r} but no line is tagged with it")
        if e.verdict == PRINTED_WRONG and not code:
            out.append(f"{name}: printed wrong, but no line outside the errata computes the "
                       "corrected form")
        if e.verdict == PRINTED_WRONG and not e.errata:
            out.append(f"{name}: printed wrong needs its errata section's label")
        if e.verdict == NOT_IMPLEMENTED and code:
            out.append(f"{name} is not implemented but {code[0].path}:{code[0].line} is tagged")
        if e.verdict == NOT_IMPLEMENTED and not e.note:
            out.append(f"{name}: not implemented needs its reason")
        if not mine and not e.untagged:
            out.append(f"{name}: nothing is tagged, so the row needs `untagged`")
        if not e.tests:
            out.append(f"{name}: no test backs the verdict")
        if "|" in e.latex:
            out.append(f"{name}: a | in the LaTeX would end the table cell")
        if lookup(e.paper, e.number) is not e:
            out.append(f"{name} is registered twice")
    for key in PAPERS:
        numbers = [e.number for e in equations(key)]
        if numbers != list(range(1, len(numbers) + 1)):
            out.append(f"{PAPERS[key].name}: the numbers {numbers} are not 1..{len(numbers)}")
    return out


# -- coverage ----------------------------------------------------------------------------------

_COUNTED = ((VERIFIED, "implemented and verified"), (PRINTED_WRONG, "printed wrong"),
            (DEFINITION, "definition only"), (NOT_IMPLEMENTED, "not implemented"))


def coverage(paper: str) -> dict[str, int]:
    """How many of ``paper``'s equations have each verdict (zeros included)."""
    found = equations(paper)
    return {v: sum(e.verdict == v for e in found) for v in VERDICTS}


def coverage_line(paper: str) -> str:
    """E.g. "SN journal: 25 numbered equations, 22 implemented and verified, 3 printed
    wrong" (verdicts no equation has are left out)."""
    counts, total, p = coverage(paper), len(equations(paper)), PAPERS[paper]
    parts = [f"{counts[v]} {words}" for v, words in _COUNTED if counts[v]]
    unit = p.unit if total != 1 else p.unit.replace("equations", "equation").replace(
        "formulas", "formula")
    return f"{p.name}: {total} {unit}, " + ", ".join(parts)


# -- the page ----------------------------------------------------------------------------------


def _link(module: str, scope: tuple[str, ...]) -> str:
    """A MyST link into the API reference for the code at ``scope`` of ``module``.

    A public, documented function, class or method gets its own role; a private or
    undocumented one is named in code after a link to what holds it (its class or module).
    """
    mod = importlib.import_module(module)
    documented: list[str] = []            # the longest documented public prefix of scope
    obj: object = mod
    for name in scope:
        obj = getattr(obj, name, None)
        if obj is None or name.startswith("_") or not inspect.getdoc(obj):
            break
        documented.append(name)
    rest = ".".join(scope[len(documented):])
    if not documented:
        link = f"{{mod}}`{module}`"
        return f"`{rest}` in {link}" if rest else link
    if len(documented) == 2:
        role = "meth"
    else:
        role = "class" if inspect.isclass(getattr(mod, documented[0])) else "func"
    link = f"{{{role}}}`~{'.'.join((module, *documented))}`"
    return f"`{rest}` of {link}" if rest else link


def code_cell(equation: Equation, tags: list[Tag]) -> str:
    """Where refnorm computes ``equation``: each function with its tagged lines."""
    mine = tags_of(equation, tags)
    if not mine:
        return equation.untagged
    groups: dict[tuple[str, tuple[str, ...]], list[Tag]] = {}
    private = [t.in_errata or any(s.startswith("_") for s in t.scope) for t in mine]
    for _, t in sorted(zip(private, mine, strict=True),
                       key=lambda pt: (pt[1].in_errata, pt[0], pt[1].path, pt[1].line)):
        groups.setdefault((t.module, t.scope), []).append(t)
    parts = []
    for (module, scope), group in groups.items():
        lines = ", ".join(str(t.line) for t in group)
        text = f"{_link(module, scope)} `{Path(group[0].path).name}:{lines}`"
        parts.append(("in the errata: " if group[0].in_errata else "") + text)
    return "<br>".join(parts)


def tests_cell(equation: Equation) -> str:
    """The tests that back the verdict, one a line."""
    out = []
    for test in equation.tests:
        path, name = test.split("::")
        out.append(f"`{name}` in `{path.removeprefix('tests/')}`")
    return "<br>".join(out)


def verdict_cell(equation: Equation) -> str:
    """The verdict in words, the errata link where the printed form fails, and the note."""
    e = equation
    text = {VERIFIED: "**implemented and verified**",
            PRINTED_WRONG: f"**printed form wrong**, see {{ref}}`errata <{e.errata}>`",
            DEFINITION: "**definition only**",
            NOT_IMPLEMENTED: "**not implemented**, because"}[e.verdict]
    if e.note:
        text += (" " if e.verdict == NOT_IMPLEMENTED else ": ") + e.note
    return text


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def table(paper: str, tags: list[Tag] | None = None) -> str:
    """The Markdown (MyST) table of ``paper``'s equations, one row each, each row with the
    anchor ``eq-<paper>-<n>``."""
    tags = scan().tags if tags is None else tags
    lines = ["| Eq. | printed equation | what it is | computed by | checked by | verdict |",
             "|---|---|---|---|---|---|"]
    for e in equations(paper):
        cells = (f'<span id="{e.anchor}"></span>({e.number})', f"${e.latex}$", e.what,
                 code_cell(e, tags), tests_cell(e), verdict_cell(e))
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return "\n".join(lines)


def coverage_markdown() -> str:
    """The coverage figures, a Markdown list, one paper a line."""
    return "\n".join(f"- {coverage_line(key)}" for key in PAPERS)
