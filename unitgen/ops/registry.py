"""The targets, by name: adding one is a folder and a line here. Nothing else
branches on a target's name. Modules are imported only when a target is used,
so ``unitgen --help`` and the probe stay light."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

from unitgen.errors import UnitgenError

if TYPE_CHECKING:
    from unitgen.ops.interface import TargetOps, Where

__all__ = ["DEFAULT", "TARGETS", "names", "target"]

# name -> "module:class"; the class takes a Where and implements TargetOps
TARGETS = {
    "systemd": "unitgen.ops.systemd.target:SystemdOps",
    "supervisor": "unitgen.ops.supervisor.target:SupervisorOps",
}
DEFAULT = "systemd"


def names() -> tuple[str, ...]:
    """The target names, for ``--target`` and the Ansible modules."""
    return tuple(TARGETS)


def target(name: str, where: Where) -> TargetOps:
    """The operations of target ``name`` for the manager ``where`` says."""
    try:
        module, _, attr = TARGETS[name].partition(":")
    except KeyError:
        raise UnitgenError(f"unknown target {name!r} (one of: {', '.join(TARGETS)})") from None
    cls = getattr(importlib.import_module(module), attr)
    return cast("TargetOps", cls(where))
