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

from unitgen.inunit.httpframes import RequestGuard
from unitgen.inunit.peer import foreign_peer
from unitgen.inunit.poolmember import PoolKeeper, on_yield
from unitgen.inunit.relay import open_unix
from unitgen.inunit.swapctl import Systemctl, log, notify, uid_of
from unitgen.inunit.swapdrain import Conn, DrainLedger, DrainPolicy
from unitgen.timespan import format_seconds

__all__ = ["Forwarder", "forward"]


class Forwarder:
    """Forwards accepted connections to the private endpoint; drains on request."""

    def __init__(self, ns: argparse.Namespace, listener: socket.socket, ctl: Systemctl,
                 policy: DrainPolicy | None = None) -> None:
        self.ns = ns
        self.listener = listener
        self.ctl = ctl
        self.conns: dict[asyncio.Task[None], Conn] = {}
        self.ledger = DrainLedger(policy or DrainPolicy())
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()  # the server is up: forward; cleared while it restarts
        self.ready.set()  # the turn was taken: systemctl start returned with it ready
        self.failed = False
        self.last_activity = time.monotonic()
        self.server_uid: int | None = None  # the running server's uid (peer check)
        self.server_pid = 0  # the running server's main pid (a pool member puts it to sleep)
        # a GPU pool member's: its runtime kept, the sleep paths refused
        self.pool = PoolKeeper(ns) if ns.pool else None

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
            self.server_uid = uid_of(state)
            self.server_pid = pid
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
            notify(f"server exited; waiting for its restart ({self.ns.what})")

    async def _expected_uid(self) -> int | None:
        if self.server_uid is None:
            state = await self._server_state()
            active = state.get("ActiveState") == "active" and int(state.get("MainPID") or 0)
            self.server_uid = uid_of(state) if active else None
        return self.server_uid

    async def connect_backend(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the server. One whose other end the server's uid did not
        create (a process that bound the loopback port while the server restarts;
        a socket a link in the server's runtime directory points to: this proxy
        is root) is closed before a byte of the client's goes to it."""
        target: str = self.ns.target
        deadline = time.monotonic() + self.ns.connect_timeout
        while True:
            try:
                if target.startswith("/"):
                    reader, writer = await open_unix(target)  # never through a link
                else:
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
                       else None if target.startswith("/") and self.ns.any_uid
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
            guard = self.pool.guard() if self.pool is not None else None
            await asyncio.gather(self.up(cr, bw, conn, guard, cw), self.down(br, cw, conn))
        finally:
            for w in writers:
                w.close()
            if len(writers) < 2:  # closed by the drain before its stream was opened
                client.close()
            self.last_activity = time.monotonic()
            if self.pool is not None:  # (a finished task leaves conns a moment later)
                self.pool.used(sum(not t.done() for t in self.conns) - 1)

    async def up(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, conn: Conn,
                 guard: RequestGuard | None = None,
                 client: asyncio.StreamWriter | None = None) -> None:
        """Client to server (through ``guard``, when there is one)."""
        try:
            while data := await r.read(65536):
                if guard is not None and client is not None:
                    data, refused = guard.feed(data)
                    if refused:
                        await self._refuse(data, w, conn, client)
                        return
                conn.saw_request(data, time.monotonic())
                w.write(data)
                await w.drain()
            if w.can_write_eof():
                w.write_eof()
        except OSError:
            w.close()

    async def _refuse(self, data: bytes, w: asyncio.StreamWriter, conn: Conn,
                      client: asyncio.StreamWriter) -> None:
        """A request the public port does not take: what came before it goes on;
        it gets 404 when nothing is still being answered, else the connection ends."""
        conn.saw_request(data, time.monotonic())
        w.write(data)
        await w.drain()
        log("refused a request for one of the server's own endpoints (sleep, wake) "
            "on the public port")
        if conn.requests.completed == conn.answered:
            body = b'{"detail":"Not Found"}'
            client.write(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            with contextlib.suppress(OSError):
                await client.drain()
        client.close()
        w.close()

    async def down(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, conn: Conn) -> None:
        """Server to client; while draining, ask the client to close after each
        answer, and close a kept-alive connection once it is between requests."""
        try:
            while data := await r.read(65536):
                out, done = conn.frames.feed(data, close=self.ledger.started)
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
        self.ledger.join(conn, time.monotonic())
        task = asyncio.get_running_loop().create_task(self.handle(client, conn))
        self.conns[task] = conn
        if self.pool is not None:
            self.pool.used(sum(not t.done() for t in self.conns))
        task.add_done_callback(lambda t: self.conns.pop(t, None))

    async def drain(self) -> None:
        """From now on answers carry ``Connection: close``; a connection that is
        not being answered is closed by the rules of :class:`DrainPolicy`
        (:meth:`Conn.close_reason`), so only answers in progress hold the turn."""
        self.ledger.begin(self.conns.values(), time.monotonic())
        while self.conns:
            for task in self.ledger.due(self.conns, time.monotonic()):
                task.cancel()
            await asyncio.sleep(0.1)

    async def accept_loop(self) -> None:
        """Accept while serving. Never ``loop.sock_accept``: cancelled (the drain
        begins) just as a connection came, it accepts that connection and then
        drops it (CPython 3.11: InvalidStateError in its callback, the client
        reset; seen under alternating load). Accepting happens between awaits
        here, so a cancel never falls inside one."""
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(self.listener.fileno(), readable.set)
        try:
            while not self.stopping.is_set():
                while len(self.conns) >= self.ns.connections_max:
                    await asyncio.sleep(0.05)
                await self.ready.wait()
                await readable.wait()
                readable.clear()
                if self.sweep(self.ns.connections_max - len(self.conns)):
                    self.last_activity = time.monotonic()
        finally:
            loop.remove_reader(self.listener.fileno())

    def sweep(self, most: int = 1 << 30) -> int:
        """Accept what already waits in the socket's queue (non-blocking), at
        most ``most`` connections."""
        taken = 0
        while taken < most:
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return taken
            except OSError:
                return taken
            self.start(client)
            taken += 1
        return taken

    async def idle_watch(self) -> None:
        idle = self.ns.exit_idle_time
        while not self.stopping.is_set():
            await asyncio.sleep(min(1.0, idle / 4))
            if not self.conns and time.monotonic() - self.last_activity >= idle:
                log(f"idle for {format_seconds(idle)}: exiting (the server unloads)")
                self.stopping.set()
                return


async def _release_when_active(ctl: Systemctl, unit: str, lock_fds: list[int]) -> None:
    """Hold the turn until our unit is active (a minute at most): the connections
    queued for it are ours, not the next member's. Then close the group's lock
    (a pool member's: its GPUs')."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        proc = await asyncio.create_subprocess_exec(
            *ctl.base, "show", "-pActiveState", "--value", unit,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
        if out.decode().strip() != "activating":
            break
        await asyncio.sleep(0.05)
    for fd in lock_fds:
        os.close(fd)


async def _finish(fw: Forwarder, swept: int) -> None:
    """Let the connections left finish, for ``--drain`` at most, then close the
    rest; the journal says how it went (``swept``: taken from the queue)."""
    if not fw.conns:
        return
    bound = fw.ns.drain
    t0 = time.monotonic()
    notify(f"draining {len(fw.conns)} connection(s) (at most {format_seconds(bound)})")
    log(f"draining {len(fw.conns)} connection(s) ({swept} taken from the queue), "
        f"at most {format_seconds(bound)}")
    _, pending = await asyncio.wait(set(fw.conns), timeout=bound)
    closed = fw.ledger.summary()
    if pending:
        log(f"drain bound {format_seconds(bound)} reached: closing {len(pending)} "
            "connection(s)" + (f" ({closed} earlier)" if closed else ""))
        for task in pending:
            task.cancel()
    else:
        log(f"drained in {time.monotonic() - t0:.2f} s" + (f" ({closed})" if closed else ""))


async def _serve(ns: argparse.Namespace, listener: socket.socket, lock_fds: list[int],
                ctl: Systemctl, *, termed: list[int], wake: bool) -> int:
    """Forward until SIGTERM (drain) or idle exit. A GPU pool member asked to
    yield by sleeping (SIGUSR1) or by stopping its server (SIGUSR2) drains the
    same way, does so and stays: its next request takes a turn again in this
    process (:meth:`unitgen.inunit.poolmember.PoolKeeper.asleep`)."""
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    term, yielding = asyncio.Event(), asyncio.Event()
    how: list[str] = []  # how the member was asked to yield: "sleep" or "stop"
    loop.add_signal_handler(signal.SIGTERM, term.set)
    loop.add_signal_handler(signal.SIGINT, term.set)
    if ns.pool:
        on_yield(loop, how, yielding)
    if termed:  # SIGTERM came before the loop's own handler was in place
        term.set()
    uid = None
    while True:
        fw = Forwarder(ns, listener, ctl)
        fw.server_uid = uid  # its server's uid as last seen (asked again on a mismatch)
        if fw.pool is not None and wake:
            await fw.pool.wake(fw)
        left = await _turn(fw, lock_fds, term, yielding, how)
        if not left:
            return 1 if fw.failed else 0
        uid = fw.server_uid
        assert fw.pool is not None  # noqa: S101 - only a pool member stays
        yielding.clear()
        how.clear()
        taken = await fw.pool.asleep(fw, term, stopped=left == "stopped")
        if taken is None:
            return 0
        lock_fds, wake = taken


async def _turn(fw: Forwarder, lock_fds: list[int], term: asyncio.Event,
                yielding: asyncio.Event, how: list[str]) -> str:
    """Serve until asked to stop, to yield or idle; drain. A pool member that
    yielded stays: "asleep" or "stopped" (its server; the listener stays ours)."""
    ns, ctl, loop = fw.ns, fw.ctl, asyncio.get_running_loop()
    accepting = loop.create_task(fw.accept_loop())
    watching = loop.create_task(fw.watch_server())
    watchers: list[asyncio.Task[object]] = [loop.create_task(term.wait()),
                                            loop.create_task(yielding.wait())]
    if ns.exit_idle_time:
        watchers.append(loop.create_task(fw.idle_watch()))
    notify(f"serving ({ns.what})")
    releasing = loop.create_task(_release_when_active(ctl, f"{ns.name}.service", lock_fds))
    await asyncio.wait([*watchers, loop.create_task(fw.stopping.wait())],
                       return_when=asyncio.FIRST_COMPLETED)
    stays = yielding.is_set() and not term.is_set() and not fw.failed
    fw.stopping.set()
    accepting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await accepting
    swept = fw.sweep() if term.is_set() or stays else 0
    closing = loop.create_task(fw.drain())
    if not stays:
        # Only our copy of the socket closes: the socket unit keeps listening.
        fw.listener.close()
    await _finish(fw, swept)
    left = ""
    if fw.pool is not None and (term.is_set() or stays):
        left = await fw.pool.leave(fw, how=how[0] if stays else "")
    elif not term.is_set():
        # idle (or the server is gone): unload the model; a stop job of this
        # unit does that itself (PartOf=), and must not be waited for from here
        ctl.run("stop", "--no-block", f"{ns.name}-backend.service")
    closing.cancel()
    if not releasing.done():
        releasing.cancel()
        for fd in lock_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    watching.cancel()
    for w in watchers:
        w.cancel()
    return left


def forward(ns: argparse.Namespace, listener: socket.socket, lock_fds: list[int],
            ctl: Systemctl, *, termed: list[int], wake: bool = False) -> int:
    """Forward until SIGTERM (then drain) or idle; the exit code of the proxy.
    ``wake``: a GPU pool member's server is asleep: wake it first."""
    return asyncio.run(_serve(ns, listener, lock_fds, ctl, termed=termed, wake=wake))
