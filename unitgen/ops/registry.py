"""The targets, by name: adding one is a folder and a line here. Nothing else
branches on a target's name. Each name maps to the target's package, whose
``__init__`` declares its :class:`Plugin`: where its operations are, the
command-line options it adds to every verb and the commands it adds to
``unitgen``. A plugin is data and import paths only, so building the CLI
(``unitgen --help``) imports no manager library; a target's operations are
imported when it is used."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, cast

from unitgen.errors import UnitgenError

if TYPE_CHECKING:
    from collections.abc import Callable

    from unitgen.ops.interface import TargetOps, Where

__all__ = ["DEFAULT", "TARGETS", "Option", "OptionKind", "Plugin", "commands", "load", "names",
           "options", "plugin", "target"]

# name -> the target's package (its __init__ declares PLUGIN)
TARGETS = {
    "systemd": "unitgen.ops.systemd",
    "supervisor": "unitgen.ops.supervisor",
}
DEFAULT = "systemd"


class OptionKind(StrEnum):
    """What a target's option takes."""

    FLAG = "flag"  # on or off
    TEXT = "text"
    DIRECTORY = "directory"  # a path, not a file


@dataclass(frozen=True)
class Option:
    """A command-line option a target adds to every verb (the CLI makes it a
    click option): it fills the field ``field`` of
    :class:`~unitgen.ops.interface.Where`, which says which manager to use."""

    flag: str  # "--supervisor-url"
    field: str  # "supervisor_url"
    help: str
    kind: OptionKind = OptionKind.TEXT
    envvar: str | None = None


@dataclass(frozen=True)
class Plugin:
    """What a target adds to unitgen: its operations (``module:Class``, a
    :class:`~unitgen.ops.interface.TargetOps` taking a ``Where``), its options,
    and commands of its own (``module:attr`` of click commands)."""

    ops: str
    options: tuple[Option, ...] = ()
    commands: tuple[str, ...] = ()


def names() -> tuple[str, ...]:
    """The target names, for ``--target`` and the Ansible modules."""
    return tuple(TARGETS)


def load(path: str) -> object:
    """The object at ``module:attr``, importing the module."""
    module, _, attr = path.partition(":")
    # import by name is what a registry is: the names are this file's own data
    return getattr(importlib.import_module(module), attr)


def plugin(name: str) -> Plugin:
    """Target ``name``'s plugin (imports its package only)."""
    try:
        package = TARGETS[name]
    except KeyError:
        raise UnitgenError(f"unknown target {name!r} (one of: {', '.join(TARGETS)})") from None
    return cast("Plugin", load(f"{package}:PLUGIN"))


def options() -> list[tuple[str, Option]]:
    """Every target's options, with the target that declares it, in registry order."""
    return [(name, option) for name in TARGETS for option in plugin(name).options]


def commands() -> list[str]:
    """The commands targets add to ``unitgen`` (``module:attr``)."""
    return [path for name in TARGETS for path in plugin(name).commands]


def target(name: str, where: Where) -> TargetOps:
    """The operations of target ``name`` for the manager ``where`` says."""
    make = cast("Callable[[Where], TargetOps]", load(plugin(name).ops))
    return make(where)
