"""Which connections a draining swap-group member closes, and when: the bounds
(:class:`DrainPolicy`), where each client connection stands (:class:`Conn`: its
requests and answers as :mod:`unitgen.inunit.httpframes` follows them, and the
rule that says when it no longer holds the turn) and the drain's own account
(:class:`DrainLedger`: when it began, what it closed and why). No I/O beyond a
peek at a socket: :mod:`unitgen.inunit.swapforward` feeds it bytes and a clock,
and closes what it is told to.

Standard library only."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from unitgen.inunit.httpframes import RequestFrames, ResponseFrames

__all__ = ["KEPT_ALIVE", "MALFORMED", "SENT_NOTHING", "SERVER_CLOSED", "STALLED", "Conn",
           "DrainLedger", "DrainPolicy"]

K = TypeVar("K")


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


class DrainLedger:
    """One proxy's drain: whether and when it began, and the connections it
    closed, counted by reason for the journal."""

    def __init__(self, policy: DrainPolicy) -> None:
        self.policy = policy
        self.started = False
        self.at = 0.0
        self.closed: Counter[str] = Counter()

    def begin(self, conns: Iterable[Conn], now: float) -> None:
        """The drain begins now for ``conns`` (those open)."""
        self.started, self.at = True, now
        for conn in conns:
            conn.begin_drain(now)

    def join(self, conn: Conn, now: float) -> None:
        """A connection accepted now: under the drain's rules if it began."""
        if self.started:
            conn.begin_drain(now)

    def due(self, conns: Mapping[K, Conn], now: float) -> list[K]:
        """The keys of the connections to close now; each is named once, with its
        reason kept in :attr:`Conn.closing` and counted."""
        out = []
        for key, conn in conns.items():
            if conn.closing:
                continue
            conn.closing = conn.close_reason(now, self.at, self.policy)
            if conn.closing:
                self.closed[conn.closing] += 1
                out.append(key)
        return out

    def summary(self) -> str:
        """The connections the drain closed, for the journal ("" if none)."""
        return "; ".join(f"closed {n} connection(s) that {why}"
                         for why, n in sorted(self.closed.items()))
