"""Taking a turn in a GPU pool (issue 27): what the swap proxy of a pool member
does before it forwards, instead of a swap group's one-at-a-time turn.

1. take the locks of its GPUs in the one global order
   (:func:`unitgen.inunit.poolpolicy.lock_order`);
2. read where every member of its pool stands (its units' states, what NVML
   says each GPU has free and each member holds, the members' runtimes, their
   measured needs) and ask :func:`unitgen.inunit.poolpolicy.decide`;
3. carry out the answer: members that make room yield as a swap group's do
   (their proxy drains, then their server stops, or sleeps: its proxy puts it
   to sleep as it leaves), or wait while only members within their minimum
   turn or loading stand in the way; then read again, until it fits. A
   decision that needs the lock of another GPU releases every lock and takes
   the whole set again in order;
4. start its own server, or leave the wake to the forwarder (the server's
   connection is the forwarder's), and keep the locks until its unit is active.

Standard library only (NVML through :mod:`unitgen.inunit.nvml`, imported when read).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path

from unitgen.inunit.cgroupowner import instance_of_pid
from unitgen.inunit.gpuneed import Need, NeedSource
from unitgen.inunit.nvml import Gpu, GpuUnavailableError, gib, read_gpus
from unitgen.inunit.poolfile import PoolFile
from unitgen.inunit.poolpolicy import (
    Action,
    Decision,
    GpuFree,
    Load,
    MemberState,
    Start,
    TurnRules,
    Verdict,
    decide,
    lock_order,
)
from unitgen.inunit.poolstate import (
    Runtime,
    load_of,
    lock_path,
    ram_budget,
    read_runtime,
    write_runtime,
    yield_path,
)
from unitgen.inunit.swapctl import Systemctl, log, notify, parse_show

__all__ = ["Locks", "Units", "carry_out", "explain", "member_states", "read_units",
           "take_pool_turn"]

# How often a waiting member reads the pool again (a drain, a load, late-freed memory).
POLL = 0.1
# How long memory of members it stopped may take to show as free (the GPU wait's bound).
FREED_LATE = 120.0


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


class Locks:
    """The GPU locks a member holds, taken in the one global order."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory, self.name = directory, name
        self.fds: dict[str, int] = {}

    @property
    def held(self) -> tuple[str, ...]:
        """The GPUs whose lock is held."""
        return tuple(self.fds)

    def take(self, gpus: tuple[str, ...]) -> None:
        """Hold the locks of ``gpus`` (in lock order), waiting for each."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for gpu in lock_order(gpus):
            path = lock_path(self.directory, gpu)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _held_by(path)
                notify(f"waiting for GPU {gpu} ({holder or 'another member'} holds it)")
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, self.name.encode() + b"\n", 0)
            self.fds[gpu] = fd

    def release(self) -> None:
        """Let go of every lock."""
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}


def _held_by(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(encoding="utf-8").strip()
    return ""


def carry_out(d: Decision, units: dict[str, Units], ctl: Systemctl, state: Path) -> str:
    """Make room as decided: one ``systemctl stop`` for every member that yields
    (its proxy drains first; a sleeper's proxy puts its server to sleep as it
    leaves, its server runs on). Returns what failed ("" when it went through)."""
    stop: list[str] = []
    for e in d.evict:
        u = units.get(e.name, Units())
        if u.proxy in ("active", "reloading") and e.action == Action.SLEEP:
            yield_path(state, e.name).write_text("sleep\n", encoding="utf-8")
            stop.append(f"{e.name}.service")
        elif u.proxy in ("active", "reloading", "deactivating"):
            stop += [f"{e.name}.service", f"{e.name}-backend.service"]
        else:
            # its proxy is not serving (it waits for its own turn, or is gone): the
            # server alone; a waiting proxy keeps its connections queued
            stop.append(f"{e.name}-backend.service")
    for e in d.evict:
        if e.action != Action.SLEEP:
            yield_path(state, e.name).unlink(missing_ok=True)  # a wish left from before
    done = ctl.run("stop", *stop)
    return "" if done.returncode == 0 else f"stopping {' '.join(stop)}: {done.stderr.strip()}"


def _measured(ns: argparse.Namespace, pool: PoolFile) -> dict[str, int]:
    out: dict[str, int] = {}
    if all(m.terms.fixed for m in pool.members) or not ns.measured:
        return out
    # only when a need may be measured: a member's start does not pay for the import
    from unitgen.inunit.memrecord import read_measured  # noqa: PLC0415

    for m in pool.members:
        if not m.terms.fixed:
            found = read_measured(Path(ns.measured), m.name, m.terms.fingerprint)
            if found is not None:
                out[m.name] = found.peak
    return out


def _decide(ns: argparse.Namespace, pool: PoolFile, units: dict[str, Units], manager: str,
            gpus: list[Gpu]) -> tuple[Decision, str]:
    """The policy's answer, and the answer in words."""
    runtimes = {m.name: read_runtime(Path(ns.state), m.name) for m in pool.members}
    states, free = member_states(pool, units, gpus, runtimes, _measured(ns, pool), manager)
    me = next(s for s in states if s.name == ns.name)
    d = decide(me, states, free, ram_budget()[0], time.time(), TurnRules())
    return d, explain(me, free, d)


