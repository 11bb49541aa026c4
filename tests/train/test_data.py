"""Data loading: the embedded digits, MNIST IDX and CIFAR-10 pickles written here in their
formats, every error a broken folder or file gives, standardize, batches, load by name."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pathlib
import pickle
import re
import struct
import tracemalloc
import warnings
from importlib import resources

import numpy as np
import pytest

from refnorm.train.data import (
    Dataset,
    batches,
    fingerprint,
    load,
    load_cifar10,
    load_digits,
    load_mnist,
    standardize,
)

# The class counts of the 1797 digits (the UCI optdigits test set) and the SHA-256 of the
# embedded arrays' bytes, as recorded in refnorm/train/datasets/README.md.
DIGITS_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
DIGITS_IMAGES_SHA256 = "8f26b2bd9d135c256808f68f14fdabddde6d9c7f869ae419704b051f0f14b3b3"
DIGITS_LABELS_SHA256 = "8ba4f891220f5e4c9c819638d1602d74b83618f167043c6da52a2a247841ddf0"

MNIST_NAMES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


# ------------------------------------------------------------------------------------------
# digits


def embedded_digits():
    """The raw arrays of the embedded file: images (1797, 8, 8) and labels (1797,), uint8."""
    raw = resources.files("refnorm.train").joinpath("datasets/digits.npz").read_bytes()
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        return z["images"], z["labels"]


def sample_rows(x, y):
    """Each sample as bytes: its 64 values k = 16 x (exact) and its label."""
    k = np.rint(x.reshape(len(x), 64) * 16).astype(np.uint8)
    return [row.tobytes() + bytes([label]) for row, label in zip(k, y, strict=True)]


def embedded_rows():
    images, labels = embedded_digits()
    return [im.tobytes() + bytes([label]) for im, label in zip(images, labels, strict=True)]


def test_embedded_file_is_the_recorded_one():
    images, labels = embedded_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.uint8
    assert hashlib.sha256(images.tobytes()).hexdigest() == DIGITS_IMAGES_SHA256
    assert hashlib.sha256(labels.tobytes()).hexdigest() == DIGITS_LABELS_SHA256


def test_digits_shapes_dtypes_and_values():
    d = load_digits()
    assert (d.name, d.num_classes) == ("digits", 10)
    assert d.x_train.shape == (1438, 1, 8, 8) and d.x_test.shape == (359, 1, 8, 8)
    assert d.x_train.dtype == d.x_test.dtype == np.float32
    assert d.y_train.dtype == d.y_test.dtype == np.int64
    x = np.concatenate([d.x_train, d.x_test])
    assert x.min() == 0.0 and x.max() == 1.0
    # Every value is k / 16 for an integer k in 0..16, exactly (16 is a power of two).
    np.testing.assert_array_equal(x * 16, np.rint(x * 16))


@pytest.mark.parametrize("test_fraction", [0.2, 0.5, 0.01])
def test_digits_split_is_stratified_and_keeps_every_sample(test_fraction):
    d = load_digits(test_fraction=test_fraction)
    train_counts = np.bincount(d.y_train, minlength=10)
    test_counts = np.bincount(d.y_test, minlength=10)
    np.testing.assert_array_equal(train_counts + test_counts, DIGITS_CLASS_COUNTS)
    expected = [min(max(round(test_fraction * n), 1), n - 1) for n in DIGITS_CLASS_COUNTS]
    np.testing.assert_array_equal(test_counts, expected)
    # Train and test together hold each of the 1797 (image, label) pairs once.
    split = sorted(sample_rows(d.x_train, d.y_train) + sample_rows(d.x_test, d.y_test))
    assert split == sorted(embedded_rows())


def test_digits_split_is_deterministic_and_shuffled():
    a, b, other = load_digits(seed=7), load_digits(seed=7), load_digits(seed=8)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.y_train, other.y_train)
    # Not sorted by class: a batch taken from the front sees several classes.
    assert len(np.unique(a.y_train[:50])) > 5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"test_fraction": 0.0}, ValueError, r"test_fraction must be in \(0, 1\); got 0.0"),
        ({"test_fraction": 1}, ValueError, r"test_fraction must be in \(0, 1\); got 1"),
        ({"test_fraction": "0.2"}, TypeError, "test_fraction must be a real number; got str"),
        ({"seed": 1.5}, TypeError, "seed must be an int; got float"),
        ({"seed": -1}, ValueError, r"seed must be >= 0 \(it seeds numpy's Generator\); got -1"),
    ],
)
def test_digits_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        load_digits(**kwargs)


# ------------------------------------------------------------------------------------------
# MNIST: IDX files written here


def idx_bytes(a: np.ndarray, *, magic: int | None = None) -> bytes:
    """An unsigned-byte IDX file: 0, 0, 0x08, ndim, the sizes as big-endian uint32, data."""
    magic = 0x0800 + a.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + np.asarray(a.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(a, dtype=np.uint8).tobytes()


def write_file(path, data: bytes, *, gz: bool = False):
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def mnist_arrays(seed=0, n_train=5, n_test=3):
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, size=n_train, dtype=np.uint8),
        rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, size=n_test, dtype=np.uint8),
    ]


def write_mnist(directory, arrays, gz=(False, False, False, False)):
    directory.mkdir(parents=True, exist_ok=True)
    for name, a, z in zip(MNIST_NAMES, arrays, gz, strict=True):
        write_file(directory / name, idx_bytes(a), gz=z)


@pytest.mark.parametrize(
    "gz",
    [(False,) * 4, (True,) * 4, (True, False, False, True)],
    ids=["plain", "gzipped", "mixed"],
)
def test_mnist_round_trips(tmp_path, gz):
    arrays = mnist_arrays()
    write_mnist(tmp_path, arrays, gz)
    d = load_mnist(tmp_path)
    assert (d.name, d.num_classes) == ("mnist", 10)
    assert d.x_train.shape == (5, 1, 28, 28) and d.x_test.shape == (3, 1, 28, 28)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    for x, images in ((d.x_train, arrays[0]), (d.x_test, arrays[2])):
        np.testing.assert_array_equal(x[:, 0], images.astype(np.float32) / np.float32(255))
        # k / 255 in float32 is within half an ulp of the true value: rounding back is exact.
        np.testing.assert_array_equal(np.rint(x[:, 0] * 255), images)
    np.testing.assert_array_equal(d.y_train, arrays[1])
    np.testing.assert_array_equal(d.y_test, arrays[3])


def test_mnist_with_an_empty_test_set_loads_and_leaves_the_refusal_to_the_trainer(tmp_path):
    # an IDX file of 0 samples is a well-formed file: the loader reads it, check_data refuses
    # to train on it (an empty test set), naming what is wrong
    arrays = mnist_arrays(n_test=0)
    write_mnist(tmp_path, arrays)
    d = load_mnist(tmp_path)
    assert d.x_test.shape == (0, 1, 28, 28) and d.y_test.shape == (0,)
    np.testing.assert_array_equal(d.y_train, arrays[1])


def test_mnist_prefers_the_plain_file_to_its_gz(tmp_path):
    arrays = mnist_arrays()
    write_mnist(tmp_path, arrays)
    write_file(tmp_path / MNIST_NAMES[1], b"not read", gz=True)
    np.testing.assert_array_equal(load_mnist(str(tmp_path)).y_train, arrays[1])


def test_mnist_lists_missing_files(tmp_path):
    arrays = mnist_arrays()
    write_file(tmp_path / MNIST_NAMES[0], idx_bytes(arrays[0]))
    write_file(tmp_path / MNIST_NAMES[1], idx_bytes(arrays[1]), gz=True)
    with pytest.raises(FileNotFoundError, match=re.escape(
        "must hold train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (each optionally ending in '.gz'); "
        "missing: t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
    )):
        load_mnist(tmp_path)


def test_mnist_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere is not an existing directory"):
        load_mnist(tmp_path / "nowhere")


def broken_mnist(tmp_path, index, data: bytes, gz=False):
    """A complete MNIST folder whose file ``index`` holds ``data``."""
    write_mnist(tmp_path, mnist_arrays())
    os.remove(tmp_path / MNIST_NAMES[index])
    write_file(tmp_path / MNIST_NAMES[index], data, gz=gz)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_mnist_wrong_magic_number(tmp_path, gz):
    images = mnist_arrays()[0]
    # An image file where a label file belongs: magic 2051, three dimensions.
    broken_mnist(tmp_path, 1, idx_bytes(images), gz=gz)
    with pytest.raises(ValueError, match=(
        r"train-labels-idx1-ubyte(\.gz)?: wrong magic number: expected 2049 "
        r"\(0x00000801, unsigned bytes in 1 dimensions\); got 2051 \(0x00000803\)"
    )):
        load_mnist(tmp_path)


def test_mnist_wrong_type_code_is_a_wrong_magic_number(tmp_path):
    # Type code 0x0D (float32) instead of 0x08 (unsigned byte).
    broken_mnist(tmp_path, 2, idx_bytes(mnist_arrays()[2], magic=0x0D03))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: wrong magic number.*0x00000d03"):
        load_mnist(tmp_path)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_mnist_truncated_file(tmp_path, gz):
    data = idx_bytes(mnist_arrays()[0])[:-100]
    broken_mnist(tmp_path, 0, data, gz=gz)
    with pytest.raises(ValueError, match=(
        r"train-images-idx3-ubyte(\.gz)?: truncated: header gives shape \(5, 28, 28\), "
        r"3920 bytes of data; got 3820 bytes"
    )):
        load_mnist(tmp_path)


def test_mnist_file_longer_than_its_header(tmp_path):
    broken_mnist(tmp_path, 3, idx_bytes(mnist_arrays()[3]) + b"\0")
    with pytest.raises(ValueError, match=(
        r"t10k-labels-idx1-ubyte: longer than its header says: header gives shape \(3,\), "
        r"3 bytes of data; got 4 bytes"
    )):
        load_mnist(tmp_path)


def test_mnist_file_shorter_than_a_header(tmp_path):
    broken_mnist(tmp_path, 0, b"\0\0\x08")
    with pytest.raises(ValueError, match=(
        r"train-images-idx3-ubyte: too short for an IDX header of 3 dimensions \(16 bytes\); "
        r"got 3 bytes"
    )):
        load_mnist(tmp_path)


def test_mnist_cut_gzip_stream(tmp_path):
    write_mnist(tmp_path, mnist_arrays())
    os.remove(tmp_path / MNIST_NAMES[2])
    gz = gzip.compress(idx_bytes(mnist_arrays()[2]))
    (tmp_path / (MNIST_NAMES[2] + ".gz")).write_bytes(gz[: len(gz) // 2])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: not a complete gzip file"):
        load_mnist(tmp_path)


def test_mnist_image_label_count_mismatch(tmp_path):
    broken_mnist(tmp_path, 1, idx_bytes(np.zeros(4, dtype=np.uint8)))
    with pytest.raises(ValueError, match=(
        r"train-images-idx3-ubyte holds 5 images but .*train-labels-idx1-ubyte holds 4 labels"
    )):
        load_mnist(tmp_path)


def test_mnist_label_out_of_range(tmp_path):
    broken_mnist(tmp_path, 3, idx_bytes(np.array([0, 10, 3], dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: labels must be in 0\.\.9; "
                                         r"got values in 0\.\.10"):
        load_mnist(tmp_path)


# ------------------------------------------------------------------------------------------
# CIFAR-10: pickled batches written here


def cifar_batch(rng, n):
    return {
        b"batch_label": b"synthetic batch",
        b"labels": rng.integers(0, 10, size=n).tolist(),
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_cifar(directory, *, protocol=2, seed=0):
    """Six batches of 2 images (4 in test_batch); returns them by name."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in CIFAR_NAMES:
        written[name] = cifar_batch(rng, 4 if name == "test_batch" else 2)
        (directory / name).write_bytes(pickle.dumps(written[name], protocol=protocol))
    return written


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_round_trips(tmp_path, protocol):
    written = write_cifar(tmp_path, protocol=protocol)
    d = load_cifar10(tmp_path)
    assert (d.name, d.num_classes) == ("cifar10", 10)
    assert d.x_train.shape == (10, 3, 32, 32) and d.x_test.shape == (4, 3, 32, 32)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    data = np.concatenate([written[n][b"data"] for n in CIFAR_NAMES[:5]])  # (10, 3072)
    labels = sum((written[n][b"labels"] for n in CIFAR_NAMES[:5]), [])
    np.testing.assert_array_equal(d.x_train.reshape(10, 3072), data / np.float32(255))
    np.testing.assert_array_equal(d.y_train, labels)
    np.testing.assert_array_equal(np.rint(d.x_test.reshape(4, 3072) * 255),
                                  written["test_batch"][b"data"])
    np.testing.assert_array_equal(d.y_test, written["test_batch"][b"labels"])
    # Row layout: 1024 red values, then green, then blue, each 32x32 row-major.
    row = written["test_batch"][b"data"][1]
    assert d.x_test[1, 0, 0, 5] == row[5] / np.float32(255)
    assert d.x_test[1, 1, 2, 3] == row[1024 + 2 * 32 + 3] / np.float32(255)
    assert d.x_test[1, 2, 31, 31] == row[3071] / np.float32(255)


