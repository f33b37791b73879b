"""The forwarding half of a swap-group member's proxy: :mod:`unitgen.inunit.swapproxy`
takes the turn, then calls :func:`forward`. It imports nothing of the proxy's
entry point (what both use is :mod:`unitgen.inunit.swapctl`), so the entry point
can import it in a thread while the turn is taken. asyncio, standard library
only."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass

from unitgen.inunit.httpframes import RequestFrames, ResponseFrames
from unitgen.inunit.peer import foreign_peer
from unitgen.inunit.swapctl import Systemctl, log, notify
from unitgen.timespan import format_seconds

__all__ = ["DrainPolicy", "forward"]


@dataclass(frozen=True)
class DrainPolicy:
    """How long a connection that is not being answered may keep a draining
    member loaded. Only ``swap_drain`` bounds a request that is being answered;
    these bound the connections that hold the turn without one (security review
    item 9: one silent TCP connection held every swap for the whole drain).

    ``grace``: a connection with no request in progress and none to answer (it
    sent nothing yet, or it is kept alive after its answers) is closed after
    this long. 1 s: a client that connected just before the drain has its
    request on the wire within a round trip, and a segment lost on the way is
    sent again after Linux's first retransmission timeout (200 ms to 1 s); a
    swap pays at most this much for such a connection.

    ``stall``: a request head or body that is still coming is closed when no
    byte of it came for this long, and a head that is not complete this long
    after the drain began (or after its first byte, if later) is closed
    however it trickles: a head is a few hundred bytes that a real client
    writes at once, so a head that takes seconds is a slowloris. 5 s: gaps
    between the segments of a live upload are retransmission timeouts, which
    double after each loss from at least 200 ms; 5 s covers four losses in a
    row on a LAN (0.2 + 0.4 + 0.8 + 1.6 s) or three at a 0.5 s timeout
    (0.5 + 1 + 2 s), and still ends a swap in seconds, not after
    ``swap_drain`` (3 min by default).

    ``min_rate``: a body must keep coming at this many bytes per second on
    average, counted from the drain's start (or its own, if later), after
    ``stall`` seconds; without it one byte every ``stall`` seconds would hold
    the drain. 500: Apache's mod_reqtimeout ``MinRate``; 4 kbit/s, which any
    working upload beats."""

    grace: float = 1.0
    stall: float = 5.0
    min_rate: float = 500.0


# Why a connection was closed during a drain, as the journal line says it.
SENT_NOTHING = "sent nothing"
KEPT_ALIVE = "were kept alive after their answers"
STALLED = "stalled or trickled a request"
MALFORMED = "sent what is not an HTTP/1.x request and went quiet"
SERVER_CLOSED = "their client left open after the server closed"


def _uid_of(state: dict[str, str]) -> int:
    """The uid the server runs as: systemd's ``UID`` of its unit (a dynamic user's
    too), or, where the unit sets none, the manager's own (root, or the user)."""
    uid = state.get("UID", "")
    return int(uid) if uid.isdigit() else os.getuid()


class Conn:
    """One client connection: where its requests and answers stand."""

    def __init__(self, sock: socket.socket | None = None, now: float = 0.0) -> None:
        self.sock = sock
        self.frames = ResponseFrames()
        self.requests = RequestFrames()
        self.accepted_at = now
        self.last_up = 0.0  # last client byte
        self.last_byte = now  # last byte either way
        self.answered = 0
        self.answered_at = 0.0
        # nothing more comes from the server: it closed (its EOF was passed on),
        # or forwarding to the client failed
        self.server_closed_at = 0.0
        self.closing = ""  # why the drain closes it, once it does
        # the current request head or body, or the drain, whichever began last
        self.window_at = now
        self.window_got = 0

    def saw_request(self, data: bytes, now: float) -> None:
        """Client bytes, as they are forwarded."""
        parts = self.requests.parts
        for method in self.requests.feed(data):
            self.frames.expect(method)
        if self.requests.parts != parts:
            self.window_at, self.window_got = now, 0
        else:
            self.window_got += len(data)
        self.last_up = self.last_byte = now

    def saw_answer(self, done: int, now: float) -> None:
        """Server bytes forwarded; ``done`` responses ended in them."""
        if done:
            self.answered += done
            self.answered_at = now
        self.last_byte = now

    def begin_drain(self, now: float) -> None:
        """The drain began: rates and deadlines are counted from here."""
        self.window_at, self.window_got = now, 0

    def _bytes_waiting(self) -> bool:
        """The client sent bytes the proxy has not read yet (it reads nothing
        before the server's endpoint answers a connect)."""
        if self.sock is None:
            return False
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing to read, or the socket is gone
            return False

    def close_reason(self, now: float, drain_at: float, policy: DrainPolicy) -> str:
        """Why this connection should be closed now that the drain began at
        ``drain_at``; "" while it may still get or finish an answer."""
        if self.server_closed_at:
            # nothing more can be answered on it; the grace lets the client read
            # what is left and close it itself
            return SERVER_CLOSED if now - self.server_closed_at >= policy.grace else ""
        if self.frames.lost:
            return ""  # its answers cannot be followed: only swap_drain ends it
        if self.requests.lost:
            # not requests we can delimit (real clients send none): judged by
            # silence in both directions
            return MALFORMED if now - max(self.last_byte, drain_at) >= policy.stall else ""
        phase = self.requests.phase
        if phase == "head":
            return STALLED if now - self.window_at >= policy.stall else ""
        if phase == "body":
            if now - max(self.last_up, drain_at) >= policy.stall:
                return STALLED
            if now - self.window_at >= policy.stall + self.window_got / policy.min_rate:
                return STALLED
            return ""
        if self.requests.completed > self.answered or not self.frames.between:
            return ""  # being answered: swap_drain bounds it
        if self.answered:
            # Kept alive after its answers: the grace counts from the last one,
            # even if that was before the drain. Servers close idle kept-alive
            # connections all the time and clients expect it (RFC 9112 section
            # 9.3.1); an SDK's pool keeps some open, so a grace from the drain's
            # start would add a second to most swaps.
            return KEPT_ALIVE if now - self.answered_at >= policy.grace else ""
        # Nothing sent yet (or empty lines): its first request may be on the
        # way, so the grace counts from the drain's start for a connection
        # accepted before it.
        if now - max(self.accepted_at, drain_at) >= policy.grace and not self._bytes_waiting():
            return SENT_NOTHING
        return ""


