"""The swap proxy's drain without a manager (security review item 9): which
connections it closes once another member wants the turn, and when. First the
rules on a made-up clock, then the forwarder itself between loopback sockets
and a small backend."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from dataclasses import dataclass

from unitgen.inunit.swapctl import Systemctl
from unitgen.inunit.swapdrain import (
    KEPT_ALIVE,
    MALFORMED,
    SENT_NOTHING,
    SERVER_CLOSED,
    STALLED,
    Conn,
    DrainLedger,
    DrainPolicy,
)
from unitgen.inunit.swapforward import Forwarder

POLICY = DrainPolicy()  # grace 1 s, stall 5 s, 500 bytes/s
GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
DRAIN = 100.0  # the drain begins at t = 100 on the made-up clock


def draining(conn: Conn) -> Conn:
    conn.begin_drain(DRAIN)
    return conn


def first_close(conn: Conn, sends: list[tuple[float, bytes]] | None = None,
                until: float = DRAIN + 600, step: float = 0.05) -> tuple[float, str]:
    """(time, reason) of the first moment close_reason says to close, checked
    every ``step`` from the drain's start while the client sends ``sends``
    ((time, bytes), in order); (inf, "") if never before ``until``."""
    todo = list(sends or [])
    k = 0
    while (t := DRAIN + k * step) < until:
        while todo and todo[0][0] <= t:
            conn.saw_request(todo[0][1], todo[0][0])
            todo.pop(0)
        reason = conn.close_reason(t + 1e-9, DRAIN, POLICY)  # (steps land on the bounds)
        if reason:
            return round(t, 2), reason
        k += 1
    return float("inf"), ""


def test_a_connection_that_sent_nothing_gets_the_grace_from_the_drain_start():
    # accepted long before the drain: not closed at once, but after the grace
    assert first_close(draining(Conn(now=10.0))) == (DRAIN + 1, SENT_NOTHING)
    # taken from the socket's queue as the drain begins: the same
    assert first_close(draining(Conn(now=DRAIN))) == (DRAIN + 1, SENT_NOTHING)
    # only empty lines (allowed before a request) are nothing too
    conn = draining(Conn(now=10.0))
    conn.saw_request(b"\r\n", DRAIN + 0.5)
    assert first_close(conn) == (DRAIN + 1, SENT_NOTHING)


def test_a_request_sent_within_the_grace_is_answered_not_closed():
    conn = draining(Conn(now=10.0))
    conn.saw_request(GET, DRAIN + 0.9)
    assert first_close(conn) == (float("inf"), "")  # waits for its answer: swap_drain bounds it
    conn.frames.feed(ANSWER[:20])
    conn.saw_answer(0, DRAIN + 300)
    assert conn.close_reason(DRAIN + 400, DRAIN, POLICY) == ""  # an answer in progress
    _, done = conn.frames.feed(ANSWER[20:], close=True)
    conn.saw_answer(done, DRAIN + 401)
    assert conn.close_reason(DRAIN + 401.9, DRAIN, POLICY) == ""
    assert conn.close_reason(DRAIN + 402, DRAIN, POLICY) == KEPT_ALIVE


def test_bytes_the_proxy_has_not_read_yet_are_not_nothing():
    """The proxy reads a client only once the server's endpoint took the connect;
    a request waiting in the socket still counts as sent."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        conn = draining(Conn(ours, now=10.0))
        assert conn.close_reason(DRAIN + 2, DRAIN, POLICY) == SENT_NOTHING
        theirs.sendall(GET)
        assert conn.close_reason(DRAIN + 2, DRAIN, POLICY) == ""
        assert ours.recv(100) == GET  # the peek took nothing


def test_a_kept_alive_connection_keeps_its_grace_from_its_last_answer():
    conn = Conn(now=10.0)
    conn.saw_request(GET, 20.0)
    _, done = conn.frames.feed(ANSWER)
    conn.saw_answer(done, DRAIN - 0.4)
    assert first_close(draining(conn)) == (DRAIN + 0.6, KEPT_ALIVE)
    conn.answered_at = 20.0  # quiet for long before the drain: closed at once
    assert first_close(conn) == (DRAIN, KEPT_ALIVE)


