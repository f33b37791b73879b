"""The forwarding half's part in a GPU pool (issue 27): what a pool member's
proxy does beyond a swap group member's, once its turn is taken.

* it keeps its member's runtime (:class:`unitgen.inunit.poolstate.Runtime`):
  when it was last used and how many connections it serves, which the other
  members' decisions weigh (idle before busy, least recently used first);
* it wakes its server when the turn found it asleep, and puts it to sleep when
  it yields and another member asked for that (``<name>.yield``), each with one
  request over the forwarder's own connection to the private endpoint (the peer
  checks of every connection to the server apply);
* it refuses the server's sleep endpoints on the public port
  (:class:`unitgen.inunit.httpframes.RequestGuard`).

asyncio, standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from pathlib import Path
from typing import Protocol

from unitgen.inunit.httpframes import RequestGuard
from unitgen.inunit.poolfile import Call, PoolFile, request_bytes, status_of
from unitgen.inunit.poolstate import read_runtime, write_runtime, yield_path
from unitgen.inunit.swapctl import Systemctl, log, notify

__all__ = ["PoolKeeper"]

# The runtime is written when a member turns busy or idle, and otherwise at most
# this often: the order "least recently used" needs no finer clock.
WRITE_EVERY = 1.0


class Server(Protocol):
    """What the keeper needs of the forwarder."""

    ctl: Systemctl
    server_pid: int  # the running server's main pid

    async def connect_backend(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


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

    async def leave(self, server: Server) -> None:
        """It yielded and its requests are drained: if the member that needs the
        room asked for it, put the server to sleep (its process stays); if it
        cannot sleep, stop it, since the room was promised."""
        self.rt.in_flight = 0
        asked = yield_path(self.state, self.ns.name)
        try:
            wish = asked.read_text(encoding="utf-8").strip()
            asked.unlink()
        except OSError:
            wish = ""
        if wish == "sleep" and self.file.sleep is not None:
            status = await self._call(server, self.file.sleep, 60.0)
            # (what it holds in host RAM asleep is read by whoever weighs it next)
            if status == 200 and server.server_pid:
                self.rt.asleep_pid = server.server_pid
                log(f"asleep (pid {self.rt.asleep_pid} keeps its process; its GPU memory "
                    "is released)")
            else:
                log(f"the server did not go to sleep (status {status}): stopping it")
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(server.ctl.run, "stop", "--no-block",
                                            f"{self.ns.name}-backend.service")
        write_runtime(self.state, self.ns.name, self.rt)