def test_cifar10_accepts_the_parent_of_cifar_10_batches_py(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py")
    d = load_cifar10(str(tmp_path))
    np.testing.assert_array_equal(d.y_test, written["test_batch"][b"labels"])


def test_cifar10_lists_missing_batches(tmp_path):
    write_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    os.remove(tmp_path / "test_batch")
    with pytest.raises(FileNotFoundError, match=re.escape(
        "must hold data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, "
        "test_batch; missing: data_batch_3, test_batch"
    )):
        load_cifar10(tmp_path)


def test_cifar10_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere is not an existing directory"):
        load_cifar10(tmp_path / "nowhere")


def _batch(changes=None):
    """A good batch of 2 images with some entries replaced."""
    batch = cifar_batch(np.random.default_rng(1), 2)
    batch.update(changes or {})
    return batch


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([1, 2, 3], r'expected a dict with keys b"data" and b"labels"; got list'),
        ({k: v for k, v in _batch().items() if k != b"labels"},
         r'expected a dict with keys b"data" and b"labels"; got \[b\'batch_label\''),
        (_batch({b"data": np.zeros((2, 1024), np.uint8)}),
         r'b"data" must be a uint8 array of shape \(N, 3072\); got ndarray uint8 \(2, 1024\)'),
        (_batch({b"data": np.zeros((2, 3072), np.float64)}),
         r'b"data" must be a uint8 array of shape \(N, 3072\); got ndarray float64'),
        (_batch({b"labels": [1, 2, 3]}),
         r'b"labels" must be 2 integers, one per row of b"data"; got list of shape \(3,\)'),
        (_batch({b"labels": [b"cat", b"dog"]}), r'b"labels" must be 2 integers'),
        (_batch({b"labels": [-1, 4]}), r"labels must be in 0\.\.9; got values in -1\.\.4"),
    ],
    ids=["not-a-dict", "no-labels", "data-shape", "data-dtype", "label-count", "label-type",
         "label-range"],
)
def test_cifar10_wrong_pickle_content(tmp_path, content, match):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_2: " + match):
        load_cifar10(tmp_path)


