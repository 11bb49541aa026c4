"""refnorm.train.warmup compiles, in one process, exactly the kernels a set of runs calls."""

from __future__ import annotations

import os
import subprocess
import sys

from refnorm.train.config import TrainConfig

CODE = """
import json, sys
from refnorm.train.config import TrainConfig
from refnorm.train.warmup import warm_kernels
from refnorm.kernels import norms
configs = [TrainConfig(data="digits", norm="bn", batch_size=32, epochs=1, train_subset=64),
           TrainConfig(data="digits", norm="syncbn", devices=2, batch_size=32, epochs=1,
                       train_subset=64)]
cold = set(norms.cold_kernels())
warmed = warm_kernels(configs)
compiled = sorted(name for name in cold if getattr(norms.loops(), name).signatures)
print(json.dumps({"warmed": warmed, "compiled": compiled, "cold_after": norms.cold_kernels()}))
"""


def test_a_fresh_cache_is_warmed_once_with_a_message_and_only_what_the_runs_call(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                           env=env, check=True)
    import json

    report = json.loads(first.stdout)
    assert report["warmed"] == 1  # syncbn's run warms as bn, at the same batch: one model
    assert first.stderr.count("compiling fast kernels (first run only, about ") == 1
    # a BN model at batch 32: memory-order tasks, convolution, pooling, ReLU, BN's inference
    # forward; neither SN's, nor WS's, nor the channel units
    assert {"tasks_forward", "tasks_backward", "im2col", "col2im", "max_pool",
            "max_pool_backward", "relu_backward", "normalize_affine"} <= set(report["compiled"])
    assert not {"ws_forward", "ws_backward", "unit_forward", "unit_backward",
                "chunk_moments"} & set(report["compiled"])
    again = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                           env=env, check=True)
    assert "compiling fast kernels" not in again.stderr  # loaded from the cache, silently
    assert json.loads(again.stdout)["compiled"] == []


def test_nothing_runs_on_the_reference_path(monkeypatch):
    from refnorm import dispatch
    from refnorm.train.warmup import warm_kernels

    monkeypatch.setattr(dispatch, "_chosen", "reference")
    assert warm_kernels([TrainConfig(data="digits", norm="bn")]) == 0


def test_each_group_count_is_a_model_of_its_own(monkeypatch):
    """GN's kernels take one task per (sample, group) or chunks by the number of groups:
    configurations that differ only in num_groups are warmed separately."""
    from refnorm import dispatch
    from refnorm.kernels import norms
    from refnorm.train import warmup
    from refnorm.train.config import TrainConfig

    monkeypatch.setattr(dispatch, "_chosen", "fast")
    monkeypatch.setattr(norms, "cold_kernels", lambda module=None: ["k"] * 100)
    warmed = []
    monkeypatch.setattr(warmup, "_step_and_evaluate",
                        lambda config, sample, classes: warmed.append(config.num_groups))
    configs = [TrainConfig(data="digits", norm="gn", num_groups=g) for g in (2, 4, 2)]
    assert warmup.warm_kernels(configs) == 2
    assert warmed == [2, 4]


def _record_warmups(monkeypatch):
    from refnorm import dispatch
    from refnorm.kernels import norms
    from refnorm.train import warmup

    monkeypatch.setattr(dispatch, "_chosen", "fast")
    monkeypatch.setattr(norms, "cold_kernels", lambda module=None: ["k"] * 100)
    warmed = []
    monkeypatch.setattr(warmup, "_step_and_evaluate",
                        lambda config, sample, classes: warmed.append(config))
    return warmup, warmed


def test_each_batch_size_is_a_model_of_its_own(monkeypatch):
    """Kernels specialize on the batch (BN's whole channels up to 4 samples, memory-order tasks
    beyond), so runs that differ only in batch size are warmed separately."""
    from refnorm.train.config import TrainConfig

    warmup, warmed = _record_warmups(monkeypatch)
    configs = [TrainConfig(data="digits", norm="bn", batch_size=b) for b in (4, 32, 4)]
    assert warmup.warm_kernels(configs) == 2
    assert [c.batch_size for c in warmed] == [4, 32]


def test_gpu_runs_are_not_warmed_on_the_cpu(monkeypatch):
    """A GPU run's model was trained for a step on the CPU for nothing."""
    from refnorm.train.config import TrainConfig

    warmup, warmed = _record_warmups(monkeypatch)
    configs = [TrainConfig(data="digits", norm="bn", device="gpu"),
               TrainConfig(data="digits", norm="gn", device="cpu")]
    assert warmup.warm_kernels(configs) == 1
    assert [(c.norm, c.device) for c in warmed] == [("gn", "cpu")]


def test_each_dtype_is_a_model_of_its_own(monkeypatch):
    """numba compiles a kernel once per argument type: a float64 run calls other signatures than
    a float32 run of the same model, and both are warmed."""
    warmup, warmed = _record_warmups(monkeypatch)
    configs = [TrainConfig(data="digits", norm="bn", dtype=d)
               for d in ("float32", "float64", "float32")]
    assert warmup.warm_kernels(configs) == 2
    assert [c.dtype for c in warmed] == ["float32", "float64"]


def test_the_warm_up_step_runs_at_the_per_device_micro_batch(monkeypatch):
    """A run's forward sees batch_size samples (one device's micro-batch), not the update's
    devices x batch_size x accumulation: BN's kernels specialize on it (whole channels up to 4
    samples, memory-order tasks beyond), so the warm-up's training forward takes batch_size."""
    from refnorm import dispatch
    from refnorm.train import warmup

    monkeypatch.setattr(dispatch, "_chosen", "reference")  # nothing to compile here
    seen = []
    real = warmup.build_model

    def build(config, data, **options):
        model = real(config, data, **options)
        forward = model.forward

        def recording(x, training):
            if training:
                seen.append(len(x))
            return forward(x, training)

        model.forward = recording
        return model

    monkeypatch.setattr(warmup, "build_model", build)
    config = TrainConfig(data="digits", norm="bn", batch_size=4, accumulation=2)
    warmup._step_and_evaluate(config, (1, 8, 8), 10)  # the digits: 1 x 8 x 8, 10 classes
    assert seen == [4]
