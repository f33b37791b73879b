"""What every feature is: one folder that plans, writes, acts after a change,
and reports, through hooks the one deploy transaction, ``remove``, ``status``
and ``doctor`` call in one order (pre-commit's ``lang_base``: a protocol whose
optional parts have defaults, so no caller asks ``hasattr``).

A feature spans the layers, each part in the layer it belongs to
(``features/NAME/spec.py`` is spec, ``plan.py`` plan, ``render.py`` targets,
``ops.py`` and the rest operations; tests/offline/test_structure.py holds them
to it). What a feature needs from a process manager (where its files go, how a
program reloads, whether a unit is up) is a *binding* the target supplies: the
feature's ``ops`` module declares it as a Protocol, each target that supports
the feature implements it beside its own code, and a target without a binding
refuses the feature's spec keys (its capability set, :mod:`unitgen.features.registry`).

The hooks, in the order they run:

    check:   problems
    deploy:  cohabitants (while GPUs are placed) -> plan (problems first) -> preflight
             -> prepare -> files
             (written with the run's units, all or nothing) -> reload_only
             (per changed instance) -> before_signal, after_signal (a target that
             reloads by a signal, around it) -> after (once every instance is up)
    remove:  before_remove (while every instance still runs) -> removed (per instance)
    status:  status          doctor: doctor          gpus: gpus
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from unitgen.errors import Problem
    from unitgen.ops.findings import Finding
    from unitgen.ops.interface import Say
    from unitgen.ops.pipeline import Planned
    from unitgen.plan.record import Record
    from unitgen.spec.model import InstanceSpec

__all__ = ["Feature", "InstalledLike", "Writes"]

# Files to write (text) or delete (None), with the run's own files.
Writes = list[tuple[Path, str | None]]


class InstalledLike(Protocol):
    """An installed instance as every target reads it back: its record and files."""

    @property
    def name(self) -> str:
        """The instance's name."""
        ...

    @property
    def rec(self) -> Record:
        """Its record (:mod:`unitgen.plan.record`)."""
        ...


class Feature:
    """A feature bound to one target for one command. ``binding`` is what the
    target gives it (the feature's own Protocol); every hook below does nothing
    unless the feature says otherwise."""

    name: ClassVar[str] = ""
    # what a target can do once it binds this feature (unitgen.targets.capabilities):
    # a target lists these capabilities exactly when it supplies the binding
    capabilities: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, binding: object) -> None:
        self.binding = binding

    # deploy ---------------------------------------------------------------

    def cohabitants(self, installed: Mapping[str, InstalledLike], spec: InstanceSpec,
                    run: Sequence[InstanceSpec]) -> frozenset[str]:
        """Instances whose GPU claims are no conflict for ``spec`` (they never run
        beside it); ``run`` is the specs of this deploy placed so far."""
        return frozenset()

    def problems(self, planned: Sequence[Planned]) -> list[Problem]:
        """What is wrong with the run's specs on this host that ``check`` reports
        too (deploy's :meth:`plan` raises them): files only, no manager asked."""
        return []

    def plan(self, installed: Mapping[str, InstalledLike], planned: Sequence[Planned]) -> list[str]:
        """Everything was planned: check and compute this feature's part of the
        run (SpecError for a problem); the notices to show."""
        return []

    def preflight(self, planned: Sequence[Planned]) -> list[Problem]:
        """Checks against the host before anything is written (no side effect):
        reported with the target's own, every problem at once."""
        return []

    def prepare(self, planned: Sequence[Planned], say: Say, *, dry_run: bool) -> list[Problem]:
        """Once every check passed, before anything is written: get what the run
        needs from elsewhere (pull an image); a dry run says what it would do."""
        return []

    def files(self) -> Writes:
        """Further files this run writes or deletes (after :meth:`plan`)."""
        return []

    def reload_only(self, planned: Planned, changed: Sequence[str]) -> bool:
        """True when only files this feature owns changed for an installed
        instance (``changed``: their names), so reloading it is enough."""
        return False

    def before_signal(self, name: str) -> None:
        """An installed instance whose files alone changed is about to be told to
        read them again by a signal (a target without a reload command of its
        own, supervisord): prepare what it reads then."""

    def after_signal(self, name: str) -> None:
        """That signal was sent: return once what it reads holds (UnitgenError
        when it does not)."""

    def after(self, say: Say) -> None:
        """Every instance of the run is up: act on what changed (reload a gateway)."""

    # remove ---------------------------------------------------------------

    def before_remove(self, installed: Mapping[str, InstalledLike],
                      names: Sequence[str]) -> list[str]:
        """Before ``names`` stop: others stop depending on them. Lines to show."""
        return []

    def removed(self, inst: InstalledLike) -> tuple[list[Path], list[str]]:
        """After an instance stopped: what this feature takes away with it
        (files deleted, lines to show)."""
        return [], []

    # read -----------------------------------------------------------------

    def owns_processes(self, inst: InstalledLike) -> bool:
        """True when this feature runs the instance's server processes (they are
        not the unit's main process tree): status counts its unit's cgroup and
        doctor asks this feature instead of inspecting the processes."""
        return False

    def status(self, installed: Mapping[str, InstalledLike], states: Mapping[str, str],
               detail: frozenset[str] = frozenset()) -> tuple[dict[str, object], tuple[str, ...]]:
        """This feature's part of ``status`` (JSON data, lines); ``states``: each
        instance's state as the status table says it; ``detail``: what was asked
        for beyond it (``status --keys``: ``keys``)."""
        return {}, ()

    def gpus(self, installed: Mapping[str, InstalledLike]) -> tuple[dict[str, object],
                                                                   tuple[str, ...]]:
        """This feature's part of ``unitgen gpus`` (JSON data, lines)."""
        return {}, ()

    def doctor(self, installed: Mapping[str, InstalledLike], name: str,
               running: bool) -> list[Finding]:
        """What this feature has to say of instance ``name`` (``running``: its
        server is up)."""
        return []