def test_cifar10_truncated_pickle(tmp_path):
    write_cifar(tmp_path)
    raw = (tmp_path / "test_batch").read_bytes()
    (tmp_path / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="test_batch: not a CIFAR-10 batch pickle"):
        load_cifar10(tmp_path)


class _CallsAFunction:
    """Unpickles by calling os.getcwd: harmless here, but any callable could stand there."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar10_refuses_pickles_that_call_functions(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(_batch({b"x": _CallsAFunction()})))
    with pytest.raises(ValueError, match=(
        r"data_batch_1: not a CIFAR-10 batch pickle \(UnpicklingError: refusing to load "
        r"(posix|nt)\.getcwd\)"
    )):
        load_cifar10(tmp_path)


# ------------------------------------------------------------------------------------------
# standardize


def test_standardize_digits_train_split_has_zero_mean_unit_std():
    d = load_digits()
    s = standardize(d)
    assert s is not d and s.name == d.name
    assert s.x_train.dtype == s.x_test.dtype == np.float32
    np.testing.assert_array_equal(s.y_train, d.y_train)
    x = s.x_train.astype(np.float64)
    # Each value carries a float32 rounding error of ~1e-7 relative; averaged over 92032
    # values the mean is off by far less than 1e-6 and the std by ~1e-7.
    assert abs(x.mean()) < 1e-6
    assert abs(x.std() - 1) < 1e-6


def test_standardize_is_per_channel_and_uses_train_statistics():
    rng = np.random.default_rng(0)
    offsets = np.array([12.0, -3.0, 0.5])[None, :, None, None]  # (1, 3, 1, 1)
    scales = np.array([5.0, 0.1, 2.0])[None, :, None, None]
    x_train = (scales * rng.standard_normal((40, 3, 4, 4)) + offsets).astype(np.float32)
    x_test = (scales * rng.standard_normal((10, 3, 4, 4)) + offsets).astype(np.float32)
    y = np.zeros(40, np.int64)
    d = Dataset(x_train, y, x_test, y[:10], name="synthetic", num_classes=1)
    s = standardize(d)
    xs = s.x_train.astype(np.float64)
    # float32 outputs of magnitude ~3: per-value error ~2e-7, the moments over 640 values
    # are within ~1e-7 of 0 and 1; 1e-6 leaves room and still catches any real error.
    np.testing.assert_allclose(xs.mean(axis=(0, 2, 3)), 0, atol=1e-6)
    np.testing.assert_allclose(xs.std(axis=(0, 2, 3)), 1, atol=1e-6)
    mu = x_train.astype(np.float64).mean(axis=(0, 2, 3), keepdims=True)
    sigma = x_train.astype(np.float64).std(axis=(0, 2, 3), keepdims=True)
    # The test split goes through the train statistics: same map, float32 rounding only.
    np.testing.assert_allclose(s.x_test, (x_test - mu) / sigma, rtol=1e-6, atol=1e-6)


def test_standardize_refuses_a_constant_channel():
    x = np.ones((4, 2, 3, 3), np.float32)
    x[:, 1] = np.arange(4, dtype=np.float32)[:, None, None]
    y = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match=r"channels \[0\] are constant in x_train"):
        standardize(Dataset(x, y, x, y, name="c", num_classes=1))


def test_dataset_checks_its_fields():
    x = np.zeros((4, 1, 2, 2), np.float32)
    y = np.zeros(4, np.int64)
    with pytest.raises(TypeError, match=r"x_test must be a float32 numpy array of layout "
                                        r"\(N, C, H, W\); got ndarray float64"):
        Dataset(x, y, x.astype(np.float64), y, name="d", num_classes=1)
    with pytest.raises(TypeError, match="y_train must be an int64 numpy array"):
        Dataset(x, y.astype(np.int32), x, y, name="d", num_classes=1)
    with pytest.raises(ValueError, match="x_train and y_train must hold the same number"):
        Dataset(x, y[:3], x, y, name="d", num_classes=1)


# ------------------------------------------------------------------------------------------
# batches


def labelled(n):
    """x whose sample i is filled with i, y = i: a batch tells which samples it holds."""
    return np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 2, 2)), np.arange(n)


@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize(("n", "batch_size"), [(10, 3), (10, 5), (10, 32), (1, 1)])
def test_batches_cover_every_sample_once_per_epoch(n, batch_size, shuffled):
    x, y = labelled(n)
    rng = np.random.default_rng(0) if shuffled else None
    got = list(batches(x, y, batch_size, rng=rng))
    sizes = [len(yb) for _, yb in got]
    assert sizes == [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    seen = np.concatenate([yb for _, yb in got])
    np.testing.assert_array_equal(np.sort(seen), np.arange(n))
    for xb, yb in got:
        np.testing.assert_array_equal(xb[:, 0, 0, 0], yb)  # x and y stay paired


def test_batches_drop_last():
    x, y = labelled(10)
    got = list(batches(x, y, 3, rng=np.random.default_rng(0), drop_last=True))
    assert [len(yb) for _, yb in got] == [3, 3, 3]
    assert len(np.unique(np.concatenate([yb for _, yb in got]))) == 9


def test_batches_order():
    x, y = labelled(10)
    plain = np.concatenate([yb for _, yb in batches(x, y, 4)])
    np.testing.assert_array_equal(plain, np.arange(10))
    rng = np.random.default_rng(0)
    epoch1 = np.concatenate([yb for _, yb in batches(x, y, 4, rng=rng)])
    epoch2 = np.concatenate([yb for _, yb in batches(x, y, 4, rng=rng)])
    assert not np.array_equal(epoch1, epoch2)
    np.testing.assert_array_equal(epoch1, np.random.default_rng(0).permutation(10))


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((np.zeros(3), np.zeros(4), 2), {}, ValueError, "same number of samples; got 3 and 4"),
        ((np.zeros(3), np.zeros(3), 0), {}, ValueError, "batch_size must be >= 1; got 0"),
        ((np.zeros(3), np.zeros(3), 2.0), {}, TypeError, "batch_size must be an int; got float"),
        ((np.zeros(3), np.zeros(3), 2), {"rng": 0}, TypeError,
         "rng must be a numpy Generator or None; got int"),
    ],
)
def test_batches_check_arguments_when_called(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        batches(*args, **kwargs)  # no iteration needed: the checks run at the call


# ------------------------------------------------------------------------------------------
# load


def test_load_dispatches(tmp_path):
    assert load("digits").x_train.shape == (1438, 1, 8, 8)
    write_mnist(tmp_path / "m", mnist_arrays())
    assert load(f"mnist:{tmp_path / 'm'}").name == "mnist"
    write_cifar(tmp_path / "c")
    assert load(f"cifar10:{tmp_path / 'c'}").name == "cifar10"


@pytest.mark.parametrize("bad", ["mnist", "mnist:", "cifar100:/data", "Digits", ""])
def test_load_rejects_unknown_names(bad):
    with pytest.raises(ValueError, match=re.escape(
        f'the data set must be "digits", "mnist:DIR" or "cifar10:DIR" (DIR a folder); got {bad!r}'
    )):
        load(bad)


def test_load_rejects_a_non_string():
    with pytest.raises(TypeError,
                       match=r"the data set must be named by a str; got (Posix|Windows)Path"):
        load(pathlib.Path("digits"))


def test_load_missing_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not an existing directory"):
        load(f"cifar10:{tmp_path / 'nowhere'}")


@pytest.mark.parametrize("protocol", [2, 5])
def test_corrupt_cifar_pickles_are_one_sentence_naming_the_file(tmp_path, protocol):
    # 1,500 corruptions per protocol of a valid batch (a fixed seed): bytes flipped, runs
    # zeroed or set to 0xFF (huge lengths), the file cut short or stretched. Each either still
    # loads as a batch or is refused with one ValueError sentence that names the file; before,
    # MemoryError, LookupError, OverflowError and numpy's SystemError escaped.
    from refnorm.train.data import _read_cifar_batch

    good = pickle.dumps(cifar_batch(np.random.default_rng(5), 3), protocol=protocol)
    rng = np.random.default_rng([7, protocol])
    path = tmp_path / "test_batch"
    refused = 0
    for _ in range(1500):
        raw = bytearray(good)
        kind = rng.integers(4)
        if kind == 0:
            for i in rng.integers(0, len(raw), size=rng.integers(1, 4)):
                raw[i] = int(rng.integers(256))
        elif kind == 1:
            i = int(rng.integers(0, len(raw) - 8))
            raw[i:i + 8] = bytes([int(rng.choice([0, 255]))]) * 8
        elif kind == 2:
            raw = raw[:int(rng.integers(0, len(raw)))]
        else:
            i = int(rng.integers(0, len(raw)))
            raw[i:i] = bytes(rng.integers(0, 256, size=int(rng.integers(1, 16))).tolist())
        path.write_bytes(bytes(raw))
        try:
            x, y = _read_cifar_batch(path)
        except ValueError as exc:
            refused += 1
            message = str(exc)
            assert message.startswith(f"{path}: ") and "\n" not in message, message
        else:
            assert x.dtype == np.float32 and x.shape[1:] == (3, 32, 32) and len(y) == len(x)
    assert refused >= 500  # many corruptions break the pickle (the rest hit image bytes)


def test_a_file_far_larger_than_a_cifar_batch_is_refused_unread(tmp_path):
    from refnorm.train.data import _read_cifar_batch

    path = tmp_path / "test_batch"
    with open(path, "wb") as f:
        f.truncate(65 * 2**20)  # sparse: no data written
    with pytest.raises(ValueError, match=r"bytes is not a CIFAR-10 batch pickle"):
        _read_cifar_batch(path)


# ------------------------------------------------------------------------------------------
# digits: the split's limits at extreme fractions


@pytest.mark.parametrize("test_fraction", [0.999, 0.001])
def test_digits_every_class_lands_in_both_splits_at_extreme_fractions(test_fraction):
    # The docstring: "at least one sample of each class lands in each split".
    d = load_digits(test_fraction=test_fraction)
    train_counts = np.bincount(d.y_train, minlength=10)
    test_counts = np.bincount(d.y_test, minlength=10)
    assert train_counts.min() >= 1 and test_counts.min() >= 1
    np.testing.assert_array_equal(train_counts + test_counts, DIGITS_CLASS_COUNTS)


# ------------------------------------------------------------------------------------------
# load: NAME:DIR splits at the first colon


def test_load_takes_a_folder_whose_path_holds_a_colon(tmp_path):
    arrays = mnist_arrays()
    write_mnist(tmp_path / "a:b", arrays)
    d = load(f"mnist:{tmp_path / 'a:b'}")
    np.testing.assert_array_equal(d.y_train, arrays[1])


# ------------------------------------------------------------------------------------------
# CIFAR-10 as the official files are: Python 2 pickles (py2 strings, numpy 1's names)


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch can be replaced
    """Writes as Python 2's cPickle did at protocol 2: every str and bytes a py2 string
    (SHORT_BINSTRING / BINSTRING), as in cifar-10-python.tar.gz's batches."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_string(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_string
    dispatch[str] = _save_py2_string


