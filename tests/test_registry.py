"""The registry (refnorm/registry.py): every layer built by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import refnorm
from refnorm import registry

NAMES = ["bn", "in", "ln", "gn"]


def test_registry_lists_the_four_methods_in_order():
    assert registry.names()[:4] == tuple(NAMES)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown layer 'xn'; expected one of bn, in, ln, gn"):
        refnorm.build("xn", 4)


def test_every_registered_name_builds_a_layer_of_its_class():
    for name in registry.names():
        cls = registry.layer_class(name)
        assert registry.name_of(cls) == name
        assert issubclass(cls, refnorm.layer.Layer)


def test_a_class_outside_the_table_has_no_name():
    with pytest.raises(ValueError, match="not a registered layer"):
        registry.name_of(type("Other", (), {}))


@pytest.mark.parametrize("name", [["bn"], {"bn": 1}, None, 3])
def test_a_name_that_is_not_a_string_is_an_unknown_layer(name):
    """An unhashable name (a list, a dict) is refused with the same message as an unknown one,
    not numpy's or the dict's TypeError."""
    with pytest.raises(ValueError, match=r"unknown layer .*; expected one of bn, in, ln, gn"):
        refnorm.build(name, 4)


def test_the_registry_holds_the_names_of_the_readmes_methods_table():
    """README "Methods": one row per registered name (`conv`, `linear` share one), and no
    registered layer is missing from the table."""
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    table = readme.split("## Methods", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert named == set(registry.names())
    assert len(registry.names()) == 13


@pytest.mark.parametrize("cls", [refnorm.layer.Layer, type("MyBN", (refnorm.BatchNorm,), {})])
def test_only_a_registered_class_itself_has_a_name(cls):
    """The base class of every layer and a user's subclass of BN are not registered layers."""
    with pytest.raises(ValueError, match=f"{cls.__qualname__} is not a registered layer"):
        registry.name_of(cls)


def test_name_of_a_layer_instance_asks_for_its_class():
    """name_of takes a class: a layer object is a TypeError naming what to pass, not an
    AttributeError about __qualname__."""
    with pytest.raises(TypeError, match=r"name_of takes a class; got BatchNorm .*type\(layer\)"):
        registry.name_of(refnorm.build("bn", 2))


def test_build_passes_further_positional_arguments_to_the_constructor():
    # A convolution's out_channels and kernel_size follow in_channels positionally.
    layer = registry.build("conv", 2, 3, (2, 1))
    assert isinstance(layer, refnorm.nn.Conv2d)
    assert layer.params["w"].shape == (3, 2, 2, 1)
