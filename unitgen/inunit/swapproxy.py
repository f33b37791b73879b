"""The proxy of a swap-group member: takes the group's turn, then forwards the
public socket to the private endpoint, and drains before it yields.

It replaces ``systemd-socket-proxyd`` in ``<name>.service`` of a member (issue 12)
because a member must be able to stop taking new connections while it finishes
those in flight; systemd-socket-proxyd accepts until it is killed.

Taking the turn (before the first connection is accepted):

1. wait for the group lock (a ``flock`` in the manager's runtime directory), so
   members take turns one at a time instead of fighting over start jobs;
2. ask every other member whose server is up to yield: ``systemctl stop
   <mate>.service <mate>-backend.service`` (the mates are the units its own
   server ``Conflicts=`` with, so the list always matches the installed units).
   That proxy drains (below), then its server stops and frees its GPU memory;
3. start its own server (``<name>-backend.service``, whose ``ExecStartPre=`` GPU
   wait and ``ExecStartPost=`` probe do the rest) and serve;
4. keep the lock until its own unit is active, so the next member cannot ask it
   to yield before it has taken the connections that waited for it.

On SIGTERM it accepts what is already queued, closes its copy of the listening
socket (the socket unit keeps listening: new requests wait there for the next
turn), finishes the requests being answered within ``--drain``, closes the
connections that are not being answered after a short grace (``DrainPolicy`` in
:mod:`unitgen.inunit.swapdrain`), and exits 0. That half is
:mod:`unitgen.inunit.swapforward`, imported while the turn is taken (see
:func:`main`).

    python -I -m unitgen.inunit.swapproxy --name a --group gpu0 --lock PATH \\
        --scope user --drain 3min TARGET

A GPU pool member's proxy (issue 27) takes its turn by memory instead
(:mod:`unitgen.inunit.poolturn`): ``--pool FILE --state DIR --measured DIR``
in place of ``--group`` and ``--lock``.

Standard library only: it runs inside the unit.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import sys
import threading
import time
from pathlib import Path

from unitgen.inunit.passed import passed_listener
from unitgen.inunit.swapctl import Systemctl, log, notify
from unitgen.timespan import parse_timespan

__all__ = ["main", "mates_from_conflicts"]



def mates_from_conflicts(conflicts: str, me: str) -> list[str]:
    """Member names from a server unit's ``Conflicts=`` property value."""
    out = []
    for unit in conflicts.split():
        if unit.endswith("-backend.service") and unit != f"{me}-backend.service":
            out.append(unit[: -len("-backend.service")])
    return sorted(set(out))


def _held_by(lock: Path) -> str:
    with contextlib.suppress(OSError):
        return lock.read_text(encoding="utf-8").strip()
    return ""


def take_turn(ns: argparse.Namespace, ctl: Systemctl) -> int:
    """Wait for the group lock, make the other members yield, start our server.
    Returns the lock's file descriptor (held until the caller closes it)."""
    t0 = time.monotonic()
    lock = Path(ns.lock)
    lock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    me = f"{ns.name}-backend.service"
    # ask for our server's Conflicts= (the mates) while taking the lock
    asking = ctl.conflicts(me)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _held_by(lock) or "another member"
        notify(f"waiting for its turn in swap group {ns.group} ({holder} is taking its turn)")
        log(f"waiting for its turn in swap group {ns.group} ({holder} is taking its turn)")
        fcntl.flock(fd, fcntl.LOCK_EX)
        asking.communicate()
        asking = ctl.conflicts(me)  # a deploy may have changed them meanwhile
    os.ftruncate(fd, 0)
    os.pwrite(fd, ns.name.encode() + b"\n", 0)
    t_lock = time.monotonic()
    mates = mates_from_conflicts(asking.communicate()[0], ns.name)
    # states only now that we hold the turn: they change while others take theirs
    states = ctl.show([me, *(f"{m}-backend.service" for m in mates)], "ActiveState", "Result")
    mine = states[me]
    reset = None
    if mine["ActiveState"] != "active" and mine["Result"] in ("success", ""):
        # Each turn is a deliberate start: it must not count toward the start
        # limit meant for crash loops (a failed server keeps its count).
        reset = ctl.popen("reset-failed", me)
    busy = [m for m in mates
            if states[f"{m}-backend.service"]["ActiveState"] not in ("inactive", "failed", "")]
    if busy:
        notify(f"swap group {ns.group}: asking {', '.join(busy)} to finish its requests and unload")
        # proxy first (it drains), then the server; one job each, ordered by After=
        units = [u for m in busy for u in (f"{m}.service", f"{m}-backend.service")]
        done = ctl.run("stop", *units)
        if done.returncode != 0:
            log(f"stopping {', '.join(units)} failed: {done.stderr.strip()}; not loading next "
                "to it")
            return -1
    t_stopped = time.monotonic()
    notify(f"swap group {ns.group}: loading")
    if reset is not None:
        reset.wait()
    done = ctl.run("start", me)
    if done.returncode != 0:
        log(f"{me} did not start: {done.stderr.strip()}")
        return -1
    t_ready = time.monotonic()
    log(f"turn taken after {t_ready - t0:.2f} s: lock {t_lock - t0:.2f} s, "
        f"others stopped {t_stopped - t_lock:.2f} s ({', '.join(busy) or 'none running'}), "
        f"own server started {t_ready - t_stopped:.2f} s")
    return fd


