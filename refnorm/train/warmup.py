"""Compile the fast kernels a set of runs uses, once, before the runs start.

numba compiles each kernel on its first call and keeps it in its disk cache. A study trains
its runs in several worker processes at once; on a fresh clone every worker would compile the
same kernels at the same time (each compilation is single-threaded: on 2 cores, twice the CPU
for the same wall time, and far more on a loaded machine). :func:`warm_kernels` runs, in the
calling process, one training step and one evaluation of each distinct model and batch size of
the runs, on random data of the dataset's shape: exactly the kernels and signatures the runs
will call get compiled, once (the message "compiling fast kernels (first run only, about N s)"
comes from :mod:`refnorm.kernels.norms`), and the workers load them from the cache.

Synchronized normalizers run the reference (they have no fast variant); their runs' other
layers are warmed with the single-device normalizer of the same method. A run whose last
micro-batch is smaller may still call one more kernel variant (BN takes whole channels at up
to 4 samples, memory-order tasks beyond): it is compiled in the worker, as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from refnorm.dispatch import fast_applies, get_path
from refnorm.nn import softmax_cross_entropy, softmax_cross_entropy_backward
from refnorm.norms import SwitchableNorm
from refnorm.train.config import TrainConfig
from refnorm.train.evaluate import predict
from refnorm.train.loop import build_model, prepare_data

PLAIN = {"syncbn": "bn", "syncsn": "sn"}


def warm_kernels(configs: Iterable[TrainConfig]) -> int:
    """Run one training step and one evaluation of every distinct model and per-device batch
    of ``configs`` on the fast path (CPU runs only), if a first run's compilation is due (the
    kernels not in numba's cache yet would take :data:`refnorm.kernels.norms.ANNOUNCE_FROM`
    seconds or more; a few cold kernels are left to the workers); return how many were run.

    Nothing is trained: the models are built afresh and dropped, and no file is written.
    """
    if get_path(default="fast") != "fast" or not fast_applies(np.ones(1, np.float32)):
        return 0
    from refnorm.kernels import norms

    if len(norms.cold_kernels()) * norms.COMPILE_SECONDS < norms.ANNOUNCE_FROM:
        return 0
    seen = set()
    shapes: dict[str, tuple[tuple[int, ...], int]] = {}
    for config in configs:
        if config.device != "cpu":
            continue
        warm = dataclasses.replace(config, norm=PLAIN.get(config.norm, config.norm), devices=1)
        key = (warm.data, warm.norm, warm.weight, warm.batch_size, warm.dtype, warm.widths,
               warm.num_groups, warm.sn_inference)
        if key in seen:
            continue
        seen.add(key)
        if warm.data not in shapes:
            data = prepare_data(dataclasses.replace(warm, train_subset=None))
            shapes[warm.data] = (tuple(data.x_train.shape[1:]), data.num_classes)
        sample, classes = shapes[warm.data]
        _step_and_evaluate(warm, sample, classes)
    return len(seen)


def _step_and_evaluate(config: TrainConfig, sample: tuple[int, ...], classes: int) -> None:
    from refnorm.train.data import Dataset

    rng = np.random.default_rng(0)
    x = rng.standard_normal((max(config.batch_size, 256),) + sample).astype(np.float32)
    labels = rng.integers(0, classes, size=len(x)).astype(np.int64)
    stub = Dataset(name=config.data, x_train=x[:1], y_train=labels[:1], x_test=x[:1],
                   y_test=labels[:1], num_classes=classes)
    model = build_model(config, stub)
    batch = slice(0, config.batch_size)
    logits = model.forward(x[batch], training=True)
    _, cache = softmax_cross_entropy(logits, labels[batch])
    model.backward(softmax_cross_entropy_backward(cache))
    for layer in model.layers():  # a batch-average SN has no population yet: any will do here
        if isinstance(layer, SwitchableNorm) and not bool(layer.state["population_ready"]):
            layer.set_population(layer.state["running_mean"], layer.state["running_var"])
    predict(model, x)


__all__ = ["warm_kernels"]
