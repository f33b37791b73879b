"""What every target is: something that turns planned instances into files."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from unitgen.errors import UnitgenError

if TYPE_CHECKING:
    import jinja2

    from unitgen.errors import Problem
    from unitgen.plan.instance import Instance
    from unitgen.spec.model import InstanceSpec
    from unitgen.targets.capabilities import Limits

__all__ = ["MARKER", "FilteredText", "RenderedFile", "Target", "find_proxyd", "refuse_bare",
           "strict_environment", "templates_dir"]

MARKER = "# unitgen-instance: "  # proves a unit file is ours (see header.j2)


@dataclass(frozen=True)
class RenderedFile:
    """One file a target writes. ``secret`` files (mode 0600) hold keys;
    ``config`` files go to the manager's configuration directory (a gateway's
    HAProxy files), their ``name`` a path below it."""

    name: str
    text: str
    secret: bool = False
    config: bool = False


class Target(Protocol):
    """A process manager's file format: systemd units, supervisor programs.
    A target subclasses this class to take the defaults of its optional parts."""

    @property
    def name(self) -> str:
        """The target's name (``systemd``, ``supervisor``)."""
        ...

    @property
    def limits(self) -> Limits:
        """What it can do; the pipeline refuses the rest, with file and key."""
        ...

    def spec_problems(self, spec: InstanceSpec) -> list[Problem]:
        """What else it refuses in a valid spec (directives unitgen owns, values
        its format cannot carry); by default nothing."""
        return []

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


class FilteredText(str):
    """Text that went through one of a target's escaping filters: the only kind
    of value (besides integers) a template may print."""

    __slots__ = ()


def _filtered(func: Callable[..., str]) -> Callable[..., FilteredText]:
    def wrapped(*args: object) -> FilteredText:
        return FilteredText(func(*args))
    return wrapped


def refuse_bare(value: object) -> object:
    """The escaping choke point (Jinja's ``finalize``): every ``{{ }}`` in a
    template must go through a filter; a bare value is a bug in the template,
    refused rather than written."""
    if isinstance(value, FilteredText) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise TypeError(f"template bug: {value!r} reached a file without an escaping filter")


def strict_environment(folder: str, filters: Mapping[str, Callable[..., str]]) -> jinja2.Environment:
    """A target's one Jinja environment, for the templates in ``templates/FOLDER``:
    StrictUndefined (a missing variable is a bug, not an empty string), no
    autoescape (these files are not HTML: ``filters`` do the escaping), and
    ``finalize`` refusing any value that did not pass one of ``filters``."""
    import jinja2  # noqa: PLC0415 - here: what imports this module (ops.trust) stays light

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir() / folder)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # noqa: S701 - see above
    )
    for name, func in filters.items():
        env.filters[name] = _filtered(func)
    env.finalize = refuse_bare
    return env
