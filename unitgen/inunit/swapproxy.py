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
turn), finishes the connections in flight within ``--drain``, and exits 0.

    python -I -m unitgen.inunit.swapproxy --name a --group gpu0 --lock PATH \\
        --scope user --drain 3min TARGET

Standard library only: it runs inside the unit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from unitgen.timespan import format_seconds, parse_timespan

__all__ = ["main", "mates_from_conflicts"]

SD_LISTEN_FDS_START = 3


def log(message: str) -> None:
    """One line for the journal."""
    print(f"swap: {message}", file=sys.stderr, flush=True)


def notify(text: str) -> None:
    """Tell systemd a status line (shown by systemctl status and unitgen status)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(f"STATUS={text}".encode())


def mates_from_conflicts(conflicts: str, me: str) -> list[str]:
    """Member names from a server unit's ``Conflicts=`` property value."""
    out = []
    for unit in conflicts.split():
        if unit.endswith("-backend.service") and unit != f"{me}-backend.service":
            out.append(unit[: -len("-backend.service")])
    return sorted(set(out))


class Systemctl:
    """systemctl for the manager this unit runs under."""

    def __init__(self, scope: str) -> None:
        self.base = ["systemctl", "--no-ask-password"] + (["--user"] if scope == "user" else [])

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, check=False)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        done = self.run("show", unit, *(f"-p{p}" for p in props))
        values = dict.fromkeys(props, "")
        for line in done.stdout.splitlines():
            key, _, value = line.partition("=")
            values[key] = value
        return values


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
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _held_by(lock) or "another member"
        notify(f"waiting for its turn in swap group {ns.group} ({holder} is taking its turn)")
        log(f"waiting for its turn in swap group {ns.group} ({holder} is taking its turn)")
        fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.pwrite(fd, ns.name.encode() + b"\n", 0)
    t_lock = time.monotonic()
    me = f"{ns.name}-backend.service"
    mates = mates_from_conflicts(ctl.show(me, "Conflicts")["Conflicts"], ns.name)
    busy = [m for m in mates
            if ctl.show(f"{m}-backend.service", "ActiveState")["ActiveState"]
            not in ("inactive", "failed", "")]
    if busy:
        notify(f"swap group {ns.group}: asking {', '.join(busy)} to finish its requests and unload")
        units = [u for m in busy for u in (f"{m}.service", f"{m}-backend.service")]
        done = ctl.run("stop", *units)
        if done.returncode != 0:
            log(f"stopping {', '.join(units)}: {done.stderr.strip()}")
        still = [m for m in busy
                 if ctl.show(f"{m}-backend.service", "ActiveState")["ActiveState"] == "active"]
        if still:
            log(f"{', '.join(still)} did not stop; not loading next to it")
            return -1
    t_stopped = time.monotonic()
    notify(f"swap group {ns.group}: loading")
    state = ctl.show(me, "ActiveState", "Result")
    if state["ActiveState"] != "active" and state["Result"] in ("success", ""):
        # Each turn is a deliberate start: it must not count toward the start
        # limit meant for crash loops (a failed server keeps its count).
        ctl.run("reset-failed", me)
    done = ctl.run("start", me)
    if done.returncode != 0:
        log(f"{me} did not start: {done.stderr.strip()}")
        return -1
    t_ready = time.monotonic()
    log(f"turn taken after {t_ready - t0:.2f} s: lock {t_lock - t0:.2f} s, "
        f"others stopped {t_stopped - t_lock:.2f} s ({', '.join(busy) or 'none running'}), "
        f"own server started {t_ready - t_stopped:.2f} s")
    return fd


class Forwarder:
    """Forwards accepted connections to the private endpoint; drains on request."""

    def __init__(self, ns: argparse.Namespace, listener: socket.socket) -> None:
        self.ns = ns
        self.listener = listener
        self.conns: set[asyncio.Task[None]] = set()
        self.stopping = asyncio.Event()
        self.last_activity = time.monotonic()

    async def connect_backend(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        target: str = self.ns.target
        deadline = time.monotonic() + self.ns.connect_timeout
        while True:
            try:
                if target.startswith("/"):
                    return await asyncio.open_unix_connection(target)
                host, _, port = target.rpartition(":")
                return await asyncio.open_connection(host.strip("[]"), int(port))
            except (ConnectionRefusedError, FileNotFoundError):
                # The server is restarting (crash, Restart=): wait for it.
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.1)

    async def handle(self, client: socket.socket) -> None:
        try:
            try:
                br, bw = await self.connect_backend()
            except OSError as exc:
                log(f"cannot reach the server at {self.ns.target}: {exc}")
                client.close()
                return
            cr, cw = await asyncio.open_connection(sock=client)
            await asyncio.gather(self.pipe(cr, bw), self.pipe(br, cw))
            for w in (cw, bw):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()
        finally:
            self.last_activity = time.monotonic()

    async def pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
        except OSError:
            w.close()

    def start(self, client: socket.socket) -> None:
        client.setblocking(False)
        task = asyncio.get_running_loop().create_task(self.handle(client))
        self.conns.add(task)
        task.add_done_callback(self.conns.discard)

    async def accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            while len(self.conns) >= self.ns.connections_max:
                await asyncio.sleep(0.05)
            client, _ = await loop.sock_accept(self.listener)
            self.last_activity = time.monotonic()
            self.start(client)

    def sweep(self) -> int:
        """Accept what already waits in the socket's queue (non-blocking)."""
        taken = 0
        while True:
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return taken
            except OSError:
                return taken
            self.start(client)
            taken += 1

    async def idle_watch(self) -> None:
        idle = self.ns.exit_idle_time
        while not self.stopping.is_set():
            await asyncio.sleep(min(1.0, idle / 4))
            if not self.conns and time.monotonic() - self.last_activity >= idle:
                log(f"idle for {format_seconds(idle)}: exiting (the server unloads)")
                self.stopping.set()
                return


