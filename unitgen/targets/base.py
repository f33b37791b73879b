"""What every target is: something that turns planned instances into files."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from unitgen.errors import UnitgenError

if TYPE_CHECKING:
    from unitgen.errors import Problem
    from unitgen.plan.instance import Instance
    from unitgen.spec.model import InstanceSpec

__all__ = ["MARKER", "RenderedFile", "Target", "find_proxyd", "templates_dir"]

MARKER = "# unitgen-instance: "  # proves a unit file is ours (see header.j2)


@dataclass(frozen=True)
class RenderedFile:
    """One file a target writes. ``secret`` files (mode 0600) hold keys."""

    name: str
    text: str
    secret: bool = False


class Target(Protocol):
    """A process manager's file format: systemd units, supervisor programs."""

    @property
    def name(self) -> str:
        """The target's name (``systemd``, ``supervisor``)."""
        ...

    def spec_problems(self, spec: InstanceSpec) -> list[Problem]:
        """What this target cannot do with a valid spec (forbidden directives, ...)."""
        ...

    def render(self, inst: Instance) -> list[RenderedFile]:
        """The files of one planned instance; SpecError if a value cannot be written."""
        ...


def find_proxyd() -> str:
    """Locate systemd-socket-proxyd (not on PATH on Debian; /usr/lib on merged-/usr)."""
    found = shutil.which("systemd-socket-proxyd")
    if found:
        return found
    for candidate in ("/usr/lib/systemd/systemd-socket-proxyd", "/lib/systemd/systemd-socket-proxyd"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise UnitgenError(
        "systemd-socket-proxyd not found (looked on PATH, /usr/lib/systemd, /lib/systemd); "
        "it ships with systemd (Debian: package systemd)"
    )


def templates_dir() -> Path:
    """The templates: inside the installed package (wheel), or the repo's top-level
    ``templates/`` (editable install and source checkout)."""
    packaged = Path(str(resources.files("unitgen"))) / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "templates"
