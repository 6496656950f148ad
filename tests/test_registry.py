"""The one registry shape every kind of plug-in uses."""

import pytest

from posttrain.registry import Registry


def test_register_by_decorator_or_value_and_get_names_the_choices():
    reg = Registry("widget")

    @reg.register("a")
    def a():
        return 1

    reg.register("b", 2)
    assert reg.get("a") is a and reg.get("b") == 2
    assert reg.names() == ("a", "b") and "a" in reg and list(reg) == ["a", "b"] and len(reg) == 2
    with pytest.raises(ValueError, match=r"unknown widget 'c'; choose one of a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 3)
