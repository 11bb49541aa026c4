"""What the benches time, and how: the cases and the interleaved rounds.

Shared by ``refnorm bench`` on the CPU (:mod:`refnorm.bench`) and on a GPU
(:mod:`refnorm.bench_gpu`): the normalizers' forward+backward through the public functions
(:func:`_pure`) and in ``torch.nn.functional`` (:func:`_torch_case`), the training step of the
study's models in refnorm (:func:`_train_step`) and in PyTorch (:func:`_train_step_torch`),
each on the arrays' device; :func:`_interleaved` times implementations in rounds, one call of
each per round in a random order, and :func:`_summary` makes a :class:`Timing` of the times.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

METHODS = ("bn", "in", "ln", "gn", "sn")
GROUPS = 32
EPS = 1e-5
STEP_MODELS = ("bn", "gn", "sn", "gn+ws")
STEP_GROUPS = 4  # the study's ConvNet default
STEP_BATCH = (32, 3, 32, 32)


@dataclass
class Timing:
    """The timings of one implementation of one case, in milliseconds."""

    case: str
    method: str
    shape: tuple[int, ...]
    impl: str
    median_ms: float
    min_ms: float
    max_ms: float
    q1_ms: float
    q3_ms: float
    cpu_ms: float
    faults: float
    repeats: int
    bytes_moved: int
    gb_per_s: float


def _pure(method: str, x, gamma, beta, dy, path: str, xp: Any = np) -> Callable[[], Any]:
    """Forward+backward through the public pure functions of refnorm.norms on ``path``
    ("reference": the readable numpy; "fast": the same calls dispatched to refnorm.kernels,
    argument checks included); ``xp``: the namespace of the arrays (CuPy on a GPU)."""
    from refnorm.norms import (
        batch_norm,
        group_norm,
        instance_norm,
        layer_norm,
        switchable_norm,
    )

    if method == "sn":
        logits = (xp.zeros(3, x.dtype), xp.zeros(3, x.dtype))

        def sn():
            y, cache = switchable_norm.switchable_norm_forward(x, gamma, beta, *logits,
                                                               eps=EPS, path=path)
            return switchable_norm.switchable_norm_backward(dy, cache, path=path)
        return sn
    pairs: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
        "bn": (batch_norm.batch_norm_forward, batch_norm.batch_norm_backward),
        "in": (instance_norm.instance_norm_forward, instance_norm.instance_norm_backward),
        "ln": (layer_norm.layer_norm_forward, layer_norm.layer_norm_backward),
        "gn": (lambda *a, **kw: group_norm.group_norm_forward(*a, num_groups=GROUPS, **kw),
               group_norm.group_norm_backward),
    }
    forward, backward = pairs[method]

    def run():
        y, cache = forward(x, gamma, beta, eps=EPS, path=path)
        return backward(dy, cache, path=path)
    return run


def _torch_case(torch, method: str, x, dy, device: str = "cpu") -> Callable[[], Any] | None:
    """Forward+backward in torch.nn.functional on ``device`` ("cuda": cuDNN's batch norm,
    PyTorch's CUDA group norm); None for SN (no PyTorch counterpart)."""
    if method == "sn":
        return None
    F = torch.nn.functional
    C = x.shape[1]
    xt = torch.from_numpy(x.copy()).to(device).requires_grad_(True)
    dyt = torch.from_numpy(dy.copy()).to(device)
    gt = torch.ones(C, requires_grad=True, device=device)
    bt = torch.zeros(C, requires_grad=True, device=device)
    forward = {
        "bn": lambda: F.batch_norm(xt, None, None, gt, bt, training=True, eps=EPS),
        "in": lambda: F.instance_norm(xt, weight=gt, bias=bt, eps=EPS),
        "ln": lambda: F.group_norm(xt, 1, gt, bt, eps=EPS),  # LN over (C, H, W), per-channel affine
        "gn": lambda: F.group_norm(xt, GROUPS, gt, bt, eps=EPS),
    }[method]

    def run():
        xt.grad = gt.grad = bt.grad = None
        forward().backward(dyt)
    return run


def _train_batch(seed: int = 0, shape: tuple[int, ...] = STEP_BATCH):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    labels = rng.integers(0, 10, size=shape[0])
    return x, labels


def _step_model(model: str, path: str, xp: Any = np):
    """The study's model for ``model`` ("bn", "gn", "sn", "gn+ws") with its layers on
    ``path``, its arrays in ``xp`` (CuPy: on the GPU)."""
    from refnorm.train.model import ConvNet

    norm, _, weight = model.partition("+")
    return ConvNet(in_channels=3, num_classes=10, norm=norm, weight=weight or None,
                   widths=(16, 32, 32), num_groups=STEP_GROUPS, path=path, input_grad=False,
                   xp=xp)


def _train_step(path: str, model: str = "bn", xp: Any = np,
                batch: tuple[int, ...] = STEP_BATCH) -> Callable[[], Any]:
    """One forward, loss and backward of the study's model with its layers on ``path``, on
    a batch of shape ``batch`` in ``xp``."""
    from refnorm.nn import softmax_cross_entropy, softmax_cross_entropy_backward

    net = _step_model(model, path, xp)
    x, labels = _train_batch(shape=batch)
    x, labels = xp.asarray(x), xp.asarray(labels)

    def step():
        logits = net.forward(x, training=True)
        _, cache = softmax_cross_entropy(logits, labels)
        return net.backward(softmax_cross_entropy_backward(cache))
    step.model = net  # type: ignore[attr-defined]
    return step


def _torch_switchable(torch):
    """Switchable Normalization in PyTorch, written as the authors' official code writes it
    (IN moments, the LN and BN ones from them, softmax ratios; separate mean and variance
    ratios), with the moving average of the BN scope, for the step's comparison."""
    nn = torch.nn

    class SwitchNorm2d(nn.Module):  # type: ignore[name-defined]
        def __init__(self, C: int, eps: float = EPS, momentum: float = 0.1) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1, C, 1, 1))
            self.bias = nn.Parameter(torch.zeros(1, C, 1, 1))
            self.mean_weight = nn.Parameter(torch.zeros(3))
            self.var_weight = nn.Parameter(torch.zeros(3))
            self.register_buffer("running_mean", torch.zeros(1, C, 1))
            self.register_buffer("running_var", torch.ones(1, C, 1))
            self.eps, self.momentum = eps, momentum

        def forward(self, x):
            N, C, H, W = x.shape
            x = x.view(N, C, -1)
            mean_in = x.mean(-1, keepdim=True)
            var_in = x.var(-1, keepdim=True, unbiased=False)
            temp = var_in + mean_in ** 2
            mean_ln = mean_in.mean(1, keepdim=True)
            var_ln = temp.mean(1, keepdim=True) - mean_ln ** 2
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = temp.mean(0, keepdim=True) - mean_bn ** 2
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean_bn)
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * var_bn)
            mw = torch.softmax(self.mean_weight, 0)
            vw = torch.softmax(self.var_weight, 0)
            mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * mean_bn
            var = vw[0] * var_in + vw[1] * var_ln + vw[2] * var_bn
            x = (x - mean) / (var + self.eps).sqrt()
            return x.view(N, C, H, W) * self.weight + self.bias

    return SwitchNorm2d