class Forwarder:
    """Forwards accepted connections to the private endpoint; drains on request."""

    def __init__(self, ns: argparse.Namespace, listener: socket.socket, ctl: Systemctl,
                 policy: DrainPolicy | None = None) -> None:
        self.ns = ns
        self.listener = listener
        self.ctl = ctl
        self.policy = policy or DrainPolicy()
        self.conns: dict[asyncio.Task[None], Conn] = {}
        self.draining = False
        self.drain_at = 0.0
        self.closed: Counter[str] = Counter()  # connections the drain closed, by reason
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()  # the server is up: forward; cleared while it restarts
        self.ready.set()  # the turn was taken: systemctl start returned with it ready
        self.failed = False
        self.last_activity = time.monotonic()
        self.server_uid: int | None = None  # the running server's uid (peer check)

    async def _server_state(self) -> dict[str, str]:
        proc = await asyncio.create_subprocess_exec(
            *self.ctl.base, "show", f"{self.ns.name}-backend.service", "-pActiveState",
            "-pMainPID", "-pUID", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
        return dict(line.partition("=")[::2] for line in out.decode().splitlines())

    async def watch_server(self) -> None:
        """While the server runs, forward; when its main process dies (a crash),
        hold new connections until systemd's Restart= has it ready again, as the
        socket does for a plain instance. No restart coming: exit with failure."""
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            state = await self._server_state()
            pid = int(state.get("MainPID") or 0)
            if state.get("ActiveState") != "active" or not pid:
                if state.get("ActiveState") in ("inactive", "failed"):
                    log(f"{self.ns.name}-backend.service is {state.get('ActiveState')} and "
                        "not restarting")
                    self.failed = True
                    self.stopping.set()
                    return
                await asyncio.sleep(0.1)
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            self.server_uid = _uid_of(state)
            self.ready.set()
            exited = asyncio.Event()
            loop.add_reader(pidfd, exited.set)
            try:
                await exited.wait()
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
            self.ready.clear()
            log(f"the server (pid {pid}) exited; holding new connections until it is back")
            notify(f"server exited; waiting for its restart (swap group {self.ns.group})")

    async def _expected_uid(self) -> int | None:
        if self.server_uid is None:
            state = await self._server_state()
            active = state.get("ActiveState") == "active" and int(state.get("MainPID") or 0)
            self.server_uid = _uid_of(state) if active else None
        return self.server_uid

    async def connect_backend(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the server. On a loopback port, one whose other end the
        server's uid did not create (a process that bound the port while the
        server restarts) is closed before a byte of the client's goes to it."""
        target: str = self.ns.target
        deadline = time.monotonic() + self.ns.connect_timeout
        while True:
            try:
                if target.startswith("/"):
                    return await asyncio.open_unix_connection(target)
                host, _, port = target.rpartition(":")
                reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            except (ConnectionRefusedError, FileNotFoundError):
                # The server is restarting (crash, Restart=): wait for it.
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.1)
                continue
            uid = await self._expected_uid()
            foreign = ("the server's uid is not known (it is not running)" if uid is None
                       else foreign_peer(writer.get_extra_info("socket"), uid))
            if not foreign:
                return reader, writer
            writer.close()
            self.server_uid = None  # ask again: the server may have been restarted
            log(f"not forwarding to {target}: {foreign}")
            if time.monotonic() >= deadline:
                raise ConnectionRefusedError(foreign)
            await asyncio.sleep(0.1)

    async def handle(self, client: socket.socket, conn: Conn) -> None:
        writers: list[asyncio.StreamWriter] = []
        try:
            try:
                await asyncio.wait_for(self.ready.wait(), self.ns.connect_timeout)
                br, bw = await self.connect_backend()
            except (OSError, TimeoutError) as exc:
                log(f"cannot reach the server at {self.ns.target}: {exc!r}")
                client.close()
                return
            writers.append(bw)
            cr, cw = await asyncio.open_connection(sock=client)
            writers.append(cw)
            await asyncio.gather(self.up(cr, bw, conn), self.down(br, cw, conn))
        finally:
            for w in writers:
                w.close()
            if len(writers) < 2:  # closed by the drain before its stream was opened
                client.close()
            self.last_activity = time.monotonic()

    async def up(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, conn: Conn) -> None:
        """Client to server."""
        try:
            while data := await r.read(65536):
                conn.saw_request(data, time.monotonic())
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
        except OSError:
            w.close()

    async def down(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, conn: Conn) -> None:
        """Server to client; while draining, ask the client to close after each
        answer, and close a kept-alive connection once it is between requests."""
        try:
            while data := await r.read(65536):
                out, done = conn.frames.feed(data, close=self.draining)
                conn.saw_answer(done, time.monotonic())
                w.write(out)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
        except OSError:
            w.close()
        conn.server_closed_at = time.monotonic()

    def start(self, client: socket.socket) -> None:
        client.setblocking(False)
        conn = Conn(client, time.monotonic())
        if self.draining:
            conn.begin_drain(time.monotonic())
        task = asyncio.get_running_loop().create_task(self.handle(client, conn))
        self.conns[task] = conn
        task.add_done_callback(lambda t: self.conns.pop(t, None))

    async def drain(self) -> None:
        """From now on answers carry ``Connection: close``; a connection that is
        not being answered is closed by the rules of :class:`DrainPolicy`
        (:meth:`Conn.close_reason`), so only answers in progress hold the turn."""
        self.draining = True
        self.drain_at = time.monotonic()
        for conn in self.conns.values():
            conn.begin_drain(self.drain_at)
        while self.conns:
            now = time.monotonic()
            for task, conn in list(self.conns.items()):
                if conn.closing:
                    continue
                conn.closing = conn.close_reason(now, self.drain_at, self.policy)
                if conn.closing:
                    self.closed[conn.closing] += 1
                    task.cancel()
            await asyncio.sleep(0.1)

    def closed_summary(self) -> str:
        """The connections the drain closed, for the journal ("" if none)."""
        return "; ".join(f"closed {n} connection(s) that {why}"
                         for why, n in sorted(self.closed.items()))

    async def accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            while len(self.conns) >= self.ns.connections_max:
                await asyncio.sleep(0.05)
            await self.ready.wait()
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


