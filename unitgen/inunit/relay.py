"""The proxy of a server that runs in a container and listens on a Unix socket:
what ``systemd-socket-proxyd`` does for a server on the host, but it never
follows a link to get there.

A container's server is root on the host (rootful podman, no user namespace),
and the directory of its socket is bound into the container read-write. So the
server can put a link to any socket of the host (the system bus, systemd's
private socket, podman's API) in place of its own, and ``systemd-socket-proxyd``
(root too) would connect there for every client of the public port. Neither
running the proxy as the server's uid (root) nor checking that uid
(``SO_PEERCRED``) tells the two apart; what does is where the socket *is*: this
proxy opens the path without following a link and connects to that socket file
only (:func:`unitgen.inunit.peer.connect_unix`), for every connection.

Takes the public socket from systemd (fd 3) and the same options as
``systemd-socket-proxyd`` that unitgen uses:

    python -I -m unitgen.inunit.relay --connections-max=1024 [--exit-idle-time=5min] PATH

Standard library only (it runs inside the unit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
import time

from unitgen.inunit.passed import passed_listener
from unitgen.inunit.peer import no_follow_path
from unitgen.timespan import format_seconds, parse_timespan

__all__ = ["Relay", "main", "open_unix"]

CHUNK = 65536


def _log(line: str) -> None:
    print(f"unitgen relay: {line}", file=sys.stderr, flush=True)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then pass the EOF on (the other direction may go on)."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def open_unix(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream to the Unix socket at ``path``, never through a link (see
    :func:`unitgen.inunit.peer.no_follow_path`)."""
    fd, name = no_follow_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, name)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(fd)
    return await asyncio.open_unix_connection(sock=sock)


class Relay:
    """Accepts on the public socket and joins each connection to the server's."""

    def __init__(self, listener: socket.socket, target: str, connections_max: int,
                 exit_idle: float) -> None:
        self.listener = listener
        self.target = target
        self.connections_max = connections_max
        self.exit_idle = exit_idle
        self.open = 0
        self.last_activity = time.monotonic()

    async def handle(self, client: socket.socket) -> None:
        self.open += 1
        writers: list[asyncio.StreamWriter] = []
        try:
            try:
                server_r, server_w = await open_unix(self.target)
            except OSError as exc:
                # as systemd-socket-proxyd: the client is closed, nothing forwarded
                _log(f"cannot reach the server at {self.target}: {exc.strerror or exc}")
                client.close()
                return
            writers.append(server_w)
            client_r, client_w = await asyncio.open_connection(sock=client)
            writers.append(client_w)
            await asyncio.gather(_pump(client_r, server_w), _pump(server_r, client_w))
        finally:
            for w in writers:
                w.close()
            if len(writers) < 2:
                client.close()
            self.open -= 1
            self.last_activity = time.monotonic()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self.listener.setblocking(False)
        tasks: set[asyncio.Task[None]] = set()
        idle = loop.create_task(self._idle()) if self.exit_idle else None
        accepting = loop.create_task(self._accept(tasks))
        waiting = [accepting, *([idle] if idle else [])]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for task in waiting:
            task.cancel()

    async def _accept(self, tasks: set[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.open >= self.connections_max:
                await asyncio.sleep(0.05)
            client, _ = await loop.sock_accept(self.listener)
            client.setblocking(False)
            self.last_activity = time.monotonic()
            task = loop.create_task(self.handle(client))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _idle(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.exit_idle / 4))
            if not self.open and time.monotonic() - self.last_activity >= self.exit_idle:
                _log(f"idle for {format_seconds(self.exit_idle)}: exiting")
                return


def main(argv: list[str] | None = None) -> int:
    """Entry point: serve the socket systemd passed until idle (or stopped)."""
    p = argparse.ArgumentParser(prog="python -m unitgen.inunit.relay",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--connections-max", type=int, default=256)
    p.add_argument("--exit-idle-time", default="", help="exit after this long without connections")
    p.add_argument("target", help="the server's Unix socket")
    ns = p.parse_args(argv)
    try:
        idle = parse_timespan(ns.exit_idle_time) if ns.exit_idle_time else 0.0
    except ValueError as exc:
        _log(str(exc))
        return 2
    listener = passed_listener()
    if listener is None:
        _log("no socket passed in (start it through its .socket unit)")
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Relay(listener, ns.target, ns.connections_max, idle).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
