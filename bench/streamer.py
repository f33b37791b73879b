#!/usr/bin/env python3
"""An LLM-shaped stand-in: every request other than ``/health`` waits ~20 ms
("prompt processing"), then streams 256 small server-sent-event chunks, one per
tick of a shared 1 ms clock ("tokens"), in HTTP/1.1 chunked encoding, keep-alive.

One asyncio loop, one timer for all streams, so the server itself stays cheap
and the figure is about the path between client and server. Started the way
llama-server is (``--host PATH.sock``): it listens on that Unix socket (what
unitgen's proxy forwards to) and on ``127.0.0.1:$BENCH_DIRECT_PORT`` (the
baseline). Standard library only.

Environment: BENCH_DIRECT_PORT (required), BENCH_FIRST_MS (20),
BENCH_CHUNKS (256), BENCH_TICK_MS (1).
"""

from __future__ import annotations

import asyncio
import os
import sys

FIRST = float(os.environ.get("BENCH_FIRST_MS", "20")) / 1000
CHUNKS = int(os.environ.get("BENCH_CHUNKS", "256"))
TICK = float(os.environ.get("BENCH_TICK_MS", "1")) / 1000

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n")
HEALTH = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
          b"Content-Length: 15\r\n\r\n{\"status\":\"ok\"}")


def chunk(i: int) -> bytes:
    """One token event, chunk-encoded."""
    data = b'data: {"t":%d}\n\n' % i
    return b"%x\r\n%s\r\n" % (len(data), data)


TOKENS = [chunk(i) for i in range(CHUNKS)]
LAST = b"0\r\n\r\n"


class Clock:
    """One timer for every active stream: each tick sends each stream its next token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.streams: dict[Conn, int] = {}
        self.handle: asyncio.TimerHandle | None = None
        self.next_at = 0.0

    def add(self, conn: Conn) -> None:
        conn.transport.write(HEAD)
        self.streams[conn] = 0
        if self.handle is None:
            self.next_at = self.loop.time()
            self.tick()

    def drop(self, conn: Conn) -> None:
        self.streams.pop(conn, None)

    def tick(self) -> None:
        done = []
        for conn, i in self.streams.items():
            if conn.transport.is_closing():
                done.append(conn)
                continue
            if i + 1 == CHUNKS:
                conn.transport.write(TOKENS[i] + LAST)
                done.append(conn)
            else:
                conn.transport.write(TOKENS[i])
                self.streams[conn] = i + 1
        for conn in done:
            del self.streams[conn]
            conn.finished()
        if self.streams:
            self.next_at = max(self.loop.time(), self.next_at + TICK)
            self.handle = self.loop.call_at(self.next_at, self.tick)
        else:
            self.handle = None


class Conn(asyncio.Protocol):
    """One client connection: requests are served one after another (keep-alive)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.buf = b""
        self.busy = False
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.clock.drop(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.next_request()

    def next_request(self) -> None:
        if self.busy:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        length = content_length(self.buf[:end])
        if len(self.buf) < end + 4 + length:
            return  # the body is still arriving (a POST through the gateway)
        head, self.buf = self.buf[:end], self.buf[end + 4 + length:]
        path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
        if path == b"/health":
            self.transport.write(HEALTH)
            self.next_request()
            return
        self.busy = True
        self.clock.loop.call_later(FIRST, self.clock.add, self)

    def finished(self) -> None:
        self.busy = False
        self.next_request()


def content_length(head: bytes) -> int:
    """The request's Content-Length (0 without one): its body is read and ignored."""
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            return int(value.strip() or b"0")
    return 0


def host_arg(argv: list[str]) -> str | None:
    """The value of ``--host`` (a Unix socket path when unitgen deploys it)."""
    for i, word in enumerate(argv):
        if word == "--host" and i + 1 < len(argv):
            return argv[i + 1]
    return None


async def serve(sock: str | None, port: int) -> None:
    """Listen on the Unix socket and the loopback port until stopped."""
    loop = asyncio.get_running_loop()
    clock = Clock(loop)
    servers = [await loop.create_server(lambda: Conn(clock), "127.0.0.1", port, backlog=4096)]
    if sock:
        if os.path.exists(sock):
            os.unlink(sock)
        servers.append(await loop.create_unix_server(lambda: Conn(clock), sock, backlog=4096))
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    """Entry point (argv like llama-server's; only --host matters)."""
    asyncio.run(serve(host_arg(sys.argv[1:]), int(os.environ["BENCH_DIRECT_PORT"])))


if __name__ == "__main__":
    main()