def _train_step_torch(torch, model: str = "bn", device: str = "cpu",
                      batch: tuple[int, ...] = STEP_BATCH) -> Callable[[], Any]:
    """The same network in PyTorch on ``device``: 3x3 convs (no bias; weight-standardized for
    GN+WS) + normalizer + ReLU, 2x2 max pools, global average pool, linear; one forward, loss
    and backward."""
    nn = torch.nn
    F = nn.functional
    norm, _, weight = model.partition("+")

    class WSConv2d(nn.Conv2d):  # type: ignore[name-defined]
        def forward(self, x):  # as refnorm's WS: biased sigma, eps added to sigma
            w = self.weight
            mu = w.mean(dim=(1, 2, 3), keepdim=True)
            sigma = (w - mu).pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
            return F.conv2d(x, (w - mu) / (sigma + EPS), None, self.stride, self.padding)

    conv = WSConv2d if weight == "ws" else nn.Conv2d
    normalizer = {"bn": nn.BatchNorm2d, "gn": lambda c: nn.GroupNorm(STEP_GROUPS, c),
                  "sn": _torch_switchable(torch)}[norm]
    layers: list[Any] = []
    c_in = 3
    for i, width in enumerate((16, 32, 32)):
        layers += [conv(c_in, width, 3, padding=1, bias=False), normalizer(width), nn.ReLU()]
        if i < 2:
            layers.append(nn.MaxPool2d(2))
        c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10)]
    net = nn.Sequential(*layers).to(device)
    x, labels = _train_batch(shape=batch)
    xt, yt = torch.from_numpy(x).to(device), torch.from_numpy(labels).to(device)

    def step():
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(xt), yt).backward()
    return step


def _interleaved(impls: dict[str, Callable[[], Any]], repeats: int,
                 progress: Callable[[str], None]) -> dict[str, dict[str, list[float]]]:
    """Warm each implementation once, then time them in rounds, one call of each per round in
    a random order (seeded): a call right after one that filled the caches with its own data
    (the reference's many temporaries) is slower, and a fixed or rotated order puts some
    implementation after that one more often than the others. Returns wall seconds, process
    CPU seconds and minor page faults of every call."""
    for fn in impls.values():
        fn()
    out: dict[str, dict[str, list[float]]] = {
        name: {"wall": [], "cpu": [], "faults": []} for name in impls}
    names = list(impls)
    order = np.random.default_rng(20)
    for r in range(repeats):
        progress(f"round {r + 1}/{repeats}")
        for i in order.permutation(len(names)):
            name = names[i]
            fn = impls[name]
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            c1 = time.process_time()
            f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            out[name]["wall"].append(t1 - t0)
            out[name]["cpu"].append(c1 - c0)
            out[name]["faults"].append(f1 - f0)
    return out


def _summary(case: str, method: str, shape, impl: str, measured: dict[str, list[float]],
             nbytes: int) -> Timing:
    ms = np.asarray(measured["wall"]) * 1e3
    q1, median, q3 = np.percentile(ms, [25, 50, 75])
    return Timing(case, method, tuple(shape), impl, float(median), float(ms.min()),
                  float(ms.max()), float(q1), float(q3),
                  float(np.median(measured["cpu"]) * 1e3), float(np.mean(measured["faults"])),
                  len(ms), nbytes, nbytes / (median * 1e-3) / 1e9 if nbytes else 0.0)


def _quiet(line: str) -> None:
    """A progress callback that says nothing."""
