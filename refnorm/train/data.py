"""Image classification data as numpy arrays: digits (embedded), MNIST and CIFAR-10 (local).

Every loader returns a :class:`Dataset`: images ``x`` float32 in ``[0, 1]`` with layout
``(N, C, H, W)``, labels ``y`` int64 ``(N,)``. Nothing is downloaded.

- :func:`load_digits` — the 1797 8x8 "digits" images of scikit-learn (UCI Optical
  Recognition of Handwritten Digits, Alpaydin & Kaynak 1998) shipped inside refnorm
  (``datasets/digits.npz``, see ``datasets/README.md``); values ``0..16`` are divided by 16
  and split into train and test here, stratified by class.
- :func:`load_mnist` — the four IDX files of MNIST (LeCun, Cortes & Burges 1998), plain or
  gzipped. An IDX file is a big-endian header, then the values in C order::

      bytes 0-1  zero
      byte  2    type code, 0x08 = unsigned byte
      byte  3    number of dimensions d (3 for images, 1 for labels)
      4 * d      the size of each dimension, big-endian uint32
      ...        prod(sizes) values

  so the magic number (bytes 0-3 read as one big-endian integer) is 2051 for images and
  2049 for labels. Pixels ``0..255`` are divided by 255.
- :func:`load_cifar10` — the "python version" of CIFAR-10 (Krizhevsky 2009): six pickled
  dicts whose ``b"data"`` is ``(N, 3072)`` uint8, each row the 1024 red, then green, then
  blue values of a 32x32 image in row-major order, and ``b"labels"`` a list of ``N`` ints.
  The pickles are read with an unpickler that builds numpy arrays and nothing else, so a
  tampered file cannot run code.

:func:`standardize` takes per-channel statistics on the training split and applies them to
both splits, ``x_hat = (x - mu_c) / sigma_c``. :func:`batches` iterates over mini-batches;
:func:`load` picks a loader by name (``"digits"``, ``"mnist:DIR"``, ``"cifar10:DIR"``).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import math
import numbers
import os
import pickle
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from refnorm.core.moments import moments

__all__ = [
    "Dataset",
    "batches",
    "check_name",
    "fingerprint",
    "load",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "standardize",
]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split of an image classification set.

    Attributes
    ----------
    x_train : float32 array, (N_train, C, H, W)
    y_train : int64 array, (N_train,)
        Class indices in ``0 .. num_classes - 1``.
    x_test : float32 array, (N_test, C, H, W)
    y_test : int64 array, (N_test,)
    name : str
        ``"digits"``, ``"mnist"`` or ``"cifar10"``.
    num_classes : int
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str
    num_classes: int

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 4):
                raise TypeError(
                    f"x_{split} must be a float32 numpy array of layout (N, C, H, W); got "
                    f"{type(x).__name__} {getattr(x, 'dtype', '')} {np.shape(x)}"
                )
            if not (isinstance(y, np.ndarray) and y.dtype == np.int64 and y.ndim == 1):
                raise TypeError(
                    f"y_{split} must be an int64 numpy array of shape (N,); got "
                    f"{type(y).__name__} {getattr(y, 'dtype', '')} {np.shape(y)}"
                )
            if len(x) != len(y):
                raise ValueError(
                    f"x_{split} and y_{split} must hold the same number of samples; "
                    f"got {len(x)} images and {len(y)} labels"
                )


# ------------------------------------------------------------------------------------------
# Helpers


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {type(value).__name__}")
    if not 0 < float(value) < 1:
        raise ValueError(f"{name} must be in (0, 1); got {value}")


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1; got {value}")


def _check_labels(path: Path, labels: np.ndarray, num_classes: int) -> None:
    if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
        raise ValueError(
            f"{path}: labels must be in 0..{num_classes - 1}; "
            f"got values in {labels.min()}..{labels.max()}"
        )


def _find_files(directory: Path, names: list[str], *, suffixes: tuple[str, ...]) -> list[Path]:
    """Return ``directory / (name + suffix)`` for each name, the first suffix that exists.

    Raises ``FileNotFoundError`` listing every expected file and those missing.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not an existing directory")
    found, missing = [], []
    for name in names:
        candidates = [directory / (name + s) for s in suffixes]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            missing.append(name)
        else:
            found.append(hit)
    if missing:
        alternatives = " or ".join(repr(s) for s in suffixes if s)
        note = f" (each optionally ending in {alternatives})" if alternatives else ""
        raise FileNotFoundError(
            f"{directory} must hold {', '.join(names)}{note}; missing: {', '.join(missing)}"
        )
    return found


# ------------------------------------------------------------------------------------------
# digits (embedded)


