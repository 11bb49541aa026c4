"""Weight Standardization, §2.2-2.3, Eq. (5)-(19), transcribed as printed, and their checks.

Qiao et al. (2019), *Weight Standardization*. The analysis sets eps = 0 ("For convenience, we set
eps = 0 (in Eq. 2)") and follows one output channel c: weights W_c in R^I, the inputs that
meet them x_c in R^{b x I}, outputs y_c = x_c W^_c (Eq. 7). Here that is a small problem with
a smooth loss of y_c, and every printed formula (gradients Eq. 8-9, norm identities
Eq. 10-15, Hessian relations Eq. 17-19) is compared with finite differences. Eq. (15) is
also checked with a dot in place of the hat in its last term (<1, g.> for <1, g^>), a reading
of the printed accent that changes the formula.

Gradients are vectors in R^I; Hessians are I x I; ``grad_hat`` is dL/dW^_c.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refnorm.errata.findings import (
    AGREES,
    Finding,
    fd_gradient,
    fd_jacobian,
    finding,
    relative,
)

HESSIAN_AGREES = 1e-6  # Hessians by central differences of exact gradients: error ~1e-9


# -- the paper's map and loss (eps = 0) --------------------------------------------------------


def centre(w: np.ndarray) -> np.ndarray:
    """Eq. (5): W._c = W_c - (1/I) 1 <1, W_c>."""
    return w - np.mean(w)                                          # Eq. (5)


def scale(w_dot: np.ndarray) -> np.ndarray:
    """Eq. (6): W^_c = W._c / sqrt((1/I) <1, W._c^2>)."""
    return w_dot / np.sqrt(np.mean(w_dot**2))                      # Eq. (6)


@dataclass(frozen=True)
class Problem:
    """One output channel: inputs x (b, I), weights w (I,), and the loss coefficients."""

    x: np.ndarray
    w: np.ndarray
    a: np.ndarray
    c: np.ndarray

    def loss_of_w_hat(self, w_hat: np.ndarray) -> float:
        """A smooth loss of y = x W^ (Eq. 7): sum_b a_b y_b + c_b y_b^2 / 2 + y_b^3 / 6."""
        y = self.x @ w_hat                                          # Eq. (7)
        return float(np.sum(self.a * y + 0.5 * self.c * y**2 + y**3 / 6))

    def grad_of_w_hat(self, w_hat: np.ndarray) -> np.ndarray:
        """dL/dW^ = x^T (a + c y + y^2 / 2), exact."""
        y = self.x @ w_hat
        return self.x.T @ (self.a + self.c * y + 0.5 * y**2)


def problem(seed: int = 0, b: int = 12, I: int = 9) -> Problem:
    rng = np.random.default_rng(seed)
    return Problem(rng.standard_normal((b, I)), 0.3 * rng.standard_normal(I) + 0.1,
                   rng.standard_normal(b), rng.standard_normal(b))


# -- the printed formulas -------------------------------------------------------------------


def printed_eq8(w_hat, grad_hat, sigma):
    """Eq. (8): dL/dW._c = (1/sigma) (dL/dW^ - (1/I) <W^, dL/dW^> W^)."""
    I = w_hat.size
    return (grad_hat - np.dot(w_hat, grad_hat) / I * w_hat) / sigma   # Eq. (8)


def printed_eq9(grad_dot):
    """Eq. (9): dL/dW_c = dL/dW._c - (1/I) 1 <1, dL/dW._c>."""
    return grad_dot - np.mean(grad_dot)                            # Eq. (9)


def printed_eq10(w_hat, grad_hat, sigma):
    """Eq. (10), right side: (1/sigma^2)(||g^||^2 + (1/I^2) <W^, g^>^2 (<W^, W^> - 2I))."""
    I = w_hat.size
    return (np.dot(grad_hat, grad_hat)                                        # Eq. (10)
            + np.dot(w_hat, grad_hat) ** 2 / I**2 * (np.dot(w_hat, w_hat) - 2 * I)) / sigma**2


def printed_eq12(w_hat, grad_hat, sigma):
    """Eq. (11)-(12), right side: (1/sigma^2)(||g^||^2 - (1/I) <W^, g^>^2)."""
    I = w_hat.size
    reduction = np.dot(w_hat, grad_hat) ** 2 / I                   # Eq. (12)
    return (np.dot(grad_hat, grad_hat) - reduction) / sigma**2     # Eq. (11)


def printed_eq13(grad_dot):
    """Eq. (13), right side: ||g.||^2 - (1/I) <1, g.>^2."""
    return np.dot(grad_dot, grad_dot) - np.sum(grad_dot) ** 2 / grad_dot.size   # Eq. (13)


def printed_eq14(w_hat, grad_hat, sigma):
    """Eq. (14), right side: (1 / (I sigma^2)) (<1, g^> - (1/I) <W^, g^> <1, W^>)^2."""
    I = w_hat.size
    along = np.dot(w_hat, grad_hat) * np.sum(w_hat) / I
    return (np.sum(grad_hat) - along) ** 2 / (I * sigma**2)                 # Eq. (14)


def printed_eq15(grad_dot, grad_hat, sigma):
    """Eq. (15), right side, as printed: ||g.||^2 - (1 / (I sigma^2)) <1, g^>^2."""
    I = grad_dot.size
    return np.dot(grad_dot, grad_dot) - np.sum(grad_hat) ** 2 / (I * sigma**2)  # Eq. (15)


def printed_eq15_dot_reading(grad_dot, sigma):
    """Eq. (15) read with a dot for the hat in its last term: <1, g.>^2 for <1, g^>^2."""
    I = grad_dot.size
    return np.dot(grad_dot, grad_dot) - np.sum(grad_dot) ** 2 / (I * sigma**2)


def printed_eq17(h_dot):
    """Eq. (17): H_ij = H._ij - (1/I) sum_k (H._ik + H._kj) + (1/I^2) sum_pq H._pq."""
    I = h_dot.shape[0]
    rows = h_dot.sum(axis=1, keepdims=True)                        # sum_k H._ik
    cols = h_dot.sum(axis=0, keepdims=True)                        # sum_k H._kj
    return h_dot - (rows + cols) / I + h_dot.sum() / I**2          # Eq. (17)


def printed_eq19(h_dot):
    """Eq. (19), middle: ||H._||_F + (1/I^2)(sum H._)^2 - (1/I) sum_i(sum_j H._ij)^2
    - (1/I) sum_j(sum_i H._ij)^2, with ||.||_F standing for the *squared* norm sum H^2."""
    I = h_dot.shape[0]
    return (np.sum(h_dot**2) + h_dot.sum() ** 2 / I**2                # Eq. (19)
            - np.sum(h_dot.sum(axis=1) ** 2) / I - np.sum(h_dot.sum(axis=0) ** 2) / I)


def printed_eq19_bound(h_dot):
    """Eq. (19), right: ||H._||_F - (1/I^2)(sum H._)^2 (squared norm, as above)."""
    I = h_dot.shape[0]
    return np.sum(h_dot**2) - h_dot.sum() ** 2 / I**2               # Eq. (19)


# -- the truth, by finite differences ---------------------------------------------------------


def check_ws_theory(seed: int = 0) -> list[Finding]:
    """Check WS Eq. (8)-(19) (eps = 0) on one small random problem."""
    p = problem(seed)
    w_dot = centre(p.w)
    w_hat = scale(w_dot)
    sigma = np.sqrt(np.mean(w_dot**2))
    I = p.w.size

    def loss_of_w_dot(u):
        return p.loss_of_w_hat(scale(u))

    def loss_of_w(u):
        return p.loss_of_w_hat(scale(centre(u)))

    grad_hat = fd_gradient(p.loss_of_w_hat, w_hat)
    grad_dot = fd_gradient(loss_of_w_dot, w_dot)
    grad_w = fd_gradient(loss_of_w, p.w)

    # exact gradients (Eq. 8-9 with exact dL/dW^), for the Hessians by central differences
    def exact_grad_dot(u):
        return printed_eq8(scale(u), p.grad_of_w_hat(scale(u)), np.sqrt(np.mean(u**2)))

    def exact_grad_w(u):
        return printed_eq9(exact_grad_dot(centre(u)))

    h_dot = fd_jacobian(exact_grad_dot, w_dot)                     # Eq. (16), H.
    h_w = fd_jacobian(exact_grad_w, p.w)                           # Eq. (16), H

    def row(eq, quantity, printed, truth, note, tol=AGREES):
        return finding(eq, quantity, relative(printed, truth), note, tol=tol)

    def zero(eq, quantity, normalized, note):
        # A quantity the paper says is zero, divided by its natural scale: |value| is the error.
        return finding(eq, quantity, abs(normalized), note, tol=1e-8)

    sq = float(np.sum(h_w**2))
    bound = float(printed_eq19_bound(h_dot))
    holds = sq <= bound * (1 + 1e-9)
    findings = [
        row("Eq. (8)", "dL/dW._c", printed_eq8(w_hat, grad_hat, sigma), grad_dot, "agrees"),
        row("Eq. (9)", "dL/dW_c", printed_eq9(grad_dot), grad_w, "agrees"),
        zero("Eq. (8)-(9)", "mean of dL/dW_c / max |dL/dW_c|",
             np.mean(grad_w) / np.abs(grad_w).max(), "zero: Eq. (9) centres the gradient"),
        zero("Eq. (8)-(9)", "cosine of dL/dW_c and W^",
             np.dot(w_hat, grad_w) / np.linalg.norm(grad_w) / np.linalg.norm(w_hat),
             "zero: orthogonal to W^ (eps = 0)"),
        row("Eq. (10)", "||dL/dW._c||^2", printed_eq10(w_hat, grad_hat, sigma),
            np.dot(grad_dot, grad_dot), "agrees"),
        row("Eq. (11)-(12)", "||dL/dW._c||^2", printed_eq12(w_hat, grad_hat, sigma),
            np.dot(grad_dot, grad_dot), "agrees: ||W^||^2 = I by Eq. (6)"),
        row("Eq. (13)", "||dL/dW_c||^2", printed_eq13(grad_dot), np.dot(grad_w, grad_w),
            "agrees"),
        row("Eq. (14)", "(1/I) <1, dL/dW._c>^2", printed_eq14(w_hat, grad_hat, sigma),
            np.sum(grad_dot) ** 2 / I, "agrees"),
        row("Eq. (15)", "||dL/dW_c||^2", printed_eq15(grad_dot, grad_hat, sigma),
            np.dot(grad_w, grad_w), "agrees (its last term has <1, dL/dW^>)"),
        row("Eq. (15), dot reading", "||dL/dW_c||^2",
            printed_eq15_dot_reading(grad_dot, sigma), np.dot(grad_w, grad_w),
            "disagrees: dL/dW. in the last term where the paper prints dL/dW^"),
        row("Eq. (17)", "H = Hessian wrt W_c", printed_eq17(h_dot), h_w, "agrees",
            tol=HESSIAN_AGREES),
        zero("Eq. (18)", "sum_ij H_ij / max |H_ij|", h_w.sum() / np.abs(h_w).max(),  # Eq. (18)
             "zero"),
        row("Eq. (19)", "||H||_F^2", printed_eq19(h_dot), sq,
            "agrees with ||.||_F read as the squared norm, as its first line defines it",
            tol=HESSIAN_AGREES),
        Finding("Eq. (19), bound", "||H||_F^2 <= ||H.||_F^2 - (sum H.)^2 / I^2",
                bool(holds), max(0.0, (sq - bound) / sq),
                f"{'holds' if holds else 'fails'}: {sq:.4g} {'<=' if holds else '>'} {bound:.4g} "
                f"(unconstrained ||H.||_F^2 = {np.sum(h_dot**2):.4g})"),
    ]
    return findings
