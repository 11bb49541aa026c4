"""TrainConfig and the data checks made before training."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from refnorm.train.config import TrainConfig
from refnorm.train.loop import train
from tests.train.conftest import config


@pytest.mark.parametrize(("changes", "message"), [
    ({"seed": -1}, r"seed must be an int >= 0; got -1"),
    ({"lr": float("nan")}, r"lr must be a finite number > 0; got nan"),
    ({"momentum": 1.0}, r"momentum must be a finite number in \[0, 1\); got 1.0"),
    ({"norm": "xn"}, r"norm must be one of none, bn,"),
    ({"num_groups": 3, "norm": "gn"}, r"num_groups=3 must divide every width \(16, 32, 32\)"),
    ({"widths": ()}, r"widths must be a non-empty tuple of ints"),
    ({"train_subset": 0}, r"train_subset must be an int >= 1; got 0"),
    ({"data": "digit"}, r'the data set must be "digits", "mnist:DIR" or "cifar10:DIR"'),
    ({"data": "mnist:"}, r"\(DIR a folder\); got 'mnist:'"),
    ({"data": "imagenet:/data"}, r"got 'imagenet:/data'"),
])
def test_config_refuses_bad_values(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


@pytest.mark.parametrize(("changes", "message"), [
    ({"batch_size": 2.0}, r"batch_size must be an int >= 1; got 2.0"),
    ({"seed": True}, r"seed must be an int >= 0; got True"),
    ({"lr": "0.1"}, r"lr must be a finite number > 0; got '0.1'"),
    ({"widths": [8, 8]}, r"widths must be a non-empty tuple of ints"),
    ({"data": 3}, r"the data set must be named by a str; got int"),
])
def test_config_refuses_a_wrong_kind_of_value_with_a_type_error(changes, message):
    # The rule of refnorm's argument checks: a wrong kind of value is a TypeError.
    with pytest.raises(TypeError, match=message):
        TrainConfig(**changes)


def test_a_data_folder_is_read_by_train_not_by_the_config(tmp_path):
    """The config checks the data set's name by its form; a folder without the files is
    refused when training reads it (a config may be written where the data is not)."""
    missing = tmp_path / "nothing-here"
    assert TrainConfig(data=f"mnist:{missing}").data == f"mnist:{missing}"
    with pytest.raises(FileNotFoundError):
        train(config(data=f"mnist:{missing}"), progress=False)


def test_numpy_numbers_are_accepted():
    import numpy as np

    assert TrainConfig(batch_size=np.int64(8), lr=np.float32(0.5)).batch_size == 8


def test_numpy_numbers_are_kept_as_python_numbers_for_the_checkpoints_json():
    """A checkpoint records the config as JSON: a config of numpy scalars trained a whole
    epoch, then failed at its first save (TypeError: int64 is not JSON serializable)."""
    given = TrainConfig(batch_size=np.int32(8), seed=np.int64(3), train_subset=np.uint8(64),
                        widths=(np.int64(8), 8), lr=np.float32(0.5), momentum=np.float16(0.5),
                        weight_decay=np.float64(0.0))
    python = TrainConfig(batch_size=8, seed=3, train_subset=64, widths=(8, 8), lr=0.5,
                         momentum=0.5, weight_decay=0.0)  # 0.5 is exact in float16 and 32
    assert json.dumps(dataclasses.asdict(given)) == json.dumps(dataclasses.asdict(python))
    assert type(given.seed) is int and type(given.lr) is float


def test_bad_configuration():
    with pytest.raises(ValueError, match=r"batch_size must be an int >= 1; got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match=r"one update needs batch_size \* accumulation = 4096"):
        train(config(batch_size=64, accumulation=64), progress=False)


def test_describe_names_the_weight_method():
    """A run's one-line description (the 'resuming ...' line) names its method as the study
    does, gn+ws for GN with weight standardization."""
    text = TrainConfig(norm="gn", weight="ws", batch_size=2, accumulation=16).describe()
    assert text.startswith("gn+ws batch 2 x 16 accumulation"), text


def test_describe_names_the_devices_of_a_data_parallel_run():
    """On P devices the description says so: 4 devices x 2 samples x 3 micro-batches."""
    text = TrainConfig(devices=4, batch_size=2, accumulation=3).describe()
    assert text.startswith("bn 4 devices x batch 2 x 3 accumulation"), text


def test_gn_groups_must_divide_each_width_not_only_one():
    """GN splits every block's channels into G groups: G=8 divides the first width (8) but not
    the second (12), so the configuration is refused."""
    with pytest.raises(ValueError, match=r"num_groups=8 must divide every width \(8, 12\)"):
        TrainConfig(norm="gn", num_groups=8, widths=(8, 12))
    assert TrainConfig(norm="gn", num_groups=4, widths=(8, 12)).num_groups == 4


def test_a_numpy_float32_weight_decay_is_kept_as_a_python_float():
    """numpy's float32 is no Python float (float64 is): kept as given, the checkpoint's JSON of
    the configuration would fail."""
    given = TrainConfig(lr=np.float32(0.5), momentum=np.float32(0.5),
                        weight_decay=np.float32(0.25))
    assert all(type(v) is float for v in (given.lr, given.momentum, given.weight_decay))
    assert json.loads(json.dumps(dataclasses.asdict(given)))["weight_decay"] == 0.25


@pytest.mark.parametrize(("changes", "message"), [
    ({"lr": 0.0}, r"lr must be a finite number > 0; got 0.0"),
    ({"widths": (8, 0)}, r"every width must be an int >= 1; got 0"),
])
def test_config_refuses_a_zero_rate_or_width(changes, message):
    """A learning rate of 0 (nothing would train) and a layer of no channels are refused by the
    configuration itself, not only by the command line."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


@pytest.mark.parametrize("name", ["lr", "weight_decay"])
def test_an_int_beyond_every_float_is_out_of_range(name):
    """10**400 is a real number too large for a float: a ValueError, as inf is, not Python's
    OverflowError from converting it."""
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        TrainConfig(**{name: 10**400})