def py2_pickle(obj) -> bytes:
    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(obj)
    # numpy 1's module name, as the official batches refer to it.
    return f.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def test_cifar10_reads_python2_pickles_as_the_official_batches_are(tmp_path):
    rng = np.random.default_rng(3)
    written = {name: cifar_batch(rng, 3) for name in CIFAR_NAMES}
    for name, batch in written.items():
        raw = py2_pickle(batch)
        assert raw.startswith(b"\x80\x02}q\x00(U")
        assert b"cnumpy.core.multiarray\n_reconstruct" in raw
        (tmp_path / name).write_bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy 2 reading numpy 1's names: no warning either
        d = load_cifar10(tmp_path)
    data = np.concatenate([written[n][b"data"] for n in CIFAR_NAMES[:5]])  # (15, 3072)
    np.testing.assert_array_equal(d.x_train.reshape(15, 3072), data / np.float32(255))
    labels = [v for n in CIFAR_NAMES[:5] for v in written[n][b"labels"]]
    np.testing.assert_array_equal(d.y_train, labels)
    np.testing.assert_array_equal(d.y_test, written["test_batch"][b"labels"])


# ------------------------------------------------------------------------------------------
# MNIST: broken or oversized .gz files


@pytest.mark.parametrize("kind", ["not-gzip", "bad-crc"])
def test_mnist_broken_gzip_is_a_value_error_naming_the_file(tmp_path, kind):
    write_mnist(tmp_path, mnist_arrays())
    os.remove(tmp_path / MNIST_NAMES[0])
    data = idx_bytes(mnist_arrays()[0])
    if kind == "not-gzip":
        raw = data  # plain IDX bytes under a .gz name
    else:
        raw = bytearray(gzip.compress(data))
        raw[-6] ^= 0xFF  # the CRC-32 of the trailer
    (tmp_path / (MNIST_NAMES[0] + ".gz")).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: not a complete gzip file"):
        load_mnist(tmp_path)