async def _serve(ns: argparse.Namespace, listener: socket.socket, lock_fd: int,
                ctl: Systemctl, *, termed: list[int]) -> int:
    """Forward until SIGTERM (drain) or idle exit."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    fw = Forwarder(ns, listener, ctl)
    term = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, term.set)
    loop.add_signal_handler(signal.SIGINT, term.set)
    if termed:  # SIGTERM came before the loop's own handler was in place
        term.set()
    accepting = loop.create_task(fw.accept_loop())
    watching = loop.create_task(fw.watch_server())
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
    closing = loop.create_task(fw.drain())
    # Only our copy of the socket closes: the socket unit keeps listening.
    listener.close()
    if fw.conns:
        t0 = time.monotonic()
        notify(f"draining {len(fw.conns)} connection(s) (at most {format_seconds(ns.drain)})")
        log(f"draining {len(fw.conns)} connection(s) ({swept} taken from the queue), "
            f"at most {format_seconds(ns.drain)}")
        _, pending = await asyncio.wait(set(fw.conns), timeout=ns.drain)
        closed = fw.closed_summary()
        if pending:
            log(f"drain bound {format_seconds(ns.drain)} reached: closing {len(pending)} "
                "connection(s)" + (f" ({closed} earlier)" if closed else ""))
            for task in pending:
                task.cancel()
        else:
            log(f"drained in {time.monotonic() - t0:.2f} s" + (f" ({closed})" if closed else ""))
    if not term.is_set():
        # idle (or the server is gone): unload the model; a stop job of this
        # unit does that itself (PartOf=), and must not be waited for from here
        ctl.run("stop", "--no-block", f"{ns.name}-backend.service")
    closing.cancel()
    releasing.cancel()
    watching.cancel()
    for w in watchers:
        w.cancel()
    return 1 if fw.failed else 0


def forward(ns: argparse.Namespace, listener: socket.socket, lock_fd: int, ctl: Systemctl,
            *, termed: list[int]) -> int:
    """Forward until SIGTERM (then drain) or idle; the exit code of the proxy."""
    return asyncio.run(_serve(ns, listener, lock_fd, ctl, termed=termed))
