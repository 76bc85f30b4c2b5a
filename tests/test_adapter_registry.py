"""The adapter registry itself: exact classes match only themselves, patterns match module + name, user
registrations come first and can be removed."""

from torch import nn

import normmatters.adapters  # noqa: F401 - registers the built-in adapters
from normmatters.adapter_registry import Adapter, find_adapter, register_adapter, unregister_adapter


class MyNorm(nn.LayerNorm):
    pass


def test_exact_classes_match_only_themselves_and_user_registrations_come_first():
    assert find_adapter(nn.LayerNorm) is not None and find_adapter(MyNorm) is None  # a subclass is not the stock
    stock = find_adapter(nn.LayerNorm)
    mine = Adapter("layer", stock.to_lp, stock.probe, name="mine")
    register_adapter(MyNorm, mine)
    try:
        assert find_adapter(MyNorm) is mine
        register_adapter(f"{__name__}.My*", Adapter("layer", stock.to_lp, stock.probe, name="pattern"))
        assert find_adapter(MyNorm).name == "pattern"  # later registrations take precedence
    finally:
        unregister_adapter(MyNorm)
        unregister_adapter(f"{__name__}.My*")
    assert find_adapter(MyNorm) is None