def test_mnist_corrupt_deflate_stream_is_a_value_error_naming_the_file(tmp_path):
    # A valid gzip header over a corrupt deflate body raises zlib.error, neither OSError nor
    # EOFError: it escaped load_mnist, and `refnorm train` printed a traceback.
    write_mnist(tmp_path, mnist_arrays())
    os.remove(tmp_path / MNIST_NAMES[0])
    raw = bytearray(gzip.compress(idx_bytes(mnist_arrays()[0])))
    raw[12:20] = b"garbage!"
    (tmp_path / (MNIST_NAMES[0] + ".gz")).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: not a complete gzip file"):
        load_mnist(tmp_path)


def test_mnist_header_sizes_whose_product_overflows_are_refused_naming_the_file(tmp_path):
    # 2**31 * 2**31 * 4 wraps to 0 in np.prod's int64, matching an empty payload; the
    # reshape then failed with numpy's message, which names no file.
    header = (2051).to_bytes(4, "big") + (2**31).to_bytes(4, "big") * 2 + (4).to_bytes(4, "big")
    write_mnist(tmp_path, mnist_arrays())
    (tmp_path / MNIST_NAMES[0]).write_bytes(header)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: "):
        load_mnist(tmp_path)


@pytest.mark.parametrize("labels", [[0.7, 3.2], ["3", "4"], [True, False], np.array([1.5, 2.5])],
                         ids=["floats", "strings", "bools", "float-array"])
