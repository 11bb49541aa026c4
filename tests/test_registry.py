"""The registry (refnorm/registry.py): every layer built by name."""

from __future__ import annotations

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
