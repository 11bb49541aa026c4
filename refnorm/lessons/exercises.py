"""The lessons' exercises as the graders know them: each one's function, hints and known mistakes.

Every known mistake is the exercise's function with one deliberate error, written here once
per exercise as a *variant* taking ``mistake=<name>`` (``functools.partial`` binds it). A
grader runs each variant the way it ran the student's function and names the one whose answer
the student's equals (:func:`refnorm.lessons.grading.diagnose`); ``tests/test_lessons.py``
runs every variant through its lesson's check cell and asserts the check names it.

The hints (``nudges``) go from where to look to the relevant equation; none gives the code.
The variants are deliberately wrong and are no reference for anything: the checks compare
with refnorm's own functions or with finite differences.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from refnorm.lessons.spec import Exercise, Mistake, register

_AXES = (0, 2, 3)  # BN's statistics: every axis but the channel's
_CHANNEL = (1, -1, 1, 1)


def _per_channel(a: Any) -> Any:
    return np.asarray(a).reshape(_CHANNEL)


# -- lesson 01: Batch Normalization -------------------------------------------------------------


def _bn_forward(x: Any, gamma: Any, beta: Any, running_mean: Any, running_var: Any,
                training: bool, momentum: float = 0.1, eps: float = 1e-5, *,
                mistake: str) -> Any:
    axes = (0, 1, 2, 3) if mistake == "all_axes" else _AXES
    k = 1 - momentum if mistake == "momentum_on_old" else momentum
    if training or mistake == "eval_batch_stats":
        mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    else:
        mu, var = _per_channel(running_mean), _per_channel(running_var)
    if training or mistake == "eval_updates":
        m = x.size // mu.size
        batch_mean, batch_var = x.mean(axis=axes), x.var(axis=axes)
        if mistake != "biased_running":
            batch_var = batch_var * m / (m - 1)
        running_mean = (1 - k) * running_mean + k * batch_mean
        running_var = (1 - k) * running_var + k * batch_var
    if mistake == "eps_on_std":
        rstd = 1.0 / (np.sqrt(var) + eps)
    elif mistake == "no_eps":
        rstd = 1.0 / np.sqrt(var)
    else:
        rstd = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mu) * rstd
    y = _per_channel(gamma) * x_hat + _per_channel(beta)
    return y, (x_hat, rstd), running_mean, running_var


register(Exercise(
    id="01.1",
    function="bn_forward",
    nudges=(
        "section 4 describes the two modes. In training the batch's own statistics normalize "
        "and the running ones move towards them; in eval the running ones normalize and "
        "nothing moves. The names of the failing outputs say which part to read again.",
        "running <- (1 - k) running + k (batch statistic) with k = momentum; the variance "
        "that enters the running average is the batch's unbiased one, sum (x - mu)^2 / (m - 1), "
        "while y uses the biased one, sum (x - mu)^2 / m; eps goes under the square root.",
    ),
    mistakes=(
        Mistake("the biased batch variance in the running average",
                "The forward normalizes y with the batch's own spread (divided by m), but "
                "the running variance estimates the population's variance: on average a "
                "biased batch variance is (m - 1)/m of it. Which divisor removes that bias?",
                partial(_bn_forward, mistake="biased_running")),
        Mistake("momentum weighting the old value",
                "In refnorm (and PyTorch) momentum is the weight of the new batch: with 0.1 a "
                "running statistic moves a tenth of the way towards the batch's.",
                partial(_bn_forward, mistake="momentum_on_old")),
        Mistake("batch statistics in eval mode",
                "In eval mode there is no batch to trust (a single image, or a batch whose "
                "images must not affect each other): normalize with the running statistics.",
                partial(_bn_forward, mistake="eval_batch_stats")),
        Mistake("running statistics updated in eval mode",
                "An eval forward uses the running statistics and returns them unchanged.",
                partial(_bn_forward, mistake="eval_updates")),
        Mistake("eps added to the standard deviation",
                "BN puts eps under the square root, sqrt(var + eps), not sqrt(var) + eps.",
                partial(_bn_forward, mistake="eps_on_std")),
        Mistake("eps left out",
                "The eps keeps a constant channel finite; it sits under the square root.",
                partial(_bn_forward, mistake="no_eps")),
        Mistake("one mean and variance for all channels",
                "Every channel has its own statistics: reduce over N, H and W, not over C.",
                partial(_bn_forward, mistake="all_axes")),
    ),
))


def _bn_backward_staged(dy: Any, x: Any, gamma: Any, eps: float, *, mistake: str) -> Any:
    axes, m = _AXES, x.size // x.shape[1]
    g = _per_channel(gamma)
    mu = x.mean(axis=axes, keepdims=True)
    xmu = x - mu
    var = (xmu**2).mean(axis=axes, keepdims=True)
    std = np.sqrt(var + eps)
    inv_std = 1.0 / std
    x_hat = xmu * inv_std
    sum_axes = (0, 1, 2, 3) if mistake == "params_all_axes" else axes
    dbeta = dy.sum(axis=sum_axes)
    dgamma = dy.sum(axis=sum_axes) if mistake == "dgamma_no_x_hat" else (dy * x_hat).sum(
        axis=sum_axes)
    dx_hat = dy * g
    dinv_std = (dx_hat * xmu).sum(axis=axes, keepdims=True)
    dxmu_1 = dx_hat * inv_std
    dstd = (1 if mistake == "inverse_sign" else -1) * dinv_std / std**2
    dvar = dstd / std if mistake == "sqrt_half" else dstd * 0.5 / std
    dsq = dvar * np.ones_like(x) / (1 if mistake == "var_node_sum" else m)
    dxmu_2 = 2.0 * xmu * dsq
    dxmu = dxmu_1 if mistake == "no_var_path" else dxmu_1 + dxmu_2
    dmu = -dxmu.sum(axis=axes, keepdims=True)
    if mistake == "no_mean_path":
        dx = dxmu
    else:
        dx = dxmu + dmu * np.ones_like(x) / (1 if mistake == "mean_node_sum" else m)
    return dx, dgamma, dbeta


register(Exercise(
    id="01.2",
    function="bn_backward_staged",
    nudges=(
        "walk the nodes of section 3 in reverse, one at a time, with the three rules of "
        "section 5: a broadcast value sums its gradient over the broadcast axes, a mean hands "
        "each of its m inputs 1/m of the gradient, a value used twice adds the gradients of "
        "both uses. dgamma and dbeta come from the last node alone.",
        "the local derivatives: d(1/s)/ds = -1/s^2, d sqrt(v + eps)/dv = 1/(2 sqrt(v + eps)), "
        "d mean(u)/du_i = 1/m, d(u^2)/du = 2u; xmu feeds both sq and x_hat, x feeds both mu "
        "and xmu.",
    ),
    mistakes=(
        Mistake("the path through the variance forgotten",
                "The node xmu is used twice, in sq (towards the variance) and in x_hat: its "
                "gradient is the sum of both (rule 3).",
                partial(_bn_backward_staged, mistake="no_var_path")),
        Mistake("the path through the mean forgotten",
                "The input x is used twice, in mu and in xmu: its gradient adds what reaches mu.",
                partial(_bn_backward_staged, mistake="no_mean_path")),
        Mistake("a sum where the variance node divides by m",
                "The node var = mean(sq) hands each of the m entries of sq 1/m of dvar (rule 2).",
                partial(_bn_backward_staged, mistake="var_node_sum")),
        Mistake("a sum where the mean node divides by m",
                "The node mu = mean(x) hands each x only 1/m of dmu (rule 2).",
                partial(_bn_backward_staged, mistake="mean_node_sum")),
        Mistake("the wrong sign for the derivative of 1/s",
                "The derivative of 1/s is negative: a larger standard deviation shrinks x_hat.",
                partial(_bn_backward_staged, mistake="inverse_sign")),
        Mistake("the factor 1/2 of the square root's derivative missing",
                "The derivative of sqrt(v + eps) is 1/(2 sqrt(v + eps)).",
                partial(_bn_backward_staged, mistake="sqrt_half")),
        Mistake("dgamma without x_hat",
                "In y = g * x_hat + b the local derivative towards g is x_hat.",
                partial(_bn_backward_staged, mistake="dgamma_no_x_hat")),
        Mistake("dgamma and dbeta summed over every axis",
                "Gamma and beta have one entry per channel: sum over the axes they were "
                "broadcast over, N, H and W (rule 1), not over C.",
                partial(_bn_backward_staged, mistake="params_all_axes")),
    ),
))


def _bn_backward_closed(dy: Any, x_hat: Any, rstd: Any, gamma: Any, *, mistake: str) -> Any:
    axes = {"axes_batch": (0,), "axes_all": (0, 1, 2, 3)}.get(mistake, _AXES)
    g = 1.0 if mistake == "no_gamma" else _per_channel(gamma)
    reduce = np.sum if mistake == "sums" else np.mean
    mean_dy = reduce(dy, axis=axes, keepdims=True)
    mean_dy_x_hat = reduce((dy if mistake == "x_hat_mean_dy" else dy * x_hat), axis=axes,
                           keepdims=True)
    terms = dy
    if mistake != "no_mean_term":
        terms = terms - mean_dy
    if mistake != "no_var_term":
        terms = terms - x_hat * mean_dy_x_hat
    dx = g * rstd * terms
    return dx, (dy * x_hat).sum(axis=_AXES), dy.sum(axis=_AXES)


register(Exercise(
    id="01.3",
    function="bn_backward_closed",
    nudges=(
        "combine section 6's three derivatives into d x_hat_j / d x_i first (product rule on "
        "x_hat_j = (x_j - mu) r), then contract it with gamma dy_j over j. Each term of the "
        "result is one path of section 5's graph: directly, through mu, through sigma^2.",
        "d x_hat_j / d x_i = r (delta_ij - 1/m - x_hat_i x_hat_j / m); the sums over j become "
        "means over (N, H, W) in each channel.",
    ),
    mistakes=(
        Mistake("the term through the variance dropped",
                "X_hat depends on x through sigma^2 too: the derivative of r = (sigma^2 + "
                "eps)^(-1/2) contributes a term proportional to x_hat.",
                partial(_bn_backward_closed, mistake="no_var_term")),
        Mistake("the term through the mean dropped",
                "Every x_i moves mu, which every x_hat_j subtracts.",
                partial(_bn_backward_closed, mistake="no_mean_term")),
        Mistake("sums where means belong (a missing 1/m)",
                "D mu / d x_i = 1/m: the sums over the channel come with a 1/m.",
                partial(_bn_backward_closed, mistake="sums")),
        Mistake("means over the batch axis only",
                "The statistics, and so the means of the backward, run over N, H and W.",
                partial(_bn_backward_closed, mistake="axes_batch")),
        Mistake("means over every axis, channels included",
                "Each channel has its own statistics: the means run over N, H and W only.",
                partial(_bn_backward_closed, mistake="axes_all")),
        Mistake("gamma left out of dx",
                "DL/dx_hat = gamma dy before anything else.",
                partial(_bn_backward_closed, mistake="no_gamma")),
        Mistake("x_hat times mean(dy) in the variance term",
                "The path through sigma^2 carries mean(dy x_hat), the part of dy along x_hat.",
                partial(_bn_backward_closed, mistake="x_hat_mean_dy")),
    ),
))


def _bn_eval_backward(dy: Any, x: Any, gamma: Any, running_mean: Any, running_var: Any,
                      eps: float, *, mistake: str) -> Any:
    if mistake == "batch_stats":
        mu, var = x.mean(axis=_AXES, keepdims=True), x.var(axis=_AXES, keepdims=True)
    else:
        mu, var = _per_channel(running_mean), _per_channel(running_var)
    if mistake == "no_eps":
        rstd = 1.0 / np.sqrt(var)
    elif mistake == "eps_on_std":
        rstd = 1.0 / (np.sqrt(var) + eps)
    else:
        rstd = 1.0 / np.sqrt(var + eps)
    x_hat = (x - mu) * rstd
    g = 1.0 if mistake == "no_gamma" else _per_channel(gamma)
    if mistake == "training_form":
        dx, _, _ = _bn_backward_closed(dy, x_hat, rstd, gamma, mistake="")
    else:
        dx = dy * g * rstd
    return dx, (dy * x_hat).sum(axis=_AXES), dy.sum(axis=_AXES)


register(Exercise(
    id="01.4",
    function="bn_eval_backward",
    nudges=(
        "in eval mode the mean and variance are constants: write y as a function of x alone "
        "(per channel it is a x + b for two numbers a and b) and differentiate that.",
        "y = gamma (x - running_mean) / sqrt(running_var + eps) + beta, with nothing else "
        "depending on x.",
    ),
    mistakes=(
        Mistake("the training-mode backward",
                "Its mean and x_hat terms are the paths through the batch statistics; in eval "
                "mode the statistics are the running ones, which do not depend on x.",
                partial(_bn_eval_backward, mistake="training_form")),
        Mistake("the batch's statistics in the backward",
                "The eval forward divided by sqrt(running_var + eps): so does its derivative.",
                partial(_bn_eval_backward, mistake="batch_stats")),
        Mistake("gamma left out of dx",
                "Y = gamma x_hat + beta: dx carries gamma.",
                partial(_bn_eval_backward, mistake="no_gamma")),
        Mistake("eps left out",
                "The eval forward divides by sqrt(running_var + eps), eps included; with a "
                "small running variance eps is no rounding detail.",
                partial(_bn_eval_backward, mistake="no_eps")),
        Mistake("eps added to the standard deviation",
                "Eps goes under the square root, with the variance: sqrt(running_var + eps).",
                partial(_bn_eval_backward, mistake="eps_on_std")),
    ),
))


# -- lesson 02: Group Normalization -------------------------------------------------------------


def _grouped(x: Any, G: int, interleaved: bool = False) -> Any:
    N, C = x.shape[:2]
    if interleaved:  # channel c in group c mod G
        return x.reshape(N, C // G, G, *x.shape[2:]).swapaxes(1, 2)
    return x.reshape(N, G, C // G, *x.shape[2:])


def _ungrouped(xg: Any, shape: tuple[int, ...], interleaved: bool = False) -> Any:
    return (xg.swapaxes(1, 2) if interleaved else xg).reshape(shape)


def _gn_forward(x: Any, gamma: Any, beta: Any, G: int, eps: float, *, mistake: str) -> Any:
    N, C = x.shape[:2]
    interleaved = mistake == "interleaved"
    if mistake in ("in_scope", "ln_scope"):
        axes = (2, 3) if mistake == "in_scope" else (1, 2, 3)
        mu, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
        rstd = 1.0 / np.sqrt(var + eps)
        x_hat = (x - mu) * rstd
    else:
        xg = _grouped(x, G, interleaved)
        mu = xg.mean(axis=(2, 3, 4), keepdims=True)
        var = xg.var(axis=(2, 3, 4), keepdims=True, ddof=1 if mistake == "unbiased" else 0)
        rstd = 1.0 / (np.sqrt(var) + eps) if mistake == "eps_on_std" else 1.0 / np.sqrt(
            var + eps)
        x_hat = _ungrouped((xg - mu) * rstd, x.shape, interleaved)
    return _per_channel(gamma) * x_hat + _per_channel(beta), (x_hat, rstd)


register(Exercise(
    id="02.1",
    function="gn_forward",
    nudges=(
        "section 1's table: GN's statistics belong to one sample and one group of C/G "
        "consecutive channels, over all their pixels. View x so that those values lie along "
        "axes of their own, standardize over them, and go back to (N, C, H, W) before the "
        "per-channel affine.",
        "xg = x viewed as (N, G, C/G, H, W); mu and sigma^2 over axes (2, 3, 4), dividing by "
        "m = (C/G) H W; x_hat = (xg - mu) / sqrt(sigma^2 + eps); y = gamma_c x_hat + beta_c "
        "per channel c.",
    ),
    mistakes=(
        Mistake("groups of every G-th channel",
                "Viewing x as (N, C/G, G, H, W) puts channels c, c + G, c + 2G... together. "
                "GN's groups are consecutive channels: the group axis comes first.",
                partial(_gn_forward, mistake="interleaved")),
        Mistake("statistics of one channel (IN's scope)",
                "GN pools the C/G channels of a group: its statistics run over the group's "
                "channels and pixels together.",
                partial(_gn_forward, mistake="in_scope")),
        Mistake("statistics of the whole sample (LN's scope)",
                "That is GN with G = 1. With G groups each sample has G means and variances.",
                partial(_gn_forward, mistake="ln_scope")),
        Mistake("the unbiased variance",
                "Like BN, GN standardizes with the biased variance, dividing by m.",
                partial(_gn_forward, mistake="unbiased")),
        Mistake("eps added to the standard deviation",
                "The eps goes under the square root: sqrt(sigma^2 + eps).",
                partial(_gn_forward, mistake="eps_on_std")),
    ),
))


def _gn_backward(dy: Any, x_hat: Any, rstd: Any, gamma: Any, G: int, *, mistake: str) -> Any:
    N, C = dy.shape[:2]
    dbeta = dy.sum(axis=_AXES)
    dgamma = (dy * x_hat).sum(axis=_AXES)
    g = 1.0 if mistake == "no_gamma" else _per_channel(gamma)
    dxh, xh = _grouped(dy * g, G), _grouped(x_hat, G)
    axes = {"in_means": (3, 4), "ln_means": (1, 2, 3, 4)}.get(mistake, (2, 3, 4))
    reduce = np.sum if mistake == "sums" else np.mean
    terms = dxh - reduce(dxh, axis=axes, keepdims=True)
    if mistake != "no_var_term":
        terms = terms - xh * reduce(dxh * xh, axis=axes, keepdims=True)
    return (rstd * terms).reshape(dy.shape), dgamma, dbeta


register(Exercise(
    id="02.2",
    function="gn_backward",
    nudges=(
        "two steps: the affine's backward in the (N, C, H, W) view (lesson 01, the node "
        "y = g * x_hat + b), then the backward of the standardization in the grouped view, "
        "which is exercise 01.3's closed form with its means over the group's values.",
        "dx_hat = gamma dy; in the view (N, G, C/G, H, W): dx = r (dx_hat - mean(dx_hat) - "
        "x_hat mean(dx_hat x_hat)), means over axes (2, 3, 4); dgamma = sum of dy x_hat and "
        "dbeta = sum of dy over (N, H, W).",
    ),
    mistakes=(
        Mistake("means over one channel's pixels (IN's backward)",
                "The statistics were shared by the whole group, so the means of the backward "
                "run over the group's channels and pixels.",
                partial(_gn_backward, mistake="in_means")),
        Mistake("means over the whole sample (LN's backward)",
                "Each group has its own statistics: the means run within a group.",
                partial(_gn_backward, mistake="ln_means")),
        Mistake("the term through the variance dropped",
                "The group's variance depends on x too: lesson 01's closed form has a term in "
                "x_hat.",
                partial(_gn_backward, mistake="no_var_term")),
        Mistake("sums where means belong (a missing 1/m)",
                "The closed form's sums over the group come with 1/m, m = (C/G) H W.",
                partial(_gn_backward, mistake="sums")),
        Mistake("gamma left out of dx",
                "The affine comes last in the forward, so its backward comes first: "
                "dx_hat = gamma dy.",
                partial(_gn_backward, mistake="no_gamma")),
    ),
))


# -- lesson 03: Switchable Normalization --------------------------------------------------------


def _merge_moments(mu_in: Any, var_in: Any, axis: int, *, mistake: str) -> Any:
    mu = mu_in.mean(axis=axis, keepdims=True)
    within = var_in.mean(axis=axis, keepdims=True)
    if mistake == "no_between":
        return mu, within
    k = mu_in.shape[axis]
    between = ((mu_in - mu) ** 2).sum(axis=axis, keepdims=True)
    if mistake == "sums":
        return mu, var_in.sum(axis=axis, keepdims=True) + between
    if mistake == "one_pass":  # E[h^2] - mu^2 as SN prints it, in the data's dtype
        return mu, (var_in + mu_in * mu_in).mean(axis=axis, keepdims=True) - mu * mu
    return mu, within + between / (k - 1 if mistake == "between_unbiased" else k)


register(Exercise(
    id="03.1",
    function="merge_moments",
    nudges=(
        "write each value's deviation from the union's mean as its deviation from its own "
        "group's mean plus the deviation of that group's mean from the union's; square, sum "
        "over one group, and look at the cross term.",
        "sigma^2 of the union = (1/K) sum over the K groups of sigma_g^2 + (1/K) sum of "
        "(mu_g - mu)^2, with mu the mean of the group means (equal group sizes).",
    ),
    mistakes=(
        Mistake("the mean of the group variances alone",
                "Each group's variance measures its values from its own mean; the union's "
                "mean lies elsewhere, and the spread of the group means is missing.",
                partial(_merge_moments, mistake="no_between")),
        Mistake("the spread of the group means divided by K - 1",
                "This union is described, not a population estimated: its variance is biased "
                "(1/m), and the groups' part of it divides by K.",
                partial(_merge_moments, mistake="between_unbiased")),
        Mistake("sums over the groups where means belong",
                "The union has K times the values of one group: its variance averages over "
                "the groups.",
                partial(_merge_moments, mistake="sums")),
        Mistake("the one-pass form E[h^2] - mu^2 (the printed Eq. 4)",
                "It is exact in exact arithmetic, and passes in float64; in float32, on data "
                "far from zero, E[h^2] and mu^2 agree in their leading digits and their "
                "difference keeps mostly rounding. Merge the deviations from the union's mean "
                "instead (the law of total variance).",
                partial(_merge_moments, mistake="one_pass")),
    ),
))


def _scope_gradient(h: Any, dmu: Any, dvar: Any, scope: str, w: float, wv: float, *,
                    mistake: str) -> Any:
    axes = {"in": (2,), "ln": (1, 2), "bn": (0, 2)}[scope]
    entries = {"in": (), "ln": (1,), "bn": (0,)}[scope]
    if mistake == "no_gather":
        entries = ()
    size = int(np.prod([h.shape[a] for a in axes]))
    if mistake == "size_hw":
        size = h.shape[2]
    mu_k = h.mean(axis=axes, keepdims=True)
    if mistake == "mixed_mean":  # the mean of the entry (the IN one), not the scope's
        mu_k = h.mean(axis=2, keepdims=True)
    dvar_k = dvar.sum(axis=entries, keepdims=True) if entries else dvar
    dmu_k = dmu.sum(axis=entries, keepdims=True) if entries else dmu
    if mistake == "gather_mean" and entries:
        dvar_k = dvar.mean(axis=entries, keepdims=True)
        dmu_k = dmu.mean(axis=entries, keepdims=True)
    ratio_var = w if mistake == "tied" else wv
    two = 1.0 if mistake == "no_two" else 2.0
    return ratio_var * dvar_k * two * (h - mu_k) / size + w * dmu_k / size


register(Exercise(
    id="03.2",
    function="scope_gradient",
    nudges=(
        "one statistic of scope k feeds the mixed mean (or variance) of several entries "
        "(n, c): its gradient is what those entries send it, weighted by the scope's ratio. "
        "Then differentiate the statistic with respect to each of its |I_k| values.",
        "d mu_k / d h = 1/|I_k|, d sigma_k^2 / d h = 2 (h - mu_k)/|I_k| with mu_k the "
        "scope's own mean; the gradient of a statistic is the sum of Eq. (8) (or 7) over the "
        "entries it feeds (over c for LN, over n for BN), times w_k (or w'_k).",
    ),
    mistakes=(
        Mistake("each entry's gradient kept to itself (no sum over the scope)",
                "An LN statistic is shared by the C entries of its image, a BN statistic by "
                "the N entries of its channel: it gathers the gradients of all of them.",
                partial(_scope_gradient, mistake="no_gather")),
        Mistake("the gradients of the entries averaged instead of summed",
                "A statistic used by several entries receives the sum of their gradients "
                "(a value used many times adds its gradients, lesson 01's rule 3).",
                partial(_scope_gradient, mistake="gather_mean")),
        Mistake("|I_k| = HW for every scope",
                "|I_k| is the number of values the scope averages: HW for IN, CHW for LN, NHW "
                "for BN.",
                partial(_scope_gradient, mistake="size_hw")),
        Mistake("the mean ratio on the variance term (tied ratios)",
                "The paper ties the ratios for its notation; SN's variances are mixed with "
                "their own ratios w'_k.",
                partial(_scope_gradient, mistake="tied")),
        Mistake("the factor 2 of the variance's derivative missing",
                "d (h - mu)^2 / dh = 2 (h - mu).",
                partial(_scope_gradient, mistake="no_two")),
        Mistake("each entry's own mean in the variance term",
                "The scope's variance is taken about the scope's mean mu_k, so its derivative "
                "carries h - mu_k.",
                partial(_scope_gradient, mistake="mixed_mean")),
    ),
))


def _logit_gradients(w: Any, S: Any, *, mistake: str) -> Any:
    if mistake == "diagonal":
        return w * (1 - w) * S
    if mistake == "no_w":
        return S - w @ S
    if mistake == "plain_sum":
        return w * (S - S.sum())
    return w * S  # "chain_only": d w_k / d lambda_k = w_k read as the whole Jacobian


register(Exercise(
    id="03.3",
    function="logit_gradients",
    nudges=(
        "lambda_k moves every ratio w_j, not only w_k (they sum to 1): sum the chain rule "
        "over j.",
        "dL/dlambda_k = sum_j S_j dw_j/dlambda_k with dw_j/dlambda_k = w_j (delta_jk - w_k).",
    ),
    mistakes=(
        Mistake("the diagonal of the softmax's Jacobian only",
                "Raising lambda_k lowers every other ratio too: the off-diagonal terms "
                "-w_j w_k count.",
                partial(_logit_gradients, mistake="diagonal")),
        Mistake("the factor w_k missing",
                "Every entry of the k-th column of the Jacobian carries w_k.",
                partial(_logit_gradients, mistake="no_w")),
        Mistake("an unweighted sum of S",
                "The other ratios' gradients enter weighted by those ratios, w_j S_j.",
                partial(_logit_gradients, mistake="plain_sum")),
        Mistake("w_k S_k alone",
                "The derivative of w_k = exp(lambda_k)/sum exp(lambda_z) is not w_k: the "
                "denominator depends on lambda_k too.",
                partial(_logit_gradients, mistake="chain_only")),
    ),
))


# -- lesson 03b: SN's ratios vs batch size (the toy network's backward) -------------------------


def _group_loss_backward(logits: Any, labels: Any, batch: int, *, mistake: str) -> Any:
    if mistake == "no_softmax":
        p = np.array(logits, dtype=np.float64)
    else:
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    if mistake != "no_onehot":
        p[np.arange(len(labels)), labels] -= 1.0
    return p / {"group_count": len(labels), "no_division": 1}.get(mistake, batch)


register(Exercise(
    id="03b.1",
    function="group_loss_backward",
    nudges=(
        "the step's loss is the mean over the whole batch; a group owns some of its terms. "
        "Differentiate one term, -log p_{i, y_i}, with respect to its logits, then scale.",
        "d(-log p_{i,y_i}) / d logits_i = p_i - onehot(y_i); the batch's mean divides every "
        "term by the batch's size.",
    ),
    mistakes=(
        Mistake("the group's own count where the batch's belongs",
                "Dividing by the group's size makes each group's mean loss count fully: the "
                "groups' sum is then (batch / group size) times the batch's mean loss.",
                partial(_group_loss_backward, mistake="group_count")),
        Mistake("the summed loss, not divided at all",
                "The step minimizes the batch's mean loss: each term carries 1/batch.",
                partial(_group_loss_backward, mistake="no_division")),
        Mistake("the one-hot target not subtracted",
                "-log p_{i,y} has two parts, -logits_{i,y} + log sum exp(logits_i): the "
                "first gives -onehot(y).",
                partial(_group_loss_backward, mistake="no_onehot")),
        Mistake("the logits where the softmax belongs",
                "The derivative of log sum exp(logits) is the softmax p, not the logits.",
                partial(_group_loss_backward, mistake="no_softmax")),
    ),
))


def _conv1x1_weight_grad(dz: Any, x: Any, *, mistake: str) -> Any:
    dW = np.einsum("nohw,nchw->oc", dz, x)
    if mistake == "transposed":
        return dW.T
    if mistake == "mean":
        return dW / (x.shape[0] * x.shape[2] * x.shape[3])
    return np.einsum("ohw,chw->oc", dz[0], x[0])  # "first_image"


register(Exercise(
    id="03b.2",
    function="conv1x1_weight_grad",
    nudges=(
        "W_oc appears in every z_nohw: at every image n and pixel (h, w). Its gradient "
        "collects all of them.",
        "dL/dW_oc = sum over n, h, w of dL/dz_nohw x_nchw.",
    ),
    mistakes=(
        Mistake("the gradient transposed, (C_in, C_out)",
                "W maps C_in channels to C_out: its gradient has its shape, (C_out, C_in).",
                partial(_conv1x1_weight_grad, mistake="transposed")),
        Mistake("a mean over images and pixels where the sum belongs",
                "Each use of W_oc adds its own contribution; the loss's scaling is already "
                "in dz.",
                partial(_conv1x1_weight_grad, mistake="mean")),
        Mistake("the first image only",
                "W is shared by every image of the group: sum over n too.",
                partial(_conv1x1_weight_grad, mistake="first_image")),
    ),
))


# -- lesson 04: normalization across devices ----------------------------------------------------


def _chan_merge(counts: Any, means: Any, m2s: Any, *, mistake: str) -> Any:
    n = len(counts) if mistake == "devices_count" else sum(counts)
    if mistake == "unweighted_mean":
        mean = sum(means) / len(means)
    else:
        mean = sum(n_p * mean_p for n_p, mean_p in zip(counts, means, strict=True)) / n
    if mistake == "no_between":
        return n, mean, sum(m2s)
    weight = (lambda n_p: 1.0) if mistake == "unweighted_between" else (lambda n_p: n_p)
    return n, mean, sum(m2_p + weight(n_p) * (mean_p - mean) ** 2
                        for n_p, mean_p, m2_p in zip(counts, means, m2s, strict=True))


register(Exercise(
    id="04.1",
    function="chan_merge",
    nudges=(
        "the count and the sum of the values add up over the devices; for M2, split every "
        "value's deviation from the batch mean at its device's mean, as exercise 03.1 did, "
        "now with groups of different sizes.",
        "n = sum n_p, mean = sum n_p mean_p / n, M2 = sum over p of [M2_p + n_p (mean_p - "
        "mean)^2].",
    ),
    mistakes=(
        Mistake("the devices' M2 added without the spread of their means",
                "Each M2_p measures a shard from its own mean; the batch's mean lies "
                "elsewhere, and each shard's offset adds n_p (mean_p - mean)^2.",
                partial(_chan_merge, mistake="no_between")),
        Mistake("an unweighted mean of the device means",
                "The devices hold different numbers of values (one holds none): weight each "
                "mean by its count.",
                partial(_chan_merge, mistake="unweighted_mean")),
        Mistake("the spread of the device means not weighted by their counts",
                "A shard's offset from the batch mean counts once for every value it holds.",
                partial(_chan_merge, mistake="unweighted_between")),
        Mistake("the number of devices as the count",
                "n counts the values of a channel over the whole batch, not the devices.",
                partial(_chan_merge, mistake="devices_count")),
    ),
))


def _sync_dx(comm: Any, x_hat_p: Any, dy_p: Any, gamma: Any, rstd: Any, n: int, *,
             mistake: str) -> Any:
    g = 1.0 if mistake == "no_gamma" else _per_channel(gamma)
    r = _per_channel(rstd)
    dx_hat = dy_p * g
    sums = [dx_hat.sum(axis=_AXES), (dx_hat * x_hat_p).sum(axis=_AXES)]
    if mistake == "two_allreduces":
        s1, = comm.allreduce_sum([sums[0]])
        s2, = comm.allreduce_sum([sums[1]])
    elif mistake == "local_sums":
        s1, s2 = sums
    else:
        s1, s2 = comm.allreduce_sum(sums)
    count = max(dy_p.size // dy_p.shape[1], 1) if mistake in ("local_count", "local_sums") \
        else n
    return r * (dx_hat - _per_channel(s1) / count - x_hat_p * _per_channel(s2) / count)


register(Exercise(
    id="04.2",
    function="sync_dx",
    nudges=(
        "write lesson 01's closed form for the whole batch and look at which of its "
        "quantities involve other devices' samples: those, and only those, cross devices; "
        "everything that depends on only this device's values stays local.",
        "dx_p = r (dx_hat_p - S1 / n - x_hat_p S2 / n) with dx_hat = gamma dy, S1 = sum of "
        "dx_hat and S2 = sum of dx_hat x_hat over every device's samples, n the batch's "
        "count per channel.",
    ),
    mistakes=(
        Mistake("each device's own sums (no all-reduce)",
                "Every sample of the batch moved the shared mean and variance that this "
                "device's samples used: the sums run over all devices.",
                partial(_sync_dx, mistake="local_sums")),
        Mistake("the device's own count where the batch's belongs",
                "The sums cover the whole batch, so their means divide by the whole batch's "
                "count n, given to the function.",
                partial(_sync_dx, mistake="local_count")),
        Mistake("two all-reduces",
                "Both sums need only this device's dy_p and x_hat_p: they can travel "
                "together, in one call.",
                partial(_sync_dx, mistake="two_allreduces")),
        Mistake("gamma left out",
                "dL/dx_hat = gamma dy, before any sum.",
                partial(_sync_dx, mistake="no_gamma")),
    ),
))


# -- lesson 04b: data-parallel training ---------------------------------------------------------


def _shard_sizes(n: int, P: int, *, mistake: str) -> Any:
    small, extra = divmod(n, P)
    if mistake == "remainder_last":
        return [small] * (P - 1) + [n - small * (P - 1)]
    if mistake == "larger_first":
        return [small + 1] * extra + [small] * (P - extra)
    if mistake == "larger_last":
        return [small] * (P - extra) + [small + 1] * extra
    return [-(-n // P)] * (P - 1) + [n - -(-n // P) * (P - 1)]  # "ceil_then_rest"


register(Exercise(
    id="04b.1",
    function="shard_sizes",
    nudges=(
        "n = P q + r with 0 <= r < P: every shard gets q samples and r of them one more; "
        "where each shard begins, floor(p n / P), says which r.",
        "let shard p start at floor(p n / P); its size is floor((p + 1) n / P) - floor(p n / P).",
    ),
    mistakes=(
        Mistake("the whole remainder on the last device",
                "Dealt out as evenly as possible, no two shards differ by more than one "
                "sample.",
                partial(_shard_sizes, mistake="remainder_last")),
        Mistake("the larger shards first",
                "refnorm spreads the larger shards: shard p starts at floor(p n / P) (22 "
                "samples on 8 devices: 2, 3, 3, 3, 2, 3, 3, 3).",
                partial(_shard_sizes, mistake="larger_first")),
        Mistake("the larger shards last",
                "refnorm spreads the larger shards: shard p starts at floor(p n / P) (22 "
                "samples on 8 devices: 2, 3, 3, 3, 2, 3, 3, 3), not all of them at the end.",
                partial(_shard_sizes, mistake="larger_last")),
        Mistake("ceil(n / P) for every device but the last",
                "With n = 5 on 4 devices that leaves 2, 2, 2 and -1: deal the remainder one "
                "sample at a time instead.",
                partial(_shard_sizes, mistake="ceil_then_rest")),
    ),
))


def _device_weights(sizes: Any, *, mistake: str) -> Any:
    if mistake == "equal":
        return [1 / len(sizes)] * len(sizes)
    if mistake == "counts":
        return [float(n) for n in sizes]
    return [1.0] * len(sizes)  # "full"


register(Exercise(
    id="04b.2",
    function="device_weights",
    nudges=(
        "write the batch's mean loss as a sum over the devices of their own mean losses, and "
        "read off each one's factor.",
        "L = (1/N) sum over samples = sum over p of (n_p / N) times device p's mean loss.",
    ),
    mistakes=(
        Mistake("1/P for every device",
                "That is the mean of the devices' mean losses: right only for equal shards; "
                "a device's samples should count by how many they are.",
                partial(_device_weights, mistake="equal")),
        Mistake("each device's count n_p, not divided by N",
                "The weights of a mean add up to 1.",
                partial(_device_weights, mistake="counts")),
        Mistake("every device's mean loss at weight 1",
                "Summing the devices' mean losses counts every device's samples as if each "
                "device held the whole batch.",
                partial(_device_weights, mistake="full")),
    ),
))


# -- lesson 05: WN, NP and TReLU --------------------------------------------------------------


def _wn_backward(G: Any, V: Any, g: Any, eps: float, *, mistake: str) -> Any:
    norm = np.sqrt(np.sum(V * V, axis=1, keepdims=True))
    v_unit = V / norm
    dg = np.sum(G * V, axis=1)
    if mistake != "dg_no_norm":
        dg = dg / (norm.ravel() + eps)
    along = np.sum(G * v_unit, axis=1, keepdims=True)
    factor = 1.0 if mistake == "projection_no_eps" else norm / (norm + eps)
    if mistake == "no_projection":
        inner = G
    elif mistake == "projection_with_v":
        inner = G - np.sum(G * V, axis=1, keepdims=True) * V
    else:
        inner = G - factor * along * v_unit
    gain = 1.0 if mistake == "no_gain" else g[:, None]
    return gain / (norm + eps) * inner, dg


register(Exercise(
    id="05.1",
    function="wn_backward",
    nudges=(
        "W_j = g_j V_j / (N + eps) with N = ||V_j||: V_j enters twice, in the numerator and "
        "through N; add both paths, and write the second with the unit vector v_hat.",
        "dN/dV_j = v_hat; d(1/(N + eps))/dV_j = -v_hat / (N + eps)^2; "
        "dL/dg_j = <G, V_j>/(N + eps).",
    ),
    mistakes=(
        Mistake("the path through the norm dropped",
                "N depends on V_j too: its derivative removes (almost all of) G's component "
                "along V_j.",
                partial(_wn_backward, mistake="no_projection")),
        Mistake("V where its unit vector belongs in the projection (a missing 1/N^2)",
                "The component of G along V_j is <G, v_hat> v_hat with v_hat = V_j / N.",
                partial(_wn_backward, mistake="projection_with_v")),
        Mistake("the projection without its factor N/(N + eps)",
                "The derivative of 1/(N + eps) brings N/(N + eps), not 1: eps sits outside "
                "the norm.",
                partial(_wn_backward, mistake="projection_no_eps")),
        Mistake("dg without the division by N + eps",
                "W_j = g_j V_j/(N + eps) is linear in g_j with that factor.",
                partial(_wn_backward, mistake="dg_no_norm")),
        Mistake("g left out of dV",
                "Every path from V_j to W_j is scaled by g_j.",
                partial(_wn_backward, mistake="no_gain")),
    ),
))


def _trelu_backward(dy: Any, z: Any, alpha: Any, *, mistake: str) -> Any:
    below = z <= alpha.reshape(1, -1, 1, 1)
    if mistake == "swapped":
        below = ~below
    dz = dy if mistake == "dz_everywhere" else np.where(below, 0.0, dy)
    axes = (0, 1, 2, 3) if mistake == "dalpha_all_axes" else _AXES
    return dz, np.sum(np.where(below, dy, 0.0), axis=axes)


register(Exercise(
    id="05.2",
    function="trelu_backward",
    nudges=(
        "max(z, alpha) is one of its two arguments at every position: the gradient goes to "
        "the one that was chosen, and alpha_j is shared by every position of channel j.",
        "dz = dy where z > alpha, else 0; dalpha_j = sum of dy over channel j's positions "
        "where z <= alpha_j.",
    ),
    mistakes=(
        Mistake("the two sides of the bend swapped",
                "Where z > alpha the output is z: the gradient goes to z there, to alpha "
                "elsewhere.",
                partial(_trelu_backward, mistake="swapped")),
        Mistake("dz passed everywhere",
                "Where z <= alpha the output is alpha, a constant for z: no gradient reaches "
                "z there.",
                partial(_trelu_backward, mistake="dz_everywhere")),
        Mistake("dalpha summed over every axis",
                "Each channel has its own alpha_j: sum over N, H and W only.",
                partial(_trelu_backward, mistake="dalpha_all_axes")),
    ),
))


# -- lesson 05b: Weight Standardization ---------------------------------------------------------


def _ws_backward_eq89(g_hat: Any, W_hat: Any, sigma: Any, *, mistake: str) -> Any:
    divisor = 1 if mistake == "projection_no_1_over_i" else W_hat.shape[1]
    proj = np.sum(W_hat * g_hat, axis=1, keepdims=True) / divisor
    inner = g_hat if mistake == "no_projection" else g_hat - proj * W_hat
    dW_dot = inner / (sigma**2 if mistake == "sigma_squared" else sigma)
    return dW_dot if mistake == "no_mean" else dW_dot - dW_dot.mean(axis=1, keepdims=True)


register(Exercise(
    id="05b.1",
    function="ws_backward_eq89",
    nudges=(
        "Eq. 6 divides by sigma, which depends on W_dot (as WN's norm depends on V: lesson "
        "05's exercise): two paths; then Eq. 5 is linear, W_dot = W - mean(W), and its "
        "backward is its transpose.",
        "d sigma / d W_dot = W_dot / (I sigma) = W_hat / I; so dL/dW_dot = (g_hat - <W_hat, "
        "g_hat> W_hat / I) / sigma, and dL/dW = dL/dW_dot - mean(dL/dW_dot).",
    ),
    mistakes=(
        Mistake("Eq. 5's backward (the mean removal) forgotten",
                "W_dot = W - mean(W) is a function of W: moving one weight moves the mean, "
                "which every W_dot subtracts.",
                partial(_ws_backward_eq89, mistake="no_mean")),
        Mistake("the path through sigma forgotten",
                "sigma depends on W_dot: its derivative removes g_hat's component along "
                "W_hat.",
                partial(_ws_backward_eq89, mistake="no_projection")),
        Mistake("the projection without its 1/I",
                "||W_hat||^2 = I: the component of g_hat along W_hat is <W_hat, g_hat> "
                "W_hat / I.",
                partial(_ws_backward_eq89, mistake="projection_no_1_over_i")),
        Mistake("a division by sigma^2 where sigma belongs",
                "W_hat = W_dot / sigma: along any direction that does not change sigma, the "
                "derivative is 1/sigma.",
                partial(_ws_backward_eq89, mistake="sigma_squared")),
    ),
))


def _ws_forward(W: Any, eps: float, correction: int, *, mistake: str) -> Any:
    axis, keep = (None, False) if mistake == "whole_tensor" else (1, True)
    mu = W.mean(axis=axis, keepdims=keep)
    W_dot = W - mu
    dof = 0 if mistake == "ignores_correction" else correction
    count = W.size if axis is None else W.shape[1]
    var = np.sum(W_dot**2, axis=axis, keepdims=keep) / (count - dof)
    if mistake == "eps_in_root":
        return W_dot / np.sqrt(var + eps)
    return W_dot / (np.sqrt(var) + eps)


register(Exercise(
    id="05b.2",
    function="ws_forward",
    nudges=(
        "Eq. 2 and Eq. 4, one output channel (one row of W) at a time; the correction only "
        "changes what the sum of squared deviations is divided by.",
        "W_hat = (W - mu) / (sigma + eps) per row, mu the row's mean, sigma = sqrt(sum((W - "
        "mu)^2) / (I - correction)).",
    ),
    mistakes=(
        Mistake("the correction ignored",
                "correction=1 divides the sum of squared deviations by I - 1, as torch.std "
                "does by default.",
                partial(_ws_forward, mistake="ignores_correction")),
        Mistake("eps under the square root",
                "WS's Eq. 2 adds eps to sigma; under the root is BN's convention (and "
                "refnorm's eps_mode='sqrt' option).",
                partial(_ws_forward, mistake="eps_in_root")),
        Mistake("one mean and sigma for the whole tensor",
                "Each output channel's filter (each row) is standardized on its own.",
                partial(_ws_forward, mistake="whole_tensor")),
    ),
))


# -- lesson 06: micro-batches ---------------------------------------------------------------------


def _update_gradient(model: Any, xs: Any, ys: Any, micro: int, *, mistake: str) -> Any:
    from refnorm.nn import softmax_cross_entropy, softmax_cross_entropy_backward

    accumulation = len(ys) // micro
    scale = {"sum": 1, "per_sample": micro}.get(mistake, accumulation)
    grads: dict[str, Any] = {}
    for start in range(0, len(ys), micro):
        logits = model.forward(xs[start:start + micro], training=True)
        _, cache = softmax_cross_entropy(logits, ys[start:start + micro])
        model.backward(softmax_cross_entropy_backward(cache) / scale)
        for key, layer, name in model.named_params():
            grads[key] = layer.grads[name].copy() if mistake == "last_only" else grads.get(
                key, 0) + layer.grads[name]
    return grads


register(Exercise(
    id="06.1",
    function="update_gradient",
    nudges=(
        "section 1 writes the update's loss as a sum over the micro-batches of their mean "
        "losses, each with a factor: every micro-batch's backward contributes, and the "
        "contributions add up across the loop.",
        "L = sum over a of (1/A) (mean loss of micro-batch a), A = len(ys) // micro: scale "
        "each micro-batch's gradient by 1/A and add the parameter gradients of all of them.",
    ),
    mistakes=(
        Mistake("the micro-batches' gradients added without the 1/A",
                "Each micro-batch's mean loss is already a mean; the update's mean over A of "
                "them divides by A.",
                partial(_update_gradient, mistake="sum")),
        Mistake("only the last micro-batch's gradient kept",
                "A backward overwrites layer.grads: add each micro-batch's gradients into "
                "your own sums before the next one.",
                partial(_update_gradient, mistake="last_only")),
        Mistake("each micro-batch's gradient divided by its size",
                "The mean loss of a micro-batch already divides by its size; what is left is "
                "the mean over the micro-batches.",
                partial(_update_gradient, mistake="per_sample")),
    ),
))


def _accumulate(micro_grads: Any, sizes: Any, *, mistake: str) -> Any:
    weights = {"by_count": [1 / len(sizes)] * len(sizes), "no_weights": [1.0] * len(sizes),
               "sizes_only": [float(b) for b in sizes]}[mistake]
    return {key: sum(w * g[key] for g, w in zip(micro_grads, weights, strict=True))
            for key in micro_grads[0]}


register(Exercise(
    id="06.2",
    function="accumulate",
    nudges=(
        "write the mean over all samples as a sum over the micro-batches of their mean "
        "losses, and read off each one's factor: it depends on the micro-batch's size.",
        "(1/B) sum_i l_i = sum over a of (b_a / B) (mean loss of micro-batch a), B = sum b_a.",
    ),
    mistakes=(
        Mistake("every micro-batch weighted 1/A",
                "That is the mean of the micro-batches' means: right only for equal sizes. "
                "A micro-batch of 6 must count less than one of 8.",
                partial(_accumulate, mistake="by_count")),
        Mistake("the micro-batches' gradients added without weights",
                "Each is the gradient of a mean loss: their plain sum counts the update A "
                "times.",
                partial(_accumulate, mistake="no_weights")),
        Mistake("the sizes b_a as weights, not divided by B",
                "The weights of a mean add up to 1: each micro-batch's share is b_a / B.",
                partial(_accumulate, mistake="sizes_only")),
    ),
))


# -- lesson 06b: why normalization helps -----------------------------------------------------------


def _equivalent_eps(eps: float, s: float, *, mistake: str) -> float:
    return {"times_s2": eps * s**2, "over_s": eps / s, "unchanged": eps}[mistake]


register(Exercise(
    id="06b.1",
    function="equivalent_eps",
    nudges=(
        "scaling the input by s scales its mean by s and its variance by s^2; eps sits next "
        "to the variance, under the square root. Take the s out of the root.",
        "sqrt(s^2 sigma^2 + eps) = s sqrt(sigma^2 + eps'), solve for eps'.",
    ),
    mistakes=(
        Mistake("eps times s^2",
                "The variance of s z is s^2 sigma^2: taking s^2 out of the root divides eps "
                "by it.",
                partial(_equivalent_eps, mistake="times_s2")),
        Mistake("eps / s",
                "eps sits beside the variance, which scales as s^2, not s.",
                partial(_equivalent_eps, mistake="over_s")),
        Mistake("eps unchanged",
                "eps does not scale with the input, so relative to the input's variance it "
                "changes by 1/s^2: BN divides the scale out only up to eps.",
                partial(_equivalent_eps, mistake="unchanged")),
    ),
))


def _relative_gradient_factor(s: float, *, mistake: str) -> float:
    return {"over_s": 1 / s, "times_s2": s**2, "unchanged": 1.0}[mistake]


register(Exercise(
    id="06b.2",
    function="relative_gradient_factor",
    nudges=(
        "the loss is the same function at W and at s W (up to eps): differentiate "
        "L_s(s W) = L_1(W) with respect to W, then divide by the norm of the scaled weights.",
        "s (dL_s/dW at s W) = dL_1/dW at W, and ||s W|| = s ||W||.",
    ),
    mistakes=(
        Mistake("1/s, the gradient's factor alone",
                "The gradient at s W is 1/s of the gradient at W, and the weights it is "
                "relative to are s times larger.",
                partial(_relative_gradient_factor, mistake="over_s")),
        Mistake("s^2, the factor inverted",
                "Larger weights get smaller gradients: the chain rule through s W brings a "
                "factor s on the other side.",
                partial(_relative_gradient_factor, mistake="times_s2")),
        Mistake("1, no change",
                "The function does not change with s, but its gradient with respect to the "
                "scaled weights does.",
                partial(_relative_gradient_factor, mistake="unchanged")),
    ),
))


# -- lesson 07: why normalization is memory-bound -------------------------------------------------


def _reference_backward_bytes(n: int, itemsize: int, *, mistake: str) -> Any:
    reads, writes = {  # in units of one full-size array
        "reductions_free": (10, 7),  # the four sums and means read nothing
        "inputs_once": (8, 7),  # dy, x_hat and dx_hat read once each
        "no_temporaries": (9, 2),  # the five temporaries neither written nor read back
    }[mistake]
    return reads * n * itemsize, writes * n * itemsize


register(Exercise(
    id="07.1",
    function="reference_backward_bytes",
    nudges=(
        "list every numpy call of affine_backward and standardize_backward in order, as the "
        "table of the forward does: each reads its full-size operands (the same array once) "
        "and, unless it reduces, writes one new full-size array; a sum or mean reads too.",
        "affine_backward makes 4 calls (3 reads of dy, 1 of x_hat, 2 new arrays); "
        "standardize_backward makes 7 (2 of them means); count the reads of dx_hat, x_hat "
        "and of each temporary.",
    ),
    mistakes=(
        Mistake("the sums and means counted as free",
                "A reduction streams its whole operand from memory: dy.sum() reads dy once "
                "more.",
                partial(_reference_backward_bytes, mistake="reductions_free")),
        Mistake("each input read only once",
                "Every numpy call reads its operands again: dy, x_hat and dx_hat each go "
                "through memory once per call that uses them.",
                partial(_reference_backward_bytes, mistake="inputs_once")),
        Mistake("the temporaries left out",
                "Every intermediate of a numpy expression is a new full-size array, written "
                "and then read back by the next call.",
                partial(_reference_backward_bytes, mistake="no_temporaries")),
    ),
))


def _lean_bn_backward(dy: Any, x_hat: Any, rstd: Any, gamma: Any, *, mistake: str) -> Any:
    C = dy.shape[1]
    m = dy.shape[0] if mistake == "samples_count" else dy.size // C
    dbeta = dy.sum(axis=_AXES)
    dx = np.multiply(dy, x_hat)
    dgamma = dx.sum(axis=_AXES)
    gain = np.ones(C) if mistake == "no_gamma" else gamma
    k = (gain * rstd.reshape(C)).reshape(1, C, 1, 1)
    np.multiply(x_hat, (-dgamma / m).reshape(1, C, 1, 1), out=dx)
    if mistake == "dgamma_after_overwrite":
        dgamma = dx.sum(axis=_AXES)
    dx += dy
    dx += (-dbeta / m).reshape(1, C, 1, 1)
    dx *= k
    return dx, dgamma, dbeta


register(Exercise(
    id="07.2",
    function="lean_bn_backward",
    nudges=(
        "section 3's algebra: the two per-channel sums the parameter gradients need give "
        "both means of the closed form, so dx_hat never has to exist; then let one output "
        "array take every step with out= and in-place operators.",
        "dx = gamma rstd (dy - dbeta / m - x_hat dgamma / m), m = N H W, dbeta = sum dy and "
        "dgamma = sum dy x_hat per channel.",
    ),
    mistakes=(
        Mistake("the number of samples where the values per channel belong",
                "The means run over N, H and W: m = N H W values per channel.",
                partial(_lean_bn_backward, mistake="samples_count")),
        Mistake("gamma left out of dx",
                "dL/dx_hat = gamma dy: the per-channel factor is gamma times rstd.",
                partial(_lean_bn_backward, mistake="no_gamma")),
        Mistake("dgamma summed after its scratch array was overwritten",
                "An array reused with out= holds the new values from then on: take every sum "
                "you need from it before writing over it.",
                partial(_lean_bn_backward, mistake="dgamma_after_overwrite")),
    ),
))
