"""The forwarding half's part in a GPU pool (issue 27): what a pool member's
proxy does beyond a swap group member's, once its turn is taken.

* it keeps its member's runtime (:class:`unitgen.inunit.poolstate.Runtime`):
  when it was last used and how many connections it serves, which the other
  members' decisions weigh (idle before busy, least recently used first);
* it wakes its server when the turn found it asleep; asked to sleep (SIGUSR1
  from the member that needs the room), it drains, puts its server to sleep
  and stays: the next request for it takes a turn from here (no process to
  start), or idle past ``idle_stop`` it stops its server. Each call is one
  request over the forwarder's own connection to the private endpoint (the
  peer checks of every connection to the server apply);
* it refuses the server's sleep endpoints on the public port
  (:class:`unitgen.inunit.httpframes.RequestGuard`).

asyncio, standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from unitgen.inunit.httpframes import RequestGuard
from unitgen.inunit.poolfile import Call, PoolFile, request_bytes, status_of
from unitgen.inunit.poolstate import read_runtime, write_runtime
from unitgen.inunit.swapctl import Systemctl, log, notify

if TYPE_CHECKING:
    from unitgen.inunit.poolturn import Locks

__all__ = ["PoolKeeper", "on_yield", "refuse_queued"]

# A proxy whose server was stopped to make room stays for its next request, at
# most this long without one (then the socket starts a new one when one comes).
LINGER = 600.0
# The runtime is written when a member turns busy or idle, and otherwise at most
# this often: the order "least recently used" needs no finer clock.
WRITE_EVERY = 1.0


class Server(Protocol):
    """What the keeper needs of the forwarder to call its server."""

    ctl: Systemctl
    server_pid: int  # the running server's main pid

    async def connect_backend(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


class Listening(Protocol):
    """What the keeper needs of the forwarder while its member sleeps."""

    ctl: Systemctl
    listener: socket.socket


class PoolKeeper:
    """One pool member's runtime and calls, for its forwarder."""

    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns
        self.state = Path(ns.state)
        self.file = PoolFile.read(Path(ns.pool))
        self.rt = read_runtime(self.state, ns.name)
        self.written = 0.0

    def guard(self) -> RequestGuard | None:
        """A guard for one client connection (None: no path to refuse)."""
        return RequestGuard(self.file.refused) if self.file.refused else None

    def used(self, in_flight: int) -> None:
        """Its connections changed: it is in use now."""
        now = time.time()
        turned = (in_flight == 0) != (self.rt.in_flight == 0)
        self.rt.in_flight, self.rt.last_used = in_flight, now
        if turned or now - self.written >= WRITE_EVERY:
            self.written = now
            write_runtime(self.state, self.ns.name, self.rt)

    async def _call(self, server: Server, c: Call, timeout: float) -> int:
        try:
            reader, writer = await server.connect_backend()
        except (OSError, TimeoutError) as exc:
            log(f"{c[0]} {c[1]}: cannot reach the server: {exc!r}")
            return 0
        try:
            writer.write(request_bytes(c))
            await writer.drain()
            return status_of(await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout))
        except (OSError, TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            log(f"{c[0]} {c[1]}: no answer from the server: {exc!r}")
            return 0
        finally:
            writer.close()

    async def wake(self, server: Server) -> None:
        """The turn found its server asleep: wake it before the first connection
        is taken; a server that does not wake is started again (a full load)."""
        t0 = time.monotonic()
        notify("GPU pool: waking")
        status = await self._call(server, self.file.wake, self.file.me.terms.load_timeout) \
            if self.file.wake else 0
        if status != 200:
            log(f"the server did not wake (status {status}): starting it again")
            done = await asyncio.to_thread(server.ctl.run, "restart",
                                           f"{self.ns.name}-backend.service")
            if done.returncode != 0:
                log(f"{self.ns.name}-backend.service did not start: {done.stderr.strip()}")
        else:
            self.rt.wake_seconds = time.monotonic() - t0
            log(f"woken in {self.rt.wake_seconds:.2f} s")
        self.rt.asleep_pid, self.rt.loaded_at = 0, time.time()
        write_runtime(self.state, self.ns.name, self.rt)

    async def leave(self, server: Server, *, how: str) -> str:
        """Its requests are drained; ``how`` it was asked to yield ("sleep",
        "stop"; "": it is stopped itself). Returns where its server is now
        ("asleep", "stopped"; "" when the proxy exits). A server that cannot
        sleep is stopped: the room was promised."""
        self.rt.in_flight = 0
        left = ""
        if how == "sleep" and self.file.sleep is not None:
            status = await self._call(server, self.file.sleep, 60.0)
            # (what it holds in host RAM asleep is read by whoever weighs it next)
            if status == 200 and server.server_pid:
                self.rt.asleep_pid, left = server.server_pid, "asleep"
                log(f"asleep (pid {self.rt.asleep_pid} keeps its process; its GPU memory "
                    "is released)")
            else:
                log(f"the server did not go to sleep (status {status}): stopping it")
        if how and not left:
            unit = f"{self.ns.name}-backend.service"
            done = await asyncio.to_thread(server.ctl.run, "stop", unit)
            left = "stopped" if done.returncode == 0 else ""
            self.rt.asleep_pid, self.rt.stopped_at = 0, time.time()
        write_runtime(self.state, self.ns.name, self.rt)
        return left

    async def asleep(self, server: Listening, term: asyncio.Event, *,
                     stopped: bool) -> tuple[list[int], bool] | None:
        """It yielded (its server asleep, or ``stopped``): wait for a request (it
        stays in the socket's queue), then take a turn (the policy's code, in a
        thread) and return its locks and whether to wake. None: the proxy exits
        (SIGTERM; idle past its idle_stop, which stops a sleeping server; a
        stopped one's after :data:`LINGER` at most; or it cannot run now, and
        the queued requests were told)."""
        notify(f"{'stopped' if stopped else 'asleep'}: its GPU memory is released; a request "
               f"brings it back ({self.ns.what})")
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(server.listener.fileno(), readable.set)
        idle = self.file.me.terms.idle_stop
        if stopped:
            idle = LINGER if idle is None else min(idle, LINGER)
        left = None if idle is None else max(0.0, self.rt.last_used + idle - time.time())
        try:
            waits = [loop.create_task(term.wait()), loop.create_task(readable.wait())]
            await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        finally:
            loop.remove_reader(server.listener.fileno())
        if term.is_set():
            return None
        if not readable.is_set():
            if not stopped:
                log(f"asleep and idle for {idle:g} s (idle_stop): stopping the server")
                await asyncio.to_thread(server.ctl.run, "stop", "--no-block",
                                        f"{self.ns.name}-backend.service")
            return None
        taken = await _in_thread(self.ns, server.ctl, term)
        if taken is None:
            return None
        if isinstance(taken, str):
            log(f"cannot run: {taken}")
            notify(f"cannot run: {taken}")
            refuse_queued(server.listener, taken)
            return None
        locks, wake = taken
        return list(locks.fds.values()), wake


def on_yield(loop: asyncio.AbstractEventLoop, how: list[str], yielding: asyncio.Event) -> None:
    """How another member asks this one to make room: SIGUSR1, sleep; SIGUSR2,
    stop its server (``how`` gets the word, ``yielding`` is set)."""
    def asked(word: str) -> None:
        how.append(word)
        yielding.set()

    loop.add_signal_handler(signal.SIGUSR1, asked, "sleep")
    loop.add_signal_handler(signal.SIGUSR2, asked, "stop")


async def _in_thread(ns: argparse.Namespace, ctl: Systemctl,
                     term: asyncio.Event) -> tuple[Locks, bool] | str | None:
    """:func:`take_pool_turn` in a daemon thread (it waits for locks and drains);
    None when SIGTERM comes first (the process ends, and its locks with it)."""
    from unitgen.inunit.poolturn import take_pool_turn  # noqa: PLC0415 - imported by now

    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[Locks, bool] | str] = loop.create_future()

    def settle(result: tuple[Locks, bool] | str) -> None:
        if not done.done():
            done.set_result(result)

    def run() -> None:
        result = take_pool_turn(ns, ctl)
        loop.call_soon_threadsafe(settle, result)

    threading.Thread(target=run, daemon=True).start()
    stop = loop.create_task(term.wait())
    await asyncio.wait([done, stop], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
    stop.cancel()
    return done.result() if done.done() else None


def refuse_queued(listener: socket.socket, why: str) -> int:
    """A GPU pool member that cannot run now answers the requests queued for it
    (503, with the reason) instead of leaving them in its socket, where each
    would start another attempt until its client gives up."""
    body = json.dumps({"error": {"message": f"cannot run now: {why}",
                                 "type": "unavailable"}}).encode()
    answer = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    listener.setblocking(False)
    answered = 0
    while True:
        try:
            client, _ = listener.accept()
        except OSError:
            return answered
        with client, contextlib.suppress(OSError):
            client.settimeout(0.5)
            client.recv(65536)  # its request: unread bytes would make the close a reset
            client.sendall(answer)
            client.shutdown(socket.SHUT_WR)
            while client.recv(65536):  # until it has read the answer and closed
                pass
        answered += 1
