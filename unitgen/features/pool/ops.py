"""GPU pools as a feature (issue 27): each member's pool file, written with the
run and rewritten for every member when the members change; the deploy check
of members that could never load; the GPUs placement lets members share; what
``status``, ``gpus`` and ``doctor`` say of the pools. What is the manager's
(where files go, unit states, the runtime directory) comes through
:class:`PoolBinding`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from unitgen.errors import Problem, SpecError
from unitgen.features.base import Feature, InstalledLike, Writes
from unitgen.features.pool.plan import GpuPools, after_change, is_member, pool_file
from unitgen.features.pool.view import PoolView, Sources, doctor_lines, pool_view, view_lines
from unitgen.inunit.gpuneed import NeedSource
from unitgen.inunit.memrecord import read_measured
from unitgen.inunit.nvml import Gpu, GpuUnavailableError, read_gpus
from unitgen.inunit.poolfile import PoolTerms
from unitgen.inunit.poolread import Units
from unitgen.ops.findings import Finding
from unitgen.ops.pipeline import Planned
from unitgen.plan.memneed import memory_need
from unitgen.plan.poolcheck import PoolMember, pool_problems
from unitgen.spec.model import InstanceSpec

__all__ = ["PoolBinding", "PoolFeature", "installed_members"]

Members = dict[str, tuple[tuple[str, ...], PoolTerms]]


class PoolBinding(Protocol):
    """What GPU pools need from a target."""

    @property
    def manager(self) -> str:
        """The manager, named as the GPU inventory names a process's."""
        ...

    def pool_file(self, name: str) -> Path:
        """Where member ``name``'s pool file lives."""
        ...

    def write(self, changes: Writes) -> None:
        """Write (or delete) pool files all or nothing."""
        ...

    def units(self, names: list[str]) -> dict[str, Units]:
        """Each member's proxy and server, in one round trip."""
        ...

    def runtime_dir(self) -> Path:
        """The pool's runtime directory (members' runtimes, GPU locks)."""
        ...

    def measured_dir(self) -> Path:
        """The manager's state directory (measured needs)."""
        ...

    def manager_environment(self) -> dict[str, str]:
        """The manager's environment (the members' proxies read their budget there)."""
        ...


def installed_members(installed: Mapping[str, InstalledLike]) -> Members:
    """Installed member -> (its GPUs, its terms), from its record."""
    return {n: (i.rec.gpus, i.rec.pool) for n, i in installed.items()
            if i.rec.pool is not None and i.rec.gpus}


