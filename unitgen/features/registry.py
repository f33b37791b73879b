"""The features, by name: adding one is a folder and a line here. A target
supports a feature when it supplies a binding for it (its capability set);
the transaction, ``remove``, ``status`` and ``doctor`` call the hooks of
every feature the target binds, in this order."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unitgen.features.base import Feature

__all__ = ["FEATURES", "bind", "names"]

# name -> "module:class" (a subclass of unitgen.features.base.Feature). The
# order is the order hooks run in: swap groups and GPU pools rewrite their
# mates before a gateway reroutes, and a container goes after them.
FEATURES = {
    "swap": "unitgen.features.swap.ops:SwapFeature",
    "pool": "unitgen.features.pool.ops:PoolFeature",
    "gateway": "unitgen.features.gateway.ops:GatewayFeature",
    "container": "unitgen.features.container.ops:ContainerFeature",
}


def names() -> tuple[str, ...]:
    """The feature names."""
    return tuple(FEATURES)


def bind(bindings: Mapping[str, object]) -> list[Feature]:
    """The features a target supplies bindings for, each with its binding, in
    the registry's order (modules are imported only here, when a verb needs them)."""
    out: list[Feature] = []
    for name, where in FEATURES.items():
        if name not in bindings:
            continue
        module, _, attr = where.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        out.append(cls(bindings[name]))
    return out
