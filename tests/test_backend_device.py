"""refnorm.backend's GPU probe and refnorm.layer.to_device, on the CPU.

Where CuPy is not installed (CI) the probe's branches are driven by a stand-in ``cupy``
module put in ``sys.modules``; its "device arrays" are numpy arrays in a class whose module
is ``cupy``, which is all refnorm.backend uses to tell a CuPy array. The real moves are
checked on a GPU by tests/gpu/test_device.py.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

import refnorm
from refnorm.backend import (
    array_namespace,
    device_namespace,
    gpu_available,
    gpu_problem,
    move_array,
    to_numpy,
)
from refnorm.layer import to_device


class FakeDeviceArray:
    """A numpy array "on the device": ``.get()`` copies it back, as CuPy's does."""

    def __init__(self, a):
        self.a = np.array(a, copy=True)
        self.shape, self.dtype = self.a.shape, self.a.dtype

    def get(self):
        return self.a.copy()


FakeDeviceArray.__module__ = "cupy"


def fake_cupy(available=True):
    cupy = types.ModuleType("cupy")
    cupy.ndarray = FakeDeviceArray
    cupy.asarray = FakeDeviceArray
    if isinstance(available, Exception):
        def is_available():
            raise available
    else:
        def is_available():
            return available
    cupy.is_available = is_available
    return cupy


def test_no_cupy_means_no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    assert gpu_available() is False
    assert "import cupy" in gpu_problem()
    assert "pip install 'refnorm[gpu]'" in gpu_problem()  # what to do, without the source


@pytest.mark.parametrize("available", [False, RuntimeError("cudaErrorNoDevice")])
def test_cupy_without_a_device_means_no_gpu(monkeypatch, available):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(available))
    assert gpu_available() is False
    assert "cupy.is_available()" in gpu_problem()


def test_cupy_with_a_device_is_a_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(True))
    assert gpu_available() is True and gpu_problem() is None


def _layer():
    layer = refnorm.build("bn", 3, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((4, 3, 2))
    layer.forward(x, training=True)
    layer.backward(np.ones_like(x))
    return layer


def _arrays(layer):
    return [a for field in ("params", "state", "grads") for a in getattr(layer, field).values()]


def test_cpu_on_a_numpy_layer_changes_nothing():
    layer = _layer()
    before = _arrays(layer)
    assert to_device(layer, "cpu") is layer
    assert all(a is b for a, b in zip(_arrays(layer), before, strict=True))


def test_gpu_without_a_gpu_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    layer = _layer()
    with pytest.raises(RuntimeError, match=r"no GPU: .*CuPy \(import cupy\)"):
        to_device(layer, "gpu")
    assert all(isinstance(a, np.ndarray) for a in _arrays(layer))  # nothing half-moved


def test_unknown_device_is_a_value_error():
    with pytest.raises(ValueError, match="'cpu' or 'gpu'"):
        to_device(_layer(), "cuda:0")


def test_gpu_and_back_moves_params_state_grads_and_the_namespace(monkeypatch):
    cupy = fake_cupy(True)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    layers = [_layer(), _layer()]
    values = [[a.copy() for a in _arrays(layer)] for layer in layers]
    to_device(layers, "gpu")
    for layer in layers:
        assert _arrays(layer) and all(isinstance(a, FakeDeviceArray) for a in _arrays(layer))
        assert layer.xp is cupy
        with pytest.raises(RuntimeError):  # the cache held host arrays: dropped
            layer.backward(np.ones((4, 3, 2)))
    to_device(layers, "cpu")
    for layer, want in zip(layers, values, strict=True):
        got = _arrays(layer)
        assert all(type(a) is np.ndarray for a in got) and layer.xp is np
        for a, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, w)