def _stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): each class sends ``round(test_fraction * n_c)`` samples, at
    least 1 and at most ``n_c - 1``, to test; both index arrays come out shuffled."""
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))  # (n_c,)
        n_test = min(max(round(test_fraction * len(idx)), 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The 1797 scikit-learn digits, 8x8 grey images of 10 classes, from refnorm's own copy.

    Parameters
    ----------
    test_fraction : float in (0, 1)
        Share of each class put in the test split (rounded per class; at least one sample
        of each class lands in each split).
    seed : int, >= 0
        Seeds the numpy Generator that draws the split; the same seed gives the same split.

    Returns
    -------
    Dataset
        ``x`` float32 (N, 1, 8, 8) with values ``k / 16``, ``k`` in ``0..16``; ``y`` int64
        (N,). With the defaults N_train = 1438 and N_test = 359.
    """
    _check_fraction("test_fraction", test_fraction)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int; got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (it seeds numpy's Generator); got {seed}")
    raw = resources.files("refnorm.train").joinpath("datasets/digits.npz").read_bytes()
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        images, labels = z["images"], z["labels"]  # (1797, 8, 8) uint8, (1797,) uint8
    x = (images.astype(np.float32) / np.float32(16))[:, None]  # (N, 1, 8, 8)
    y = labels.astype(np.int64)  # (N,)
    train, test = _stratified_split(y, test_fraction, np.random.default_rng(seed))
    return Dataset(x[train], y[train], x[test], y[test], name="digits", num_classes=10)


# ------------------------------------------------------------------------------------------
# MNIST (IDX files)

_MNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
_IDX_MAGIC = {3: 2051, 1: 2049}  # unsigned-byte IDX with 3 (images) or 1 (labels) dimensions


def _read_bytes(path: Path, ndim: int) -> bytes:
    """The file's bytes (inflated if ``.gz``), at most the header's count plus one: a small
    .gz that inflates to gigabytes is cut where it is already too long. Read by the MiB, so
    that a header claiming terabytes costs no more than the bytes the file really holds. A
    plain file whose size is not its header's count is refused before its data is read."""
    if path.suffix != ".gz":
        with open(path, "rb") as f:
            head = f.read(4 + 4 * ndim)
            if len(head) == 4 + 4 * ndim:
                _check_idx_header(path, head, ndim, os.fstat(f.fileno()).st_size - len(head))
            return head + f.read()
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(4 + 4 * ndim)
            sizes = [int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
            left = math.prod(sizes) + 1 if len(head) == 4 + 4 * ndim else 0
            parts = [head]
            while left > 0 and (part := f.read(min(left, 1 << 20))):
                parts.append(part)
                left -= len(part)
            return b"".join(parts)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut stream
        # is EOFError; a corrupt deflate body is zlib.error
        raise ValueError(f"{path}: not a complete gzip file ({e})") from None


def _check_idx_header(path: Path, head: bytes, ndim: int, got: int) -> tuple[int, ...]:
    """The shape an IDX header ``head`` (magic number, then ``ndim`` sizes) gives, checked
    against the ``got`` bytes of data that follow it."""
    magic = int.from_bytes(head[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise ValueError(
            f"{path}: wrong magic number: expected {_IDX_MAGIC[ndim]} (0x{_IDX_MAGIC[ndim]:08x}, "
            f"unsigned bytes in {ndim} dimensions); got {magic} (0x{magic:08x})"
        )
    shape = tuple(int(s) for s in np.frombuffer(head, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape)  # a Python int: no overflow
    if got != expected:
        what = "truncated" if got < expected else "longer than its header says"
        raise ValueError(
            f"{path}: {what}: header gives shape {shape}, {expected} bytes of data; "
            f"got {got} bytes"
        )
    return shape


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file of ``ndim`` dimensions; return its uint8 array."""
    raw = _read_bytes(path, ndim)
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(
            f"{path}: too short for an IDX header of {ndim} dimensions "
            f"({header_size} bytes); got {len(raw)} bytes"
        )
    shape = _check_idx_header(path, raw[:header_size], ndim, len(raw) - header_size)
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(images_path, ndim=3)  # (N, H, W)
    labels = _read_idx(labels_path, ndim=1)  # (N,)
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds "
            f"{len(labels)} labels; the counts must match"
        )
    _check_labels(labels_path, labels, 10)
    x = (images.astype(np.float32) / np.float32(255))[:, None]  # (N, 1, H, W)
    return x, labels.astype(np.int64)


def load_mnist(directory: str | Path) -> Dataset:
    """MNIST from the four IDX files in ``directory``, each plain or gzipped (``.gz``).

    Parameters
    ----------
    directory : str or Path
        Holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (a plain file is used
        before its ``.gz``).

    Returns
    -------
    Dataset
        ``x`` float32 (N, 1, 28, 28) with values ``k / 255``; ``y`` int64 (N,) in ``0..9``.
        N_train = 60000, N_test = 10000 for MNIST (the shape comes from the IDX headers).

    Raises
    ------
    FileNotFoundError
        If ``directory`` does not exist or lacks a file (the message lists which).
    ValueError
        If a file is not what its name says: a wrong magic number, fewer or more bytes than
        its header gives, a broken gzip stream, labels outside ``0..9``, or an image file
        and a label file of different counts (the message names the file).
    """
    paths = _find_files(Path(directory), _MNIST_FILES, suffixes=("", ".gz"))
    x_train, y_train = _idx_pair(paths[0], paths[1])
    x_test, y_test = _idx_pair(paths[2], paths[3])
    return Dataset(x_train, y_train, x_test, y_test, name="mnist", num_classes=10)


# ------------------------------------------------------------------------------------------
# CIFAR-10 (pickled batches)

_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

# What a CIFAR-10 batch pickle may refer to: numpy's array reconstructors (numpy 1 and 2
# module names, protocols 2 and 5), the dtype and ndarray classes, and the codec Python 3
# uses to pickle bytes at protocol 2. Anything else (os.system, ...) is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, bytes, numbers and numpy arrays."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


# A CIFAR-10 batch pickle is 30.7 MB (10000 images of 3072 bytes and their labels); a file
# far larger is something else, and is refused before it is read.
_CIFAR_BATCH_MAX_BYTES = 64 * 2**20


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    size = path.stat().st_size
    if size > _CIFAR_BATCH_MAX_BYTES:
        raise ValueError(f"{path}: {size} bytes is not a CIFAR-10 batch pickle (about 31 MB)")
    raw = path.read_bytes()
    try:
        # From memory: a corrupt length field then reads past the end (truncated) instead of
        # asking the file for gigabytes.
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - a corrupt pickle can raise almost anything
        # (MemoryError, LookupError, OverflowError, numpy's SystemError, RecursionError...)
        raise ValueError(f"{path}: not a CIFAR-10 batch pickle ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch, key=repr) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f'{path}: expected a dict with keys b"data" and b"labels"; got {keys}')
    data, labels = batch[b"data"], batch[b"labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        raise ValueError(
            f'{path}: b"data" must be a uint8 array of shape (N, 3072); got '
            f"{type(data).__name__} {getattr(data, 'dtype', '')} {np.shape(data)}"
        )
    # Checked one by one before numpy sees them: np.asarray would truncate 0.7 to 0, parse
    # "3", and expand a nested list whose pickle shares its halves into 2**depth values.
    if isinstance(labels, np.ndarray):
        one_per_row = labels.shape == (len(data),) and labels.dtype.kind in "iu"
        shape = labels.shape
    else:
        one_per_row = (isinstance(labels, (list, tuple)) and len(labels) == len(data)
                       and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                               for v in labels))
        shape = (len(labels),) if isinstance(labels, (list, tuple)) else ()
    if not one_per_row:
        raise ValueError(
            f'{path}: b"labels" must be {len(data)} integers, one per row of b"data"; '
            f"got {type(labels).__name__} of shape {shape}"
        )
    try:
        y = np.asarray(labels, dtype=np.int64)
    except OverflowError:
        raise ValueError(f'{path}: b"labels" holds an integer beyond int64') from None
    _check_labels(path, y, 10)
    x = data.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255)  # (N, 3, 32, 32)
    return x, y


def load_cifar10(directory: str | Path) -> Dataset:
    """CIFAR-10 from its "python version" batches.

    Parameters
    ----------
    directory : str or Path
        The ``cifar-10-batches-py`` folder of ``cifar-10-python.tar.gz``, or the folder that
        contains it. It holds ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``.

    Returns
    -------
    Dataset
        ``x`` float32 (N, 3, 32, 32) with values ``k / 255``, channels R, G, B; ``y`` int64
        (N,) in ``0..9``. N_train = 50000 (the five batches in order), N_test = 10000.

    Raises
    ------
    FileNotFoundError
        If ``directory`` does not exist or lacks a batch (the message lists which).
    ValueError
        If a batch is not a pickled dict with ``b"data"`` (N, 3072) uint8 and ``N``
        ``b"labels"`` in ``0..9``, or refers to anything other than numpy arrays.
    """
    directory = Path(directory)
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    paths = _find_files(directory, _CIFAR_FILES, suffixes=("",))
    train = [_read_cifar_batch(p) for p in paths[:5]]
    x_test, y_test = _read_cifar_batch(paths[5])
    x_train = np.concatenate([x for x, _ in train])  # (50000, 3, 32, 32)
    y_train = np.concatenate([y for _, y in train])  # (50000,)
    return Dataset(x_train, y_train, x_test, y_test, name="cifar10", num_classes=10)


# ------------------------------------------------------------------------------------------
# Preprocessing, iteration, dispatch


def fingerprint(dataset: Dataset) -> str:
    """The SHA-256 of a data set's four arrays (their dtypes, shapes and bytes, in the order
    x_train, y_train, x_test, y_test), in hex: what a checkpoint records of the data its run
    trained on, so that a resumed run refuses other data (another folder under the same
    relative ``--data`` path, a changed file) instead of training on it."""
    digest = hashlib.sha256()
    for a in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.data)
    return digest.hexdigest()


def standardize(dataset: Dataset) -> Dataset:
    """Per-channel standardization with the training split's statistics.

    ``mu_c`` and ``sigma_c`` (biased, two-pass, in float64) are taken over the (N, H, W)
    axes of ``x_train``; both splits become ``(x - mu_c) / sigma_c`` in float32. The train
    split then has mean 0 and standard deviation 1 per channel; the test split only
    approximately.

    Parameters
    ----------
    dataset : Dataset

    Returns
    -------
    Dataset
        A new Dataset with the same labels, name and shapes.

    Raises
    ------
    ValueError
        If the training split is empty, or a channel is constant over it (``sigma_c = 0``).
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a Dataset; got {type(dataset).__name__}")
    if dataset.x_train.size == 0:
        raise ValueError(f"the training split is empty (x_train has shape "
                         f"{dataset.x_train.shape}): nothing to standardize by")
    reduce_axes = (0, 2, 3)
    mu, var = moments(dataset.x_train.astype(np.float64), reduce_axes)  # (1, C, 1, 1) each
    sigma = np.sqrt(var)  # (1, C, 1, 1)
    if np.any(sigma == 0):
        constant = np.flatnonzero(sigma.ravel() == 0).tolist()
        raise ValueError(f"cannot standardize: channels {constant} are constant in x_train")

    def apply(x: np.ndarray) -> np.ndarray:
        return ((x - mu) / sigma).astype(np.float32)  # (N, C, H, W)

    return dataclasses.replace(
        dataset, x_train=apply(dataset.x_train), x_test=apply(dataset.x_test)
    )


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(x_batch, y_batch)`` pairs that go once through the samples (one epoch).

    Parameters
    ----------
    x : array, (N, ...)
    y : array, (N,)
    batch_size : int >= 1
    rng : numpy Generator, optional
        If given, the order is ``rng.permutation(N)`` (drawn when iteration starts, so
        each epoch's call draws a new order) and the batches are copies; if not, the
        batches are consecutive views ``x[i : i + batch_size]``.
    drop_last : bool
        Leave out the last batch when it holds fewer than ``batch_size`` samples.

    Yields
    ------
    x_batch : array, (B, ...)
    y_batch : array, (B,)
        ``B = batch_size``, except for a shorter last batch when ``drop_last`` is False.
    """
    if len(x) != len(y):
        raise ValueError(
            f"x and y must hold the same number of samples; got {len(x)} and {len(y)}"
        )
    _check_positive_int("batch_size", batch_size)
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator or None; got {type(rng).__name__}")
    return _batches(x, y, batch_size, rng, drop_last)


def _batches(x, y, batch_size, rng, drop_last):  # a generator, so that batches() checks eagerly
    n = len(x)
    order = None if rng is None else rng.permutation(n)  # (N,)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]  # (B,)
            yield x[idx], y[idx]


def load(name_or_path: str) -> Dataset:
    """Load a dataset by name: ``"digits"``, ``"mnist:DIR"`` or ``"cifar10:DIR"``.

    ``"digits"`` is :func:`load_digits` with its defaults; ``"mnist:DIR"`` and
    ``"cifar10:DIR"`` are :func:`load_mnist` and :func:`load_cifar10` on the folder ``DIR``.
    """
    check_name(name_or_path)
    if name_or_path == "digits":
        return load_digits()
    kind, _, directory = name_or_path.partition(":")
    loaders = {"mnist": load_mnist, "cifar10": load_cifar10}
    return loaders[kind](directory)


def check_name(name_or_path: object) -> None:
    """Refuse what :func:`load` could not read by its form alone, without reading a file:
    ``TypeError`` for a name that is not a str, ``ValueError`` for one that is not
    ``"digits"``, ``"mnist:DIR"`` or ``"cifar10:DIR"`` with a non-empty ``DIR``."""
    if not isinstance(name_or_path, str):
        raise TypeError(f"the data set must be named by a str; got {type(name_or_path).__name__}")
    kind, sep, directory = name_or_path.partition(":")
    if name_or_path == "digits" or (sep and kind in ("mnist", "cifar10") and directory):
        return
    raise ValueError(
        'the data set must be "digits", "mnist:DIR" or "cifar10:DIR" (DIR a folder); '
        f"got {name_or_path!r}"
    )