def test_cifar10_refuses_labels_that_are_not_integers(tmp_path, labels):
    # np.asarray(labels, dtype=np.int64) truncates 0.7 to 0 and parses "3": such a batch
    # loaded and trained on labels its file does not hold.
    write_cifar(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(_batch({b"labels": labels}), protocol=2))
    with pytest.raises(ValueError, match=r'data_batch_2: b"labels" must be 2 integers'):
        load_cifar10(tmp_path)


def test_standardize_refuses_an_empty_training_split():
    # An IDX file of 0 images loads; standardize then failed with numpy's "zero-size array
    # to reduction operation maximum which has no identity".
    x, y = np.zeros((0, 1, 28, 28), np.float32), np.zeros(0, np.int64)
    test = np.zeros((2, 1, 28, 28), np.float32)
    with pytest.raises(ValueError, match=r"the training split is empty \(x_train has shape"):
        standardize(Dataset(x, y, test, np.zeros(2, np.int64), name="mnist", num_classes=10))


def _refused_within_16_mib(load, folder):
    """Call ``load(folder)``, which must raise; assert that Python's allocations peaked below
    16 MiB meanwhile (tracemalloc), then re-raise its error."""
    tracemalloc.start()
    try:
        load(folder)
    except Exception:
        peak = tracemalloc.get_traced_memory()[1]
        assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB"
        raise
    finally:
        tracemalloc.stop()
    raise AssertionError(f"{load.__name__}({folder}) did not refuse")