def test_a_model_takes_the_device_namespace_with_its_layers(monkeypatch):
    # The model puts its batches beside its layers by its own xp (on_model): it stayed numpy
    # while its layers moved, and the trainer fed host batches to device parameters.
    from refnorm.train.model import ConvNet, on_model

    cupy = fake_cupy(True)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    net = ConvNet(in_channels=3, num_classes=10, norm="bn", widths=(4,))
    assert to_device(net, "gpu") is net
    assert net.xp is cupy and {layer.xp for layer in net.layers()} == {cupy}
    assert isinstance(on_model(net, np.zeros((2, 3, 8, 8))), FakeDeviceArray)
    to_device(net, "cpu")
    assert net.xp is np and {layer.xp for layer in net.layers()} == {np}


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_array_namespace_refuses_a_numpy_matrix():
    from refnorm.backend import array_namespace

    with pytest.raises(TypeError, match=r"got numpy\.matrix.*numpy\.asarray"):
        array_namespace(np.matrix([[1.0, 2.0]]))


def test_array_namespace_refuses_a_mix_wherever_the_odd_array_stands():
    """Every argument is looked at, None skipped (x, gamma, beta: a beta from another
    namespace is as much a mix as an x from one)."""
    xps = pytest.importorskip("array_api_strict")
    a, b, odd = np.ones(2), np.zeros(2), xps.asarray([1.0, 2.0])
    for arrays in [(odd, a, b), (a, odd, b), (a, b, odd), (a, None, b, None, odd)]:
        with pytest.raises(TypeError, match=r"one array namespace; got "):
            array_namespace(*arrays)


def test_array_namespace_skips_none_wherever_it_stands():
    assert array_namespace(None, np.ones(2)) is np
    assert array_namespace(None, None, np.ones(2), None) is np


def test_cpu_leaves_an_array_api_layer_where_it_is():
    """move_array(..., "cpu") converts CuPy arrays only: a layer on another Array API
    namespace keeps its arrays, its namespace and its device (its parameters turned into
    numpy arrays under an xp of array_api_strict would be a broken layer)."""
    xps = pytest.importorskip("array_api_strict")
    device = xps.Device("device1")
    layer = refnorm.build("bn", 3, dtype=xps.float64, xp=xps, device=device)
    x = xps.asarray(np.random.default_rng(0).standard_normal((4, 3, 2)), device=device)
    layer.backward(xps.ones_like(layer.forward(x, training=True)))
    before = _arrays(layer)
    assert to_device(layer, "cpu") is layer
    assert all(a is b for a, b in zip(_arrays(layer), before, strict=True))
    assert layer.xp is xps and layer.device == device


def test_moving_to_the_gpu_twice_keeps_the_device_arrays(monkeypatch):
    """A CuPy array stays as it is (refnorm.backend.move_array): a second to_device(...,
    "gpu") does not copy the parameters through the host, so an optimizer built after the
    first move still holds the arrays the layer updates."""
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(True))
    layer = _layer()
    to_device(layer, "gpu")
    on_gpu = _arrays(layer)
    to_device(layer, "gpu")
    assert all(a is b for a, b in zip(_arrays(layer), on_gpu, strict=True))


def test_a_moved_layer_forgets_the_device_it_was_built_on(monkeypatch):
    """to_device: "a layer whose xp is numpy or CuPy takes the device's namespace (device
    becomes None)": a numpy layer built on device="cpu" must not keep "cpu" on the GPU."""
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(True))
    layer = refnorm.build("bn", 3, dtype=np.float64, device="cpu")
    assert layer.device == "cpu"
    to_device(layer, "gpu")
    assert layer.device is None
    layer = refnorm.build("bn", 3, dtype=np.float64, device="cpu")
    to_device(layer, "cpu")
    assert layer.device is None and layer.xp is np


def test_to_numpy_takes_a_numpy_scalar():
    # A reduction of a numpy array gives a numpy scalar (np.float64), which has no DLPack.
    out = to_numpy(np.float64(2.5))
    assert isinstance(out, np.ndarray) and out.shape == () and out == 2.5


@pytest.mark.parametrize("device", ["CPU", "cuda", "tpu", None])
def test_move_array_and_device_namespace_refuse_another_device(device):
    # Anything but "cpu" used to mean the GPU: a misspelt "CPU" moved arrays to CuPy where
    # it is installed, and said "No module named 'cupy'" where it is not.
    with pytest.raises(ValueError, match=r"^device must be 'cpu' or 'gpu'; got "):
        move_array(np.ones(2), device)
    with pytest.raises(ValueError, match=r"^device must be 'cpu' or 'gpu'; got "):
        device_namespace(device)