class PoolFeature(Feature):
    """GPU pools bound to a target."""

    name = "pool"
    binding: PoolBinding

    def __init__(self, binding: PoolBinding) -> None:
        super().__init__(binding)
        self._files: Writes = []

    def cohabitants(self, installed: Mapping[str, InstalledLike], spec: InstanceSpec,
                    run: Sequence[InstanceSpec]) -> frozenset[str]:
        """Every other member: placement counts none of their claims as a conflict."""
        if not is_member(spec):
            return frozenset()
        names = dict.fromkeys(installed_members(installed), ())
        names.update({s.name: () for s in run if is_member(s)})
        names[spec.name] = ()
        return GpuPools(names).makes_room_for(spec.name)

    def plan(self, installed: Mapping[str, InstalledLike], planned: Sequence[Planned]) -> list[str]:
        """The pool files every member needs after this run; members that could
        never load are refused (SpecError, with file and key)."""
        members = after_change(installed_members(installed), [
            (p.instance.name, p.instance.gpus.uuids if p.instance.gpus else (), p.instance.pool)
            for p in planned])
        backends = {n: i.rec.backend for n, i in installed.items()}
        backends.update({p.instance.name: str(p.instance.spec.backend) for p in planned})
        names = set(installed) | {p.instance.name for p in planned}
        self._files = self._changes(members, backends, names)
        problems = self.check(installed, planned, members)
        if problems:
            raise SpecError(problems=problems)
        return []

    def files(self) -> Writes:
        """The pool files that change."""
        return self._files

    def _changes(self, members: Members, backends: Mapping[str, str],
                 names: set[str]) -> Writes:
        changes: Writes = []
        for name in sorted(names):
            path = self.binding.pool_file(name)
            want = pool_file(name, members, backends[name]).text() if name in members else None
            have = path.read_text(encoding="utf-8") if path.exists() else None
            if want != have:
                changes.append((path, want))
        return changes

    def check(self, installed: Mapping[str, InstalledLike], planned: Sequence[Planned],
              members: Members) -> list[Problem]:
        """Members of this run that could never load on their GPUs: above what
        the GPU has for the pool, alone or beside the run's always-on
        instances (a need guessed as the whole GPU is not checked: it is what
        the pool has there)."""
        try:
            gpus = read_gpus()
        except GpuUnavailableError:
            return []  # sizes not known here; placement said so already
        run = {p.instance.name for p in planned}
        checked: list[PoolMember] = []
        for p in planned:
            inst = p.instance
            if inst.gpus is None:
                continue
            if inst.pool is not None:
                need = inst.pool.need_value()
                found = None if inst.pool.fixed else read_measured(
                    self.binding.measured_dir(), inst.name, inst.pool.fingerprint)
                if found is not None:
                    need = replace(need, source=NeedSource.MEASURED, bytes=found.peak,
                                   fraction=None, detail="at its last load")
            elif inst.spec.activation == "eager" and inst.spec.gpu_share:
                need = memory_need(inst.spec)
            else:
                continue
            if need.source == NeedSource.ESTIMATE and need.fraction is not None:
                continue
            checked.append(PoolMember(inst.spec.source, inst.name, inst.gpus.uuids, need,
                                      always_on=inst.pool is None))
        outside = _outside(gpus, set(members) | run, self.binding.manager)
        return pool_problems(checked, {g.uuid: g.total for g in gpus}, outside)

    def before_remove(self, installed: Mapping[str, InstalledLike],
                      names: Sequence[str]) -> list[str]:
        """The remaining members stop naming the removed ones."""
        members = after_change(installed_members(installed), removed=names)
        backends = {n: i.rec.backend for n, i in installed.items()}
        self.binding.write(self._changes(members, backends, set(members)))
        return []

    def removed(self, inst: InstalledLike) -> tuple[list[Path], list[str]]:
        """A removed member's pool file goes with it, and its runtime: an
        instance deployed later under its name has no past."""
        if inst.rec.pool is None:
            return [], []
        for leftover in (f"{inst.name}.json", f"{inst.name}.start"):
            (self.binding.runtime_dir() / leftover).unlink(missing_ok=True)
        path = self.binding.pool_file(inst.name)
        if not path.exists():
            return [], []
        self.binding.write([(path, None)])
        return [path], []

    # read -----------------------------------------------------------------

    def view(self, installed: Mapping[str, InstalledLike]) -> PoolView | None:
        """Every pool member on every GPU now (None: no member installed)."""
        members = installed_members(installed)
        if not members:
            return None
        try:
            gpus: list[Gpu] | None = read_gpus()
        except GpuUnavailableError:
            gpus = None
        b = self.binding
        return pool_view(members, Sources(b.units(sorted(members)), b.manager_environment(),
                                          b.runtime_dir(), b.measured_dir(), b.manager, gpus))

    def status(self, installed: Mapping[str, InstalledLike], states: Mapping[str, str],
               detail: frozenset[str] = frozenset()) -> tuple[dict[str, object], tuple[str, ...]]:
        """Each GPU's members: loaded, asleep, loading, stopped; who waits and why."""
        view = self.view(installed)
        if view is None:
            return {}, ()
        return {"gpu_pools": view.data()}, ("", *view_lines(view))

    def gpus(self, installed: Mapping[str, InstalledLike]) -> tuple[dict[str, object],
                                                                   tuple[str, ...]]:
        """The same, under the GPUs NVML lists."""
        return self.status(installed, {})

    def doctor(self, installed: Mapping[str, InstalledLike], name: str,
               running: bool) -> list[Finding]:
        """Where a member stands in its pool, and what it waits for."""
        if name not in installed_members(installed):
            return []
        view = self.view(installed)
        return [Finding(ok, text) for ok, text in doctor_lines(view, name)] if view else []


def _outside(gpus: list[Gpu], members: set[str], manager: str) -> dict[str, int]:
    """Per GPU: memory held by processes that are no pool member and no instance
    of this run (a redeployed instance's processes are replaced)."""
    return {g.uuid: max(0, g.used - sum(p.used_bytes for p in g.processes
                                          if any(p.belongs_to(n, manager) for n in members)))
            for g in gpus}