def test_cifar10_labels_that_share_their_halves_are_refused_unexpanded(tmp_path):
    """A pickle stores a shared object once: 22 levels of [half, half] are a 3 KB file of
    2**22 labels once numpy expands them (each level doubles the time and memory). Refused
    from the outer list's items, before anything is expanded."""
    write_cifar(tmp_path)
    nested: list = [0, 1]
    for _ in range(22):
        nested = [nested, nested]
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(_batch({b"labels": nested}),
                                                         protocol=2))
    with pytest.raises(ValueError, match=r'data_batch_2: b"labels" must be 2 integers'):
        _refused_within_16_mib(load_cifar10, tmp_path)


def test_a_small_gzip_that_inflates_far_beyond_its_header_is_refused_unread(tmp_path):
    """64 MiB of zeros after a header of 5 images is a 64 KiB .gz: refused as longer than its
    header says after reading one byte past what the header counts, not all 64 MiB."""
    arrays = mnist_arrays()
    write_mnist(tmp_path, arrays)
    os.remove(tmp_path / MNIST_NAMES[0])
    payload = idx_bytes(arrays[0]) + bytes(64 << 20)
    (tmp_path / (MNIST_NAMES[0] + ".gz")).write_bytes(gzip.compress(payload, compresslevel=1))
    del payload
    with pytest.raises(ValueError, match=r"idx3-ubyte\.gz.*longer than its header says"):
        _refused_within_16_mib(load_mnist, tmp_path)


def test_a_plain_file_far_longer_than_its_header_is_refused_unread(tmp_path):
    """A header of 5 images followed by 64 MiB: refused from the file's size, with that size
    in the message, before its data is read (it was read whole, then refused)."""
    arrays = mnist_arrays()
    write_mnist(tmp_path, arrays)
    with open(tmp_path / MNIST_NAMES[0], "ab") as f:
        f.truncate(f.tell() + (64 << 20))  # a sparse tail of zeros
    with pytest.raises(ValueError, match=(
            r"train-images-idx3-ubyte: longer than its header says: header gives shape "
            rf"\(5, 28, 28\), 3920 bytes of data; got {3920 + (64 << 20)} bytes")):
        _refused_within_16_mib(load_mnist, tmp_path)


def test_a_training_subset_larger_than_the_data_is_refused(tmp_path):
    """train_subset draws that many training samples; more than the data holds was silently
    the whole set, while the study's report named the subset's size."""
    from refnorm.train.config import TrainConfig
    from refnorm.train.loop import prepare_data

    write_mnist(tmp_path, mnist_arrays())  # 5 training samples
    assert len(prepare_data(TrainConfig(data=f"mnist:{tmp_path}", train_subset=5)).y_train) == 5
    with pytest.raises(ValueError, match=r"train_subset is 6, but mnist:.* has 5 training "):
        prepare_data(TrainConfig(data=f"mnist:{tmp_path}", train_subset=6))


@pytest.mark.parametrize("sizes", [(2**31, 2**31, 4), (60000, 28000, 28000)])
def test_a_gzip_header_claiming_terabytes_is_refused_as_truncated(tmp_path, sizes):
    """An IDX header inside a .gz counting terabytes of images: refused as truncated, naming
    the file (reading the count at once asked for that much memory: OverflowError or
    MemoryError, with a traceback from the command line)."""
    write_mnist(tmp_path, mnist_arrays())
    os.remove(tmp_path / MNIST_NAMES[0])
    header = (2051).to_bytes(4, "big") + b"".join(s.to_bytes(4, "big") for s in sizes)
    (tmp_path / (MNIST_NAMES[0] + ".gz")).write_bytes(gzip.compress(header + bytes(100)))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*truncated"):
        load_mnist(tmp_path)


def test_dataset_refuses_images_without_a_channel_axis():
    # The layout is (N, C, H, W): a grey set of shape (N, H, W) must be given its channel axis.
    x = np.zeros((4, 2, 2), np.float32)
    y = np.zeros(4, np.int64)
    with pytest.raises(TypeError, match=r"x_train must be a float32 numpy array of layout "
                                        r"\(N, C, H, W\); got ndarray float32 \(4, 2, 2\)"):
        Dataset(x, y, x[:, None], y, name="d", num_classes=1)


def test_mnist_magic_number_needs_its_first_two_bytes_zero(tmp_path):
    # An IDX magic number is 0, 0, type code, dimensions (LeCun et al.): 0x01000803 is not 2051.
    broken_mnist(tmp_path, 0, idx_bytes(mnist_arrays()[0], magic=0x01000803))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: wrong magic number: "
                                         r"expected 2051 .* got 16779267 \(0x01000803\)"):
        load_mnist(tmp_path)