def test_a_stalled_or_trickled_head_is_closed_after_the_stall_bound():
    stalled = Conn(now=10.0)
    stalled.saw_request(b"GET /x HTTP/1.1\r\nHost: a\r\n", 10.0)
    assert first_close(draining(stalled)) == (DRAIN + 5, STALLED)

    trickled = Conn(now=10.0)
    trickled.saw_request(b"G", 50.0)
    rest = b"ET /x HTTP/1.1\r\nX: " + b"y" * 400
    sends = [(DRAIN + i * 0.2, bytes([b])) for i, b in enumerate(rest)]
    assert first_close(draining(trickled), sends) == (DRAIN + 5, STALLED)  # a byte every 0.2 s

    late = draining(Conn(now=10.0))
    assert first_close(late, [(DRAIN + 0.5, b"GET /x HTTP/1.1\r\n")]) == (DRAIN + 5.5, STALLED)


def test_a_body_that_stops_or_trickles_is_closed_a_steady_upload_is_not():
    head = b"POST /v1/audio HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n"

    def uploading() -> Conn:
        conn = Conn(now=10.0)
        conn.saw_request(head + b"x" * 60000, 50.0)
        return draining(conn)

    # 120 kB in, then nothing: closed 5 s after its last byte
    assert first_close(uploading(), [(DRAIN + 2, b"x" * 60000)]) == (DRAIN + 7, STALLED)
    # never quiet for 5 s, but 1 byte/s: closed by the rate
    trickle = [(DRAIN + i, b"x") for i in range(1, 600)]
    assert first_close(uploading(), trickle) == (DRAIN + 5.05, STALLED)
    # 1000 bytes/s for two minutes is an upload: closed only once it stops
    steady = [(DRAIN + i / 10, b"x" * 100) for i in range(1, 1200)]
    # (its last byte at +119.9 s; the first check 5 s later is at +125 s)
    assert first_close(uploading(), steady, step=0.5) == (DRAIN + 125, STALLED)


def test_answers_it_cannot_follow_are_left_to_swap_drain():
    conn = draining(Conn(now=10.0))
    conn.saw_request(GET, 20.0)
    conn.frames.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    assert first_close(conn) == (float("inf"), "")


def test_no_http_request_is_judged_by_silence_both_ways():
    conn = draining(Conn(now=10.0))
    conn.saw_request(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 50.0)
    assert conn.requests.lost
    conn.saw_answer(0, DRAIN + 1)  # the server still says something
    assert first_close(conn) == (DRAIN + 6, MALFORMED)


def test_a_connection_the_server_closed_is_closed_after_the_grace():
    conn = draining(Conn(now=10.0))
    conn.saw_request(b"X\r\n\r\n", 50.0)
    conn.server_closed_at = DRAIN + 0.2
    assert first_close(conn) == (DRAIN + 1.2, SERVER_CLOSED)


def test_the_ledger_names_each_connection_once_and_counts_why():
    ledger = DrainLedger(POLICY)
    early, kept, late = Conn(now=10.0), Conn(now=10.0), Conn(now=DRAIN + 0.5)
    kept.saw_request(GET, 20.0)
    kept.saw_answer(kept.frames.feed(ANSWER)[1], 30.0)
    ledger.join(early, 50.0)  # before the drain: no effect
    assert not ledger.started
    ledger.begin([early, kept], DRAIN)
    ledger.join(late, DRAIN + 0.5)
    conns = {"early": early, "kept": kept, "late": late}
    assert ledger.due(conns, DRAIN) == ["kept"]
    assert ledger.due(conns, DRAIN + 1) == ["early"]  # named once: kept is not again
    assert ledger.due(conns, DRAIN + 1.5) == ["late"]  # its grace counts from its accept
    assert ledger.due(conns, DRAIN + 9) == []
    assert ledger.summary() == ("closed 2 connection(s) that sent nothing; closed 1 "
                                "connection(s) that were kept alive after their answers")


# The forwarder itself, on loopback: faster bounds than the defaults keep it short.
FAST = DrainPolicy(grace=0.5, stall=1.5, min_rate=500)
SLOW_ANSWER = 3.0  # longer than the stall bound: an answer in progress is never cut by it


