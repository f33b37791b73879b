"""The one pipeline every verb runs a spec through, in order, each layer once:

    spec file -> validated spec (unitgen.spec) -> the target's own spec checks
    -> a complete, frozen plan (unitgen.plan: endpoints, ports, GPUs, secrets, argv)
    -> rendered files (the target) -> cross-file checks (names, listen addresses)

Every problem of every file is collected before anything is written or any
manager is contacted, so ``check``, ``render`` and ``deploy`` explain everything
in one run. Which host the plan is for (stable default ports for ``check``, the
host's free ports and GPUs for ``deploy``) is the :class:`Allocator` passed in.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from unitgen.errors import Problem, SpecError
from unitgen.features.gateway.plan import (
    GatewayPlan,
    Member,
    gateway_instance_spec,
    member_key,
    member_of,
    metrics_of,
    settings_of,
    upstream_members,
)
from unitgen.features.gateway.spec import GatewaySpec
from unitgen.inunit.cgroupowner import manager_of_scope
from unitgen.inunit.nvml import Gpu, GpuUnavailableError, read_gpus
from unitgen.ops.files import read_key_file
from unitgen.plan.container import ProblemSink
from unitgen.plan.gpus import Placement, place
from unitgen.plan.instance import Allocator, Instance, resolve
from unitgen.spec.model import InstanceSpec, load_any
from unitgen.spec.ports import PRIVATE_PORT_RANGE, default_port, default_private_port
from unitgen.targets.base import RenderedFile, Target

__all__ = [
    "GPUS_UNAVAILABLE",
    "CheckAllocator",
    "HostGpus",
    "Planned",
    "RenderedFile",
    "RunAllocator",
    "Target",
    "placement_for",
    "plan_paths",
]

# Problem code: the spec may be fine, but this host cannot say (no NVIDIA driver).
GPUS_UNAVAILABLE = "gpus-unavailable"


@dataclass(frozen=True)
class Planned:
    """One spec file, planned and rendered."""

    path: Path
    instance: Instance
    files: tuple[RenderedFile, ...]


@dataclass
class HostGpus:
    """The GPUs plans are made for: read from NVML once per run, or from a file
    written by ``unitgen gpus --json`` on the target host (``--gpus-from``)."""

    gpus: list[Gpu] | None
    reason: str = ""

    @classmethod
    def here(cls) -> HostGpus:
        """This host's GPUs (None with the reason where NVML cannot be read)."""
        try:
            return cls(read_gpus())
        except GpuUnavailableError as exc:
            return cls(None, exc.message)

    @classmethod
    def from_file(cls, path: Path) -> HostGpus:
        """GPUs from another host's ``unitgen gpus --json``."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not data.get("available", True):
                return cls(None, f"{path} says: {data.get('reason', 'no GPUs')}")
            return cls([Gpu.from_json(g) for g in data["gpus"]])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SpecError(problems=[Problem(str(path), "", "is not the output of "
                                              f"`unitgen gpus --json`: {exc}")]) from None


class RunAllocator(Allocator, Protocol):
    """The allocator of a run of many files (what :func:`plan_paths` takes):
    the plan's :class:`~unitgen.plan.instance.Allocator` and what a host knows
    about the whole run, each part with a default for a host that knows nothing
    (pre-commit's ``lang_base``: callers never ask whether a part is there)."""

    # The ports planned are the ones the instances get (deploy), not defaults
    # that deploy would change: two specs on one port are then a conflict.
    final_ports: bool = False

    def reserve(self, ports: set[int]) -> None:
        """Ports specs of this run fix: never allocated to another spec.
        Default: nothing is allocated, nothing to keep free."""
        return

    def gateway_members(self, gateway: str) -> list[Member]:
        """Installed instances that join ``gateway``. Default: none known."""
        return []

    def member_key(self, m: Member) -> str | None:
        """An installed member's own API key. Default: none known."""
        return None


@dataclass
class CheckAllocator(RunAllocator):
    """Plans for ``check`` and ``render``: ports stable per name (or fixed), GPUs
    from :class:`HostGpus` (this host's NVML, read once and only when a spec
    asks for GPUs), claims of installed instances when given."""

    host_gpus: HostGpus | None = None
    private_range: tuple[int, int] = PRIVATE_PORT_RANGE
    claims: dict[str, list[tuple[str, bool]]] = field(default_factory=dict)
    unplaceable: list[Problem] = field(default_factory=list)
    fixed_port: int | None = None
    fixed_private: int | None = None

    def public_port(self, spec: InstanceSpec, explicit: int | None, host: str,
                    problem: ProblemSink) -> int:
        """See :class:`~unitgen.plan.instance.Allocator`."""
        if explicit is not None:
            return explicit
        return self.fixed_port if self.fixed_port is not None else default_port(spec.name)

    def private_port(self, spec: InstanceSpec, public: int, problem: ProblemSink) -> int:
        """See :class:`~unitgen.plan.instance.Allocator`."""
        return self.fixed_private or default_private_port(spec.name, self.private_range)

    def placement(self, spec: InstanceSpec, problem: ProblemSink) -> Placement | None:
        """See :class:`~unitgen.plan.instance.Allocator`."""
        if spec.gpus is None or spec.gpus == 0:
            return None
        if self.host_gpus is None:
            self.host_gpus = HostGpus.here()
        return place_or_report(spec, self.host_gpus, self.claims, problem, self.unplaceable)


def place_or_report(spec: InstanceSpec, host_gpus: HostGpus,
                    claims: dict[str, list[tuple[str, bool]]], problem: ProblemSink,
                    unplaceable: list[Problem], scope: str = "system",
                    mates: frozenset[str] = frozenset()) -> Placement | None:
    """Place a spec's GPUs; report why not through ``problem``, or into
    ``unplaceable`` when this host cannot tell (no NVML and no ``--gpus-from``)."""
    if spec.gpus is None or spec.gpus == 0:
        return None
    by_uuid = isinstance(spec.gpus, tuple) and bool(spec.gpus) and isinstance(spec.gpus[0], str)
    if host_gpus.gpus is None and not by_uuid:
        unplaceable.append(Problem(
            spec.source, "gpus", f"cannot place GPUs here: choosing GPUs by count or index needs "
            f"NVML ({host_gpus.reason}); check on the GPU host, or pass --gpus-from FILE with "
            "its `unitgen gpus --json`, or give GPU UUIDs",
            code=GPUS_UNAVAILABLE))
        return None
    try:
        return place(source=spec.source, name=spec.name, want=spec.gpus,
                     memory=spec.gpu_memory, share=spec.gpu_share, gpus=host_gpus.gpus,
                     claims=claims, manager=manager_of_scope(scope), mates=mates)
    except SpecError as exc:
        for p in exc.problems:
            problem(p.key, p.message)
        return None


def placement_for(spec: InstanceSpec, claims: dict[str, list[tuple[str, bool]]] | None = None,
                  *, gpus: list[Gpu] | None = None,
                  mates: frozenset[str] = frozenset()) -> Placement | None:
    """GPU placement for one spec (None for CPU-only specs); SpecError when it
    cannot be placed. Reads NVML unless the caller passes what it read."""
    host = HostGpus(gpus) if gpus is not None else HostGpus.here()
    problems: list[Problem] = []
    placed = place_or_report(spec, host, claims or {},
                             lambda key, msg: problems.append(Problem(spec.source, key, msg)),
                             problems, mates=mates)
    if problems:
        raise SpecError(problems=problems)
    return placed


def _complete(spec: InstanceSpec) -> bool:
    """Enough of a partial spec is valid to plan it (and find more problems)."""
    if spec.backend == "custom":
        return bool(spec.command)
    return bool(spec.model)


def _load(path: Path) -> tuple[InstanceSpec | None, GatewaySpec | None, list[Problem]]:
    try:
        found = load_any(path)
    except SpecError as exc:
        partial = exc.partial if isinstance(exc.partial, InstanceSpec) else None
        return partial, None, list(exc.problems)
    if isinstance(found, GatewaySpec):
        return gateway_instance_spec(found), found, []
    return found, None, []


def plan_paths(paths: Sequence[Path], target: Target, allocator: RunAllocator,
               *, unplaceable: list[Problem] | None = None) -> list[Planned]:
    """Run every spec through the pipeline; raise one SpecError with every
    problem of every file (exit code: see :func:`unitgen.errors.SpecError`).
    Gateways are planned after the instances of the run: they route to them."""
    problems: list[Problem] = []
    planned: list[Planned] = []
    loaded = [(path, *_load(path)) for path in paths]
    # ports the specs fix are not handed to others of this run
    allocator.reserve({s.port for _, s, _, _ in loaded if s is not None and s.port is not None})
    for path, spec, gateway, found in sorted(loaded, key=lambda row: row[2] is not None):
        here = list(found)
        if spec is not None:
            here += target.limits.spec_refusals(spec) + target.spec_problems(spec)
        inst = None
        if spec is not None and _complete(spec):
            seen = {p.key for p in here}
            try:
                inst = resolve(spec, allocator=allocator)
            except SpecError as exc:
                here += [p for p in exc.problems if p.key not in seen]
        if inst is not None and gateway is not None:
            inst = replace(inst, gateway=_gateway_plan(gateway, planned, allocator))
        if inst is not None:
            here += target.limits.plan_refusals(inst)
        if inst is not None and not here:
            try:
                planned.append(Planned(path, inst, tuple(target.render(inst))))
            except SpecError as exc:
                here += exc.problems
        problems += here
    problems += _cross_file(planned, final=allocator.final_ports)
    problems += unplaceable or []
    if problems:
        # partial: the files that were fine, for a verb that reports them too (check)
        raise SpecError(problems=problems, partial=planned)
    return planned


def _gateway_plan(g: GatewaySpec, planned: list[Planned],
                  allocator: RunAllocator) -> GatewayPlan:
    """The members of gateway ``g``: the run's instances that join it, and the
    installed ones the allocator knows (the run's version of an instance wins)."""
    run = {p.instance.name for p in planned}
    members = [m for m in allocator.gateway_members(g.name) if m.instance not in run]
    keys = [(m.instance, k) for m in members if (k := allocator.member_key(m)) is not None]
    joining = [p.instance for p in planned if p.instance.spec.gateway == g.name]
    members += [m for i in joining if (m := member_of(i)) is not None]
    keys += [(i.name, k) for i in joining if (k := member_key(i)) is not None]
    upstreams = upstream_members(g)  # on other hosts: their keys are files of their own
    keys += [(m.instance, k) for m in upstreams
             if m.key_file and (k := read_key_file(m.key_file)) is not None]
    settings = replace(settings_of(g), keys_stamp=_stamp(g.api_keys_file, g.metrics_keys_file))
    return GatewayPlan(settings, (*members, *upstreams), metrics_of(g), tuple(keys))


def _stamp(*paths: str | None) -> str:
    """Size and mtime of each file (not its contents: these are keys files)."""
    out = []
    for path in paths:
        if path:
            try:
                st = os.stat(path)
                out.append(f"{st.st_size}@{st.st_mtime_ns}")
            except OSError:
                out.append("-")
    return " ".join(out)


def _cross_file(planned: list[Planned], *, final: bool) -> list[Problem]:
    """Two specs of one run with one name, or wanting one listen address: ports
    both specs fix, or (``final``: deploy) any ports they would really get. A
    default port of ``check``/``render`` is not final: deploy picks a free one."""
    out: list[Problem] = []
    names: dict[str, Path] = {}
    for p in planned:
        first = names.get(p.instance.name)
        if first is None:
            names[p.instance.name] = p.path
        elif first == p.path:
            out.append(Problem(str(p.path), "", "is given twice"))
        else:
            out.append(Problem(str(p.path), "name", f"{p.instance.name!r} is also the name "
                                                    f"in {first}"))
    by_port: dict[int, list[Planned]] = {}
    for p in planned:
        by_port.setdefault(p.instance.public.port, []).append(p)
    for same in by_port.values():
        for i, a in enumerate(same):
            for b in same[:i]:
                if a.instance.name == b.instance.name:
                    continue
                if not final and not (a.instance.port_from_spec and b.instance.port_from_spec):
                    continue
                if listen_overlap(a.instance.public.host, a.instance.public.port,
                                  b.instance.public.host, b.instance.public.port):
                    out.append(Problem(str(a.path), "port", (
                        f"{a.instance.public.listen()} overlaps {b.instance.public.listen()} of "
                        f"{b.instance.name!r} ({b.path}): two sockets cannot own one port")))
    return out


def listen_overlap(host_a: str, port_a: int, host_b: str, port_b: int) -> bool:
    """True when sockets on these two addresses cannot both listen: same port and
    the same address, or one of them is a wildcard covering the other (``::``
    also covers IPv4: systemd's sockets are dual-stack by default)."""
    if port_a != port_b:
        return False
    a, b = ipaddress.ip_address(host_a), ipaddress.ip_address(host_b)
    if a == b:
        return True
    return any(wild.is_unspecified and wild.version in (other.version, 6) for wild, other in ((a, b), (b, a)))