def test_a_gzip_is_inflated_only_one_byte_past_what_its_header_counts(tmp_path):
    """The header of 5 images of 28x28 counts 16 + 3920 bytes; of 1 MiB of inflated zeros
    after them exactly one more byte is read (enough to know the file is too long)."""
    from refnorm.train.data import _read_bytes

    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(mnist_arrays()[0]) + bytes(1 << 20)))
    assert len(_read_bytes(path, 3)) == 16 + 5 * 28 * 28 + 1
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(gzip.compress(idx_bytes(mnist_arrays()[1]) + bytes(1 << 20)))
    assert len(_read_bytes(labels, 1)) == 8 + 5 + 1


def test_cifar10_refuses_a_label_array_of_another_length(tmp_path):
    # Labels as a numpy array, one too many for the 2 rows: refused, not paired with the next
    # batch's rows once the five batches are concatenated.
    write_cifar(tmp_path)
    content = _batch({b"labels": np.array([1, 2, 3], dtype=np.int64)})
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(ValueError, match=r'data_batch_2: b"labels" must be 2 integers, one per '
                                         r'row of b"data"; got ndarray of shape \(3,\)'):
        load_cifar10(tmp_path)


class _CallsANumpyFunction:
    """Unpickles by calling numpy.getbufsize: a numpy global, but not an array constructor."""

    def __reduce__(self):
        return (np.getbufsize, ())


def test_cifar10_refuses_numpy_functions_other_than_the_array_constructors(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(_batch({b"x": _CallsANumpyFunction()})))
    with pytest.raises(ValueError, match=(
        r"data_batch_1: not a CIFAR-10 batch pickle "
        r"\(UnpicklingError: refusing to load numpy\.getbufsize\)"
    )):
        load_cifar10(tmp_path)


def test_standardize_takes_its_statistics_in_float64():
    # A channel at 1e4 with a spread of 1e-2 (about ten float32 ulps): a mean rounded to
    # float32 is off by up to half an ulp (5e-4), 0.05 standard deviations; float64 statistics
    # centre the standardized training split to float32 rounding.
    rng = np.random.default_rng(3)
    x = (1e4 + 1e-2 * rng.standard_normal((64, 1, 4, 4))).astype(np.float32)
    y = np.zeros(64, np.int64)
    s = standardize(Dataset(x, y, x, y, name="offset", num_classes=1))
    xs = s.x_train.astype(np.float64)
    mu, sigma = x.astype(np.float64).mean(), x.astype(np.float64).std()
    np.testing.assert_allclose(xs, (x - mu) / sigma, rtol=1e-6, atol=1e-6)
    assert abs(xs.mean()) < 1e-5


def test_standardize_refuses_what_is_not_a_dataset():
    x = np.zeros((2, 1, 2, 2), np.float32)
    with pytest.raises(TypeError, match="dataset must be a Dataset; got tuple"):
        standardize((x, np.zeros(2, np.int64)))


def test_batches_draw_their_order_when_iteration_starts():
    # The docstring: the order is rng.permutation(N), "drawn when iteration starts": two
    # epochs prepared ahead draw in the order they are iterated.
    x, y = labelled(10)
    rng = np.random.default_rng(0)
    first_made, second_made = batches(x, y, 4, rng=rng), batches(x, y, 4, rng=rng)
    reference = np.random.default_rng(0)
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in second_made]),
                                  reference.permutation(10))
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in first_made]),
                                  reference.permutation(10))


def test_fingerprint_tells_apart_the_same_bytes_in_other_shapes():
    from refnorm.train.data import fingerprint

    d = load_digits()
    wide = Dataset(d.x_train.reshape(-1, 1, 4, 16), d.y_train, d.x_test.reshape(-1, 1, 4, 16),
                   d.y_test, name=d.name, num_classes=d.num_classes)
    assert fingerprint(d) == fingerprint(load_digits())
    assert fingerprint(wide) != fingerprint(d)


@pytest.mark.parametrize("field", ["x_train", "y_train", "x_test", "y_test"])
def test_fingerprint_covers_each_of_the_four_arrays(field):
    # one value changed in any array (a relabelled test sample too) is other data
    d = load_digits()
    changed = getattr(d, field).copy()
    changed.flat[0] = 0.5 if changed.dtype == np.float32 else (changed.flat[0] + 1) % 10
    other = Dataset(**{"x_train": d.x_train, "y_train": d.y_train, "x_test": d.x_test,
                       "y_test": d.y_test, field: changed}, name=d.name,
                    num_classes=d.num_classes)
    assert fingerprint(other) != fingerprint(d)


def test_fingerprint_of_strided_views_is_that_of_their_copies():
    # train(data=...) takes arrays as given: views with steps and negative strides included
    d = load_digits()
    views = Dataset(d.x_train[::-2], d.y_train[::-2], d.x_test[:, :, ::2, ::2],
                    d.y_test, name=d.name, num_classes=d.num_classes)
    copies = Dataset(*(np.ascontiguousarray(a) for a in (views.x_train, views.y_train,
                                                          views.x_test, views.y_test)),
                     name=d.name, num_classes=d.num_classes)
    assert fingerprint(views) == fingerprint(copies)


def test_digits_seed_draws_which_samples_are_held_out():
    # Another seed holds out other samples of each class, not only another order.
    a, b = load_digits(seed=0), load_digits(seed=1)
    assert sorted(sample_rows(a.x_test, a.y_test)) != sorted(sample_rows(b.x_test, b.y_test))