def _after(units: dict[str, Units], d: Decision) -> dict[str, Units]:
    """The members' units once the evictions went through (under the GPU locks
    nobody else starts on these GPUs): the next decision reads NVML alone."""
    out = dict(units)
    for e in d.evict:
        u = out.get(e.name, Units())
        asleep = e.action == Action.SLEEP and u.proxy in ("active", "reloading")
        out[e.name] = replace(u, proxy="inactive", server=u.server if asleep else "inactive")
    return out


def explain(want: MemberState, gpus: list[GpuFree], d: Decision) -> str:
    """A decision as ``status`` and ``doctor`` say it: "needs 40.0 GiB on GPU-…
    (declared); 19.5 GiB free; stop a (idle since 12 s ago)"."""
    by_uuid = {g.uuid: g for g in gpus}
    room = "; ".join(f"needs {gib(want.need.on(by_uuid[u].total))} on {u} "
                     f"({want.need.source}); {gib(by_uuid[u].free)} free"
                     for u in want.gpus if u in by_uuid)
    if d.verdict == Verdict.CANNOT_FIT:
        return f"cannot run: {d.reason}"
    if d.verdict == Verdict.WAIT:
        return f"{room}; {d.reason.split(': ', 1)[-1]}"
    parts = [f"{'putting to sleep' if e.action == Action.SLEEP else 'stopping'} {e.name} "
             f"({e.why})" for e in d.evict]
    parts += [f"waiting for {n} to finish its requests and unload" for n in d.wait_for]
    return "; ".join([room, *parts]) if parts else f"{room}; fits"


class Waiting:
    """What a member waits for, said where status and doctor read it (its
    runtime, its status line) at most once a second, and in the journal when
    it changes in kind (not in its figures)."""

    def __init__(self, ns: argparse.Namespace, rt: Runtime) -> None:
        self.ns, self.rt = ns, rt
        self.shape, self.said = "", 0.0

    def say(self, why: str) -> None:
        shape = re.sub(r"\d+(\.\d+)?", "#", why)
        if shape != self.shape:
            log(why)
        if shape != self.shape or time.monotonic() - self.said >= 1.0:
            notify(why)
            self.rt.waiting_since = self.rt.waiting_since or time.time()
            self.rt.waiting_why = why
            write_runtime(Path(self.ns.state), self.ns.name, self.rt)
            self.shape, self.said = shape, time.monotonic()


