"""Reading a GPU pool as its members' proxies decide with it (issue 27), and
as ``status`` shows it: each member's units (one ``systemctl show``), what
NVML says each GPU has free and each member holds, the members' runtimes and
measured needs, into the values the policy weighs
(:class:`unitgen.inunit.poolpolicy.MemberState`, :class:`~unitgen.inunit.poolpolicy.GpuFree`).

Standard library only.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from unitgen.inunit.gpuneed import Need, NeedSource
from unitgen.inunit.nvml import Gpu
from unitgen.inunit.poolfile import PoolFile
from unitgen.inunit.poolpolicy import GpuFree, Load, MemberState
from unitgen.inunit.poolstate import Runtime, load_of
from unitgen.inunit.swapctl import Systemctl, parse_show

__all__ = ["Units", "ask_units", "measured_needs", "member_states", "read_units"]


@dataclass(frozen=True)
class Units:
    """A member's proxy and server as systemctl shows them."""

    proxy: str = "inactive"
    server: str = "inactive"
    pid: int = 0  # the server's main pid
    since: float = 0.0  # Unix time the server last became active
    memory: int = 0  # the server unit's memory (cgroup), 0 when not known
    result: str = ""  # the server's Result= ("start-limit-hit": it will not start now)


_PROPS = ("ActiveState", "MainPID", "ActiveEnterTimestampMonotonic", "MemoryCurrent", "Result")


def _unit_names(names: list[str]) -> list[str]:
    return [u for n in names for u in (f"{n}.service", f"{n}-backend.service")]


def ask_units(ctl: Systemctl, names: list[str]) -> subprocess.Popen[str]:
    """Every member's units in one ``systemctl show``, started (the answer is
    read while NVML is): :func:`read_units` reads it."""
    return ctl.popen_show(_unit_names(names), *_PROPS)


def read_units(asked: subprocess.Popen[str], names: list[str]) -> dict[str, Units]:
    """The members' units from :func:`ask_units`."""
    shown = parse_show(asked.communicate()[0], _unit_names(names), _PROPS)
    # a monotonic timestamp on the Unix clock (both clocks read now)
    offset = time.time() - time.monotonic()
    out = {}
    for n in names:
        proxy, server = shown[f"{n}.service"], shown[f"{n}-backend.service"]
        mono = server["ActiveEnterTimestampMonotonic"]
        out[n] = Units(proxy["ActiveState"] or "inactive", server["ActiveState"] or "inactive",
                       int(server["MainPID"] or 0) if server["MainPID"].isdigit() else 0,
                       offset + int(mono) / 1e6 if mono.isdigit() and int(mono) else 0.0,
                       int(server["MemoryCurrent"]) if server["MemoryCurrent"].isdigit() else 0,
                       server["Result"])
    return out


def _need(pool: PoolFile, name: str, measured: dict[str, int]) -> Need:
    terms = next(m.terms for m in pool.members if m.name == name)
    need = terms.need_value()
    if not terms.fixed and measured.get(name):
        return Need(NeedSource.MEASURED, bytes=measured[name], detail="at its last load")
    return need


def member_states(pool: PoolFile, units: dict[str, Units], gpus: list[Gpu],
                  runtimes: dict[str, Runtime], measured: dict[str, int], manager: str,
                  ) -> tuple[list[MemberState], list[GpuFree]]:
    """The pool as the policy weighs it: each member's state, need and what NVML
    saw it hold; each of the pool's GPUs with its free memory. A need guessed
    as the whole GPU (nothing known before its first load) is what the pool can
    have there: the GPU less what processes outside the pool hold."""
    uuids = {u for m in pool.members for u in m.gpus}
    by_uuid = {g.uuid: g for g in gpus if g.uuid in uuids}
    names = [m.name for m in pool.members]
    held = {n: {u: sum(p.used_bytes for p in g.processes if p.belongs_to(n, manager))
                for u, g in by_uuid.items()} for n in names}
    outside = {u: max(0, g.used - sum(held[n][u] for n in names)) for u, g in by_uuid.items()}
    states = []
    for m in pool.members:
        u, rt = units.get(m.name, Units()), runtimes.get(m.name, Runtime())
        need = _need(pool, m.name, measured)
        if need.source == NeedSource.ESTIMATE and need.fraction == 1.0:
            room = min((by_uuid[g].total - outside[g] for g in m.gpus if g in by_uuid), default=0)
            need = replace(need, bytes=max(room, 1), fraction=None)
        load = load_of(u.proxy, u.server, u.pid, rt)
        total = min((by_uuid[g].total for g in m.gpus if g in by_uuid), default=0)
        ram = (u.memory or rt.ram_asleep) if load == Load.ASLEEP else rt.ram_asleep
        states.append(MemberState(
            name=m.name, gpus=m.gpus, need=need, state=load,
            in_flight=rt.in_flight if u.proxy in ("active", "deactivating") else 0,
            last_used=rt.last_used or u.since, loaded_at=rt.loaded_at or u.since,
            load_seconds=rt.load_seconds or 60.0, can_sleep=m.terms.sleep,
            wake_seconds=rt.wake_seconds or 1.0,
            ram_asleep=ram or need.on(total), idle_stop=m.terms.idle_stop,
            min_turn=m.terms.min_turn,
            # a loading member may not hold all of its memory yet: count its need
            held=None if load == Load.LOADING else held[m.name]))
    return states, [GpuFree(u, g.total, g.free) for u, g in sorted(by_uuid.items())]


def measured_needs(pool: PoolFile, directory: str) -> dict[str, int]:
    """Member -> its measured need, for the members whose spec does not say it
    (``directory``: the manager's state directory, "" when not known)."""
    out: dict[str, int] = {}
    if all(m.terms.fixed for m in pool.members) or not directory:
        return out
    # only when a need may be measured: a member's start does not pay for the import
    from unitgen.inunit.memrecord import read_measured  # noqa: PLC0415

    for m in pool.members:
        if not m.terms.fixed:
            found = read_measured(Path(directory), m.name, m.terms.fingerprint)
            if found is not None:
                out[m.name] = found.peak
    return out