def main(argv: list[str] | None = None) -> int:
    """Entry point: take the turn, forward, drain."""
    p = argparse.ArgumentParser(prog="python -m unitgen.inunit.swapproxy")
    p.add_argument("--name", required=True, help="instance name")
    p.add_argument("--group", default="", help="swap group name")
    p.add_argument("--lock", default="", help="the group's lock file")
    p.add_argument("--pool", default="", help="a GPU pool member's pool file")
    p.add_argument("--state", default="", help="the GPU pool's runtime directory")
    p.add_argument("--measured", default="", help="the manager's state directory")
    p.add_argument("--scope", choices=("system", "user"), default="system")
    p.add_argument("--drain", default="3min", help="how long to finish requests in flight")
    p.add_argument("--exit-idle-time", default="", help="exit after this long without connections")
    p.add_argument("--connections-max", type=int, default=1024)
    p.add_argument("--connect-timeout", default="2min",
                   help="how long a connection waits for a restarting server")
    p.add_argument("--any-uid", action="store_true", help="forward to a server socket of "
                   "any uid (a container's: its path is checked instead, never through a link)")
    p.add_argument("target", help="host:port or a Unix socket path")
    ns = p.parse_args(argv)
    if not (ns.group and ns.lock) and not (ns.pool and ns.state):
        p.error("give --group and --lock (a swap group), or --pool and --state (a GPU pool)")
    ns.what = f"swap group {ns.group}" if ns.group else "GPU pool"
    ns.drain = parse_timespan(ns.drain)
    ns.exit_idle_time = parse_timespan(ns.exit_idle_time) if ns.exit_idle_time else 0.0
    ns.connect_timeout = parse_timespan(ns.connect_timeout)
    listener = passed_listener()
    if listener is None:
        log("no socket passed in (start it through its .socket unit)")
        return 1

    def leave(signum: int, frame: object) -> None:
        # Not our turn yet: nothing accepted, nothing to drain. Connections stay
        # queued in the socket and start this unit again later.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    if ns.pool:
        # only a pool member's proxy needs the policy and NVML: a swap group's
        # turn does not pay for importing them. Before the thread below: two
        # threads importing the same modules can see them half made
        from unitgen.inunit.poolturn import take_pool_turn  # noqa: PLC0415
    # asyncio takes ~60 ms to import: do it while the turn is taken, not after
    threading.Thread(target=__import__, args=("unitgen.inunit.swapforward",), daemon=True).start()
    ctl = Systemctl(ns.scope)
    wake = False
    if ns.pool:
        taken = take_pool_turn(ns, ctl)
        if isinstance(taken, str):
            log(f"cannot run: {taken}")
            notify(f"cannot run: {taken}")
            from unitgen.inunit.poolmember import refuse_queued  # noqa: PLC0415

            refuse_queued(listener, taken)
            return 1
        locks, wake = taken
        fds = list(locks.fds.values())
    else:
        fd = take_turn(ns, ctl)
        if fd < 0:
            return 1
        fds = [fd]
    termed: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: termed.append(signum))
    # late on purpose (asyncio, see the thread above), not to break a circle: there is none
    from unitgen.inunit.swapforward import forward  # noqa: PLC0415

    return forward(ns, listener, fds, ctl, termed=termed, wake=wake)


if __name__ == "__main__":
    sys.exit(main())