async def serve(ns: argparse.Namespace, listener: socket.socket, lock_fd: int,
                ctl: Systemctl, *, termed: bool) -> int:
    """Forward until SIGTERM (drain) or idle exit."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    fw = Forwarder(ns, listener)
    term = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, term.set)
    loop.add_signal_handler(signal.SIGINT, term.set)
    if termed:
        term.set()
    accepting = loop.create_task(fw.accept_loop())
    watchers: list[asyncio.Task[object]] = [loop.create_task(term.wait())]
    if ns.exit_idle_time:
        watchers.append(loop.create_task(fw.idle_watch()))
    notify(f"serving (swap group {ns.group})")

    async def release_lock() -> None:
        # Hold the turn until our unit is active: its queued connections are ours.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            proc = await asyncio.create_subprocess_exec(
                *ctl.base, "show", "-pActiveState", "--value", f"{ns.name}.service",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            out, _ = await proc.communicate()
            if out.decode().strip() != "activating":
                break
            await asyncio.sleep(0.05)
        os.close(lock_fd)

    releasing = loop.create_task(release_lock())
    await asyncio.wait([*watchers, loop.create_task(fw.stopping.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    fw.stopping.set()
    accepting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await accepting
    swept = fw.sweep() if term.is_set() else 0
    # Only our copy of the socket closes: the socket unit keeps listening.
    listener.close()
    if fw.conns:
        t0 = time.monotonic()
        notify(f"draining {len(fw.conns)} connection(s) (at most {format_seconds(ns.drain)})")
        log(f"draining {len(fw.conns)} connection(s) ({swept} taken from the queue), "
            f"at most {format_seconds(ns.drain)}")
        _, pending = await asyncio.wait(set(fw.conns), timeout=ns.drain)
        if pending:
            log(f"drain bound {format_seconds(ns.drain)} reached: closing {len(pending)} "
                "connection(s)")
            for task in pending:
                task.cancel()
        else:
            log(f"drained in {time.monotonic() - t0:.2f} s")
    releasing.cancel()
    for w in watchers:
        w.cancel()
    return 0


def unload(argv: list[str]) -> int:
    """``unload --scope S NAME`` (the proxy's ExecStopPost=): however the proxy
    ended, queue the stop of its server; never wait for it (that would wait on
    the proxy's own stop job)."""
    p = argparse.ArgumentParser(prog="python -m unitgen.inunit.swapproxy unload")
    p.add_argument("--scope", choices=("system", "user"), default="system")
    p.add_argument("name")
    ns = p.parse_args(argv)
    done = Systemctl(ns.scope).run("stop", "--no-block", f"{ns.name}-backend.service")
    if done.returncode != 0:
        log(f"could not stop {ns.name}-backend.service: {done.stderr.strip()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: take the turn, forward, drain (or ``unload``)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["unload"]:
        return unload(argv[1:])
    p = argparse.ArgumentParser(prog="python -m unitgen.inunit.swapproxy")
    p.add_argument("--name", required=True, help="instance name")
    p.add_argument("--group", required=True, help="swap group name")
    p.add_argument("--lock", required=True, help="the group's lock file")
    p.add_argument("--scope", choices=("system", "user"), default="system")
    p.add_argument("--drain", default="3min", help="how long to finish requests in flight")
    p.add_argument("--exit-idle-time", default="", help="exit after this long without connections")
    p.add_argument("--connections-max", type=int, default=1024)
    p.add_argument("--connect-timeout", default="2min",
                   help="how long a connection waits for a restarting server")
    p.add_argument("target", help="host:port or a Unix socket path")
    ns = p.parse_args(argv)
    ns.drain = parse_timespan(ns.drain)
    ns.exit_idle_time = parse_timespan(ns.exit_idle_time) if ns.exit_idle_time else 0.0
    ns.connect_timeout = parse_timespan(ns.connect_timeout)
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or not os.environ.get("LISTEN_FDS"):
        log("no socket passed in (start it through its .socket unit)")
        return 1
    listener = socket.socket(fileno=SD_LISTEN_FDS_START)

    def leave(signum: int, frame: object) -> None:
        # Not our turn yet: nothing accepted, nothing to drain. Connections stay
        # queued in the socket and start this unit again later.
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, leave)
    ctl = Systemctl(ns.scope)
    fd = take_turn(ns, ctl)
    if fd < 0:
        return 1
    termed: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: termed.append(signum))
    return asyncio.run(serve(ns, listener, fd, ctl, termed=bool(termed)))


if __name__ == "__main__":
    sys.exit(main())
