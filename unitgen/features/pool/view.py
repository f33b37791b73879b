"""What ``status``, ``gpus`` and ``doctor`` say of GPU pools (issue 27): each
GPU's members (loaded, asleep, loading, draining, stopped) with their memory
need and where it came from, what NVML sees each hold, when each was last
used, and who waits for room and why (the waiting proxy's own words, from its
runtime). Read with the same code the members' proxies decide with
(:func:`unitgen.inunit.poolturn.member_states`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unitgen.inunit.memrecord import read_measured
from unitgen.inunit.nvml import Gpu, gib
from unitgen.inunit.poolfile import PoolFile, PoolMember, PoolTerms
from unitgen.inunit.poolpolicy import Load
from unitgen.inunit.poolread import Units, member_states
from unitgen.inunit.poolstate import ram_budget, read_runtime

__all__ = ["MemberRow", "PoolView", "Sources", "doctor_lines", "pool_view", "view_lines"]


@dataclass(frozen=True)
class MemberRow:
    """One member on one GPU."""

    name: str
    state: str  # loaded, asleep, loading, draining, stopped, waiting
    need_bytes: int
    need: str  # the figure and its source, as shown
    held_bytes: int | None  # what NVML sees it hold there (None: not known)
    last_used: float  # Unix time (0: never)
    in_flight: int = 0
    waiting_s: float = 0.0
    waiting_why: str = ""
    gpus: tuple[str, ...] = ()


@dataclass
class GpuRow:
    """One GPU of a pool."""

    uuid: str
    index: int | None
    total: int | None
    free: int | None
    members: list[MemberRow] = field(default_factory=list)


@dataclass
class PoolView:
    """Every GPU with pool members, and the sleeping members' budget."""

    gpus: list[GpuRow]
    ram_budget: int
    ram_budget_from: str
    ram_asleep: int
    now: float

    def data(self) -> dict[str, object]:
        """For ``--json``."""
        return {"gpus": [asdict(g) for g in self.gpus],
                "sleep_ram": {"budget": self.ram_budget, "from": self.ram_budget_from,
                              "held": self.ram_asleep}}


@dataclass(frozen=True)
class Sources:
    """Where a view is read from: the manager's (its units' states, its
    environment, its directories) and NVML's (``gpus``; None when it cannot be
    read: no free memory, no holdings)."""

    units: Mapping[str, Units]
    environment: Mapping[str, str]
    runtime_dir: Path
    measured_dir: Path
    manager: str
    gpus: list[Gpu] | None


def pool_view(members: Mapping[str, tuple[tuple[str, ...], PoolTerms]], src: Sources) -> PoolView:
    """The pools now (``members``: each member's GPUs and terms)."""
    names = sorted(members)
    everyone = PoolFile(names[0], tuple(PoolMember(n, *members[n]) for n in names))
    units, gpus = dict(src.units), src.gpus
    runtimes = {n: read_runtime(src.runtime_dir, n) for n in names}
    measured = {}
    for n, (_, terms) in members.items():
        found = None if terms.fixed else read_measured(src.measured_dir, n, terms.fingerprint)
        if found is not None:
            measured[n] = found.peak
    states, _ = member_states(everyone, units, gpus or [], runtimes, measured, src.manager)
    by_uuid = {g.uuid: g for g in gpus or []}
    now = time.time()
    rows: dict[str, GpuRow] = {}
    for s in states:
        rt, u = runtimes[s.name], units[s.name]
        word = s.state.value
        # its proxy waits for room: the first turn (activating), or asleep and asked again
        if rt.waiting_since and u.proxy in ("activating", "active") and s.state != Load.LOADED:
            word = "waiting"
        for uuid in s.gpus:
            g = by_uuid.get(uuid)
            row = rows.setdefault(uuid, GpuRow(uuid, g.index if g else None,
                                               g.total if g else None, g.free if g else None))
            total = g.total if g else 0
            need = s.need.on(total) if total else 0
            shown = s.need.shown() if s.need.bytes is not None or not total else (
                f"{gib(need)}: {s.need.shown()}")
            row.members.append(MemberRow(
                s.name, word, need, shown,
                (s.held or {}).get(uuid) if gpus is not None and s.held is not None else None,
                s.last_used, s.in_flight,
                round(now - rt.waiting_since, 1) if word == "waiting" else 0.0,
                rt.waiting_why if word == "waiting" else "", s.gpus))
    budget, source = ram_budget(src.environment)
    asleep = sum(s.ram_asleep for s in states if s.state == Load.ASLEEP)
    return PoolView(sorted(rows.values(), key=lambda r: (r.index is None, r.index or 0, r.uuid)),
                    budget, source, asleep, now)


def _ago(now: float, then: float) -> str:
    if not then:
        return "never used"
    s = max(0.0, now - then)
    return f"last used {s:.0f} s ago" if s < 120 else (
        f"last used {s / 60:.0f} min ago" if s < 7200 else f"last used {s / 3600:.1f} h ago")


def view_lines(view: PoolView) -> list[str]:
    """The pools as ``status`` and ``gpus`` print them."""
    lines = []
    for g in view.gpus:
        size = (f"{gib(g.total)}, {gib(g.free)} free" if g.total is not None and g.free is not None
                else "size unknown (no NVML)")
        index = f"GPU {g.index} " if g.index is not None else "GPU "
        lines.append(f"{index}{g.uuid} ({size}): GPU pool of {len(g.members)}")
        for m in g.members:
            held = f", holds {gib(m.held_bytes)}" if m.held_bytes else ""
            busy = f", {m.in_flight} in flight" if m.in_flight else ""
            line = f"  {m.name}  {m.state}  needs {m.need}{held}{busy}, {_ago(view.now, m.last_used)}"
            if m.state == "waiting":
                line += f"; waits {m.waiting_s:.0f} s: {m.waiting_why}"
            lines.append(line)
    lines.append(f"sleeping members hold {gib(view.ram_asleep)} of host RAM; budget "
                 f"{gib(view.ram_budget)} ({view.ram_budget_from})")
    return lines


def doctor_lines(view: PoolView, name: str) -> list[tuple[bool, str]]:
    """Where member ``name`` stands and, when it waits, why and for whom."""
    rows = [(g, m) for g in view.gpus for m in g.members if m.name == name]
    if not rows:
        return []
    _, me = rows[0]
    mates = sorted({m.name for g, _ in rows for m in g.members if m.name != name})
    where = ", ".join(g.uuid for g, _ in rows)
    out = [(True, f"GPU pool member on {where} with {', '.join(mates) or 'no other member'}: "
                  f"{me.state}; needs {me.need}")]
    if me.state == "waiting":
        out.append((True, f"{name} has waited {me.waiting_s:.0f} s: {me.waiting_why}"))
    for g, _ in rows:
        for m in g.members:
            if m.name != name and m.state in ("loaded", "asleep", "loading", "draining"):
                held = f", holds {gib(m.held_bytes)}" if m.held_bytes else ""
                out.append((True, f"  on {g.uuid}: {m.name} {m.state}{held}, "
                                  f"{_ago(view.now, m.last_used)}"))
    return out