async def _backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A kept-alive HTTP/1.1 server: /stream is chunked over SLOW_ANSWER seconds,
    /slow says nothing for SLOW_ANSWER seconds, anything else answers at once."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ")[1]
            if path == b"/stream":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for i in range(10):
                    await asyncio.sleep(SLOW_ANSWER / 10)
                    writer.write(b"2\r\n%d\n\r\n" % i)
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                if path == b"/slow":
                    await asyncio.sleep(SLOW_ANSWER)
                writer.write(ANSWER)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _read_answer(reader: asyncio.StreamReader, end: bytes) -> bytes:
    """Bytes of one answer, up to and including ``end``; what came if it closed first."""
    data = b""
    while end not in data:
        chunk = await reader.read(65536)
        if not chunk:
            break
        data += chunk
    return data


async def _until_closed(reader: asyncio.StreamReader) -> float:
    """The time the proxy closed this client connection."""
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass
    return time.monotonic()


@dataclass
class Scene:
    """What the clients saw: answers, and when (seconds after the drain began)
    the proxy closed the connections it should close."""

    within: bytes
    stream: bytes
    slow: bytes
    silent: float
    head: float
    kept: float
    pending: int
    closed: dict[str, int]
    took: float


async def _drain_scene() -> Scene:
    backend = await asyncio.start_server(_backend, "127.0.0.1", 0)
    port = backend.sockets[0].getsockname()[1]
    ns = argparse.Namespace(target=f"127.0.0.1:{port}", connect_timeout=5.0, name="t",
                            group="g", connections_max=100, pool="", what="swap group g")
    public = socket.create_server(("127.0.0.1", 0))
    public.setblocking(False)
    fw = Forwarder(ns, public, Systemctl("user"), FAST)
    # what watch_server learns from systemd (UID=): the backend here is this process
    fw.server_uid = os.getuid()
    loop = asyncio.get_running_loop()

    async def connect(first: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(*public.getsockname())
        client, _ = await loop.sock_accept(public)
        fw.start(client)
        if first:
            writer.write(first)
        return reader, writer

    silent = await connect()
    head = await connect(b"GET /x HTTP/1.1\r\nHost: a\r\n")
    kept = await connect(GET)
    assert await _read_answer(kept[0], b"ok") == ANSWER  # answered before the drain
    stream = await connect(b"GET /stream HTTP/1.1\r\n\r\n")
    slow = await connect(b"GET /slow HTTP/1.1\r\n\r\n")
    within = await connect()
    streamed = loop.create_task(_read_answer(stream[0], b"0\r\n\r\n"))
    slow_answer = loop.create_task(_read_answer(slow[0], b"ok"))
    await asyncio.sleep(0.2)  # the stream and the slow request are in progress
    t0 = time.monotonic()
    drain = loop.create_task(fw.drain())
    closed = {name: loop.create_task(_until_closed(c[0]))
              for name, c in (("silent", silent), ("head", head), ("kept", kept))}
    await asyncio.sleep(FAST.grace * 0.6)
    within[1].write(GET)  # just within the grace: served
    within_answer = await _read_answer(within[0], b"ok")
    within[1].close()
    answers = (await streamed, await slow_answer)
    for c in (stream, slow):
        c[1].close()
    _, pending = await asyncio.wait(set(fw.conns), timeout=10)
    at = {name: await task - t0 for name, task in closed.items()}
    out = Scene(within=within_answer, stream=answers[0], slow=answers[1], silent=at["silent"],
                head=at["head"], kept=at["kept"], pending=len(pending), closed=dict(fw.ledger.closed),
                took=time.monotonic() - t0)
    drain.cancel()
    for c in (silent, head, kept):
        c[1].close()
    public.close()
    backend.close()
    await backend.wait_closed()
    return out


def test_the_forwarder_closes_what_is_not_answered_and_finishes_what_is():
    out = asyncio.run(_drain_scene())
    assert out.pending == 0
    # a request sent just within the grace is answered, asked to close
    assert out.within == ANSWER.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    # answers in progress finish, whatever their pace: a stream, and one that
    # says nothing for twice the stall bound
    assert out.stream.endswith(b"9\n\r\n0\r\n\r\n") and b"Connection: close" not in out.stream
    assert out.slow.endswith(b"ok")
    tick = 0.6  # the drain looks every 0.1 s; a loaded machine adds to that
    assert 0 <= out.kept < tick  # quiet for longer than the grace already
    assert FAST.grace <= out.silent < FAST.grace + tick
    assert FAST.stall <= out.head < FAST.stall + tick
    assert out.closed == {SENT_NOTHING: 1, STALLED: 1, KEPT_ALIVE: 1}
    assert out.took < SLOW_ANSWER + 2

