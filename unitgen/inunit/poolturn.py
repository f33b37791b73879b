"""Taking a turn in a GPU pool (issue 27): what the swap proxy of a pool member
does before it forwards, instead of a swap group's one-at-a-time turn.

1. take the locks of its GPUs in the one global order
   (:func:`unitgen.inunit.poolpolicy.lock_order`);
2. read where every member of its pool stands (:mod:`unitgen.inunit.poolread`)
   and ask :func:`unitgen.inunit.poolpolicy.decide`;
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
from dataclasses import replace
from pathlib import Path

from unitgen.inunit.cgroupowner import instance_of_pid
from unitgen.inunit.nvml import Gpu, GpuUnavailableError, gib, read_gpus
from unitgen.inunit.poolfile import PoolFile
from unitgen.inunit.poolpolicy import (
    Action,
    Decision,
    GpuFree,
    MemberState,
    Start,
    TurnRules,
    Verdict,
    decide,
    lock_order,
)
from unitgen.inunit.poolread import Units, ask_units, measured_needs, member_states, read_units
from unitgen.inunit.poolstate import Runtime, lock_path, ram_budget, read_runtime, write_runtime
from unitgen.inunit.swapctl import Systemctl, log, notify

__all__ = ["Locks", "carry_out", "explain", "take_pool_turn"]

# How often a waiting member reads the pool again (a drain, a load, late-freed memory).
POLL = 0.1
# How long a yielding member's sleep call or its server's stop may take.
YIELD_CALL = 90.0
# How long memory of members it stopped may take to show as free (the GPU wait's bound).
FREED_LATE = 120.0


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


def carry_out(d: Decision, units: dict[str, Units], ctl: Systemctl, state: Path,
              pool: PoolFile) -> str:
    """Make room as decided. A member whose proxy serves is asked to yield by a
    signal (SIGUSR1: sleep, SIGUSR2: stop its server): its proxy drains, does
    so, says it in its runtime and stays, so its next request takes a turn
    without a process to start. Any other is stopped (its server; its proxy
    too when it drains). Returns what failed ("" when every member made room)."""
    stop: list[str] = []
    asked: dict[str, list[str]] = {"SIGUSR1": [], "SIGUSR2": []}
    for e in d.evict:
        u = units.get(e.name, Units())
        if u.proxy in ("active", "reloading"):
            asked["SIGUSR1" if e.action == Action.SLEEP else "SIGUSR2"].append(e.name)
        elif u.proxy == "deactivating":
            stop += [f"{e.name}.service", f"{e.name}-backend.service"]
        else:
            # its proxy is not serving (it waits for its own turn, or is gone): the
            # server alone; a waiting proxy keeps its connections queued
            stop.append(f"{e.name}-backend.service")
    failed = []
    since = time.time()
    for signal_name, names in asked.items():
        if names:
            done = ctl.run("kill", "--kill-whom=main", f"--signal={signal_name}",
                           *(f"{n}.service" for n in names))
            if done.returncode != 0:
                failed.append(f"asking {', '.join(names)} to yield: {done.stderr.strip()}")
    if stop:
        done = ctl.run("stop", *stop)
        if done.returncode != 0:
            failed.append(f"stopping {' '.join(stop)}: {done.stderr.strip()}")
    drains = {m.name: m.terms.drain for m in pool.members}
    for n in asked["SIGUSR1"] + asked["SIGUSR2"]:
        # its drain, then the sleep call (vLLM copies its weights to host RAM) or the stop
        if not _yielded(ctl, state, n, units[n].pid, since, drains.get(n, 0.0) + YIELD_CALL):
            failed.append(f"{n} did not yield")
    return "; ".join(failed)


def _yielded(ctl: Systemctl, state: Path, name: str, pid: int, since: float,
             bound: float) -> bool:
    """Until member ``name``'s runtime says its server (``pid``) sleeps or was
    stopped after ``since``, or its proxy is gone (the next decision sees how)."""
    deadline, checked = time.monotonic() + bound, time.monotonic()
    while time.monotonic() < deadline:
        rt = read_runtime(state, name)
        if (pid and rt.asleep_pid == pid) or rt.stopped_at >= since:
            return True
        if time.monotonic() - checked >= 0.5:
            checked = time.monotonic()
            shown = ctl.show([f"{name}.service"], "ActiveState")[f"{name}.service"]
            if shown["ActiveState"] not in ("active", "reloading", "deactivating"):
                return False
        time.sleep(0.005)
    return False


def _decide(ns: argparse.Namespace, pool: PoolFile, units: dict[str, Units], manager: str,
            gpus: list[Gpu]) -> tuple[Decision, str]:
    """The policy's answer, and the answer in words."""
    runtimes = {m.name: read_runtime(Path(ns.state), m.name) for m in pool.members}
    states, free = member_states(pool, units, gpus, runtimes,
                                measured_needs(pool, ns.measured), manager)
    me = next(s for s in states if s.name == ns.name)
    d = decide(me, states, free, ram_budget()[0], time.time(), TurnRules())
    return d, explain(me, free, d)


def _after(units: dict[str, Units], d: Decision) -> dict[str, Units]:
    """The members' units once the evictions went through (under the GPU locks
    nobody else starts on these GPUs): the next decision reads NVML alone."""
    out = dict(units)
    for e in d.evict:
        u = out.get(e.name, Units())
        stays = u.proxy in ("active", "reloading")  # it was asked, and stays
        if not (e.action == Action.SLEEP and stays):  # (a sleeper's runtime says it)
            out[e.name] = replace(u, proxy=u.proxy if stays else "inactive", server="inactive")
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
            failed = carry_out(d, units, ctl, state, pool)
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
    # the stamp its server's GPU wait reads (unitgen.inunit.poolstart): weighed just now
    with contextlib.suppress(OSError):
        (Path(ns.state) / f"{ns.name}.start").write_text(f"{time.monotonic()}\n",
                                                          encoding="utf-8")
    t0 = time.monotonic()
    done = ctl.run("start", me)
    if done.returncode != 0:
        return f"{me} did not start: {done.stderr.strip().splitlines()[0] if done.stderr else ''}"
    rt.load_seconds = time.monotonic() - t0
    rt.loaded_at, rt.asleep_pid = time.time(), 0
    write_runtime(Path(ns.state), ns.name, rt)
    return ""
