"""What every target is: something that turns planned instances into files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from unitgen.errors import Problem
    from unitgen.plan.instance import Instance
    from unitgen.spec.model import InstanceSpec

__all__ = ["RenderedFile", "Target"]


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