def take_pool_turn(ns: argparse.Namespace, ctl: Systemctl) -> tuple[Locks, bool] | str:
    """Make room on the member's GPUs and start its server; the locks are held
    until the caller releases them, and True when its server is asleep and the
    forwarder must wake it (the server's connection is the forwarder's). A
    string: why it cannot run (no lock held)."""
    t0 = time.monotonic()
    pool = PoolFile.read(Path(ns.pool))
    state = Path(ns.state)
    locks = Locks(state, ns.name)
    locks.take(pool.me.gpus)
    own = instance_of_pid("self")
    manager = own[1] if own else "system"
    rt = read_runtime(state, ns.name)
    yield_path(state, ns.name).unlink(missing_ok=True)  # a wish left from before
    evicted = -FREED_LATE - 1.0  # when it last made room (monotonic)
    waiting = Waiting(ns, rt)
    names = [m.name for m in pool.members]
    units: dict[str, Units] | None = None  # read (again) when None
    reset: subprocess.Popen[bytes] | None = None
    while True:
        asked = ask_units(ctl, names) if units is None else None
        try:
            gpus = read_gpus()
        except GpuUnavailableError as exc:
            log(f"cannot read NVML ({exc.message}): starting without making room")
            gpus = []
        if asked is not None:
            units = read_units(asked, names)
        assert units is not None  # noqa: S101 - read just now, or kept from the last round
        d, why = _decide(ns, pool, units, manager, gpus) if gpus else (
            Decision(Verdict.GO, Start.LOAD), "NVML cannot be read")
        mine = units.get(ns.name, Units())
        if d.start == Start.WAKE and mine.memory:
            rt.ram_asleep = mine.memory  # what it held asleep: weighed next time it could sleep
        if reset is None and mine.server in ("inactive", "failed") \
                and mine.result in ("success", ""):
            # each turn is a deliberate start, not one of a crash loop's: the
            # start limit is reset (meanwhile) unless its last run failed
            reset = ctl.popen("reset-failed", f"{ns.name}-backend.service")
        if mine.result == "start-limit-hit":
            # it failed again and again: nobody makes room for a start that cannot come
            locks.release()
            return f"{ns.name}-backend.service is at its start limit: not making room for it"
        wanted = set(d.locks) - set(locks.held)
        if d.verdict == Verdict.GO and wanted:
            locks.release()  # never wait for a lock while holding one out of order
            locks.take(tuple({*pool.me.gpus, *d.locks}))
            continue
        if d.verdict == Verdict.GO and not d.evict and not d.wait_for:
            break
        waiting.say(why)  # what status and doctor say while it waits
        if d.verdict == Verdict.CANNOT_FIT and time.monotonic() - evicted > FREED_LATE:
            # (memory of the processes it just stopped may be freed late by the
            # driver, held by no member meanwhile: that is waited for a while)
            locks.release()
            return why
        if d.verdict == Verdict.GO and d.evict:
            failed = carry_out(d, units, ctl, state)
            if failed:
                log(failed)
                time.sleep(POLL)
            units = None if failed else _after(units, d)
            evicted = time.monotonic()
            continue
        # drains and loads end, minimum turns run out, freed memory shows up
        units = None
        time.sleep(POLL)
    rt.waiting_since, rt.waiting_why = 0.0, ""
    write_runtime(state, ns.name, rt)
    t_room = time.monotonic()
    if reset is not None:
        reset.wait()
    failed = _start_server(ns, ctl, rt) if d.start == Start.LOAD else ""
    if failed:
        locks.release()
        return failed
    log(f"turn taken after {time.monotonic() - t0:.2f} s: room made in {t_room - t0:.2f} s"
        f" ({why}), own server {d.start.value}"
        + (f" in {time.monotonic() - t_room:.2f} s" if d.start == Start.LOAD else ""))
    return locks, d.start == Start.WAKE


def _start_server(ns: argparse.Namespace, ctl: Systemctl, rt: Runtime) -> str:
    me = f"{ns.name}-backend.service"
    notify("GPU pool: loading")
    t0 = time.monotonic()
    done = ctl.run("start", me)
    if done.returncode != 0:
        return f"{me} did not start: {done.stderr.strip().splitlines()[0] if done.stderr else ''}"
    rt.load_seconds = time.monotonic() - t0
    rt.loaded_at, rt.asleep_pid = time.time(), 0
    write_runtime(Path(ns.state), ns.name, rt)
    return ""
