"""Where HTTP/1.x requests and responses end in a byte stream, so a draining
proxy can tell a kept-alive connection that sits between requests from one in
the middle of an answer (a streamed generation included), and a client that is
still sending its request from one that sends nothing.

Standard library only; it never changes a byte except, on request, by adding a
``Connection: close`` header to a response head. :class:`RequestGuard` holds
each request head back until it is complete and stops a connection at a
request for a path its server must not be asked for through the public port.
"""

from __future__ import annotations

import posixpath
import re
from collections import deque
from collections.abc import Iterable
from urllib.parse import unquote

__all__ = ["RequestFrames", "RequestGuard", "ResponseFrames", "path_of"]

_MAX_HEAD = 64 * 1024
_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3})")
# method SP request-target SP HTTP-version (RFC 9112 section 3)
_REQUEST_LINE = re.compile(rb"^([!#$%&'*+.^_`|~0-9A-Za-z-]+) [^ \r\n]+ HTTP/1\.[01]\r?\n")
_TARGET = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+ ([^ \r\n]+) HTTP/1\.[01]\r?\n")


class ResponseFrames:
    """Follows the responses a server sends on one connection.

    :meth:`feed` takes bytes as they arrive and returns the bytes to pass on
    (a response head is held until it is complete) and how many responses
    ended in them. ``lost`` turns true on anything it cannot follow (not HTTP,
    a body that lasts until the connection closes, an upgrade): such a
    connection never counts as between requests."""

    def __init__(self) -> None:
        self.lost = False
        self._state = "head"  # head, body, chunk-size, chunk-data, chunk-crlf, trailers, eof
        self._buf = bytearray()
        self._left = 0
        self._heads: deque[bool] = deque()  # per request not yet answered: was it HEAD?

    @property
    def between(self) -> bool:
        """True when the last response ended and nothing of a next one came."""
        return not self.lost and self._state == "head" and not self._buf

    def expect(self, method: bytes) -> None:
        """The client sent a request head with this method (in order): the answer
        to a HEAD has no body whatever its Content-Length says."""
        if not self.lost:
            self._heads.append(method == b"HEAD")

    def feed(self, data: bytes, *, close: bool = False) -> tuple[bytes, int]:
        """Take server bytes; return (bytes to forward, responses completed).
        With ``close``, every response head that completes here gets
        ``Connection: close``."""
        if self.lost:
            return data, 0
        out = bytearray()
        done = 0
        view = memoryview(data)
        while view:
            if self._state == "head":
                self._buf += view
                view = memoryview(b"")
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > _MAX_HEAD:
                        return self._lose(out), done
                    break
                head, rest = bytes(self._buf[:end + 4]), bytes(self._buf[end + 4:])
                self._buf.clear()
                status = self._start(head)
                if status is None:
                    out += head + rest
                    self.lost = True
                    return bytes(out), done
                if close and status >= 200:
                    head = head[:-2] + b"Connection: close\r\n\r\n"
                out += head
                if self._state == "head" and status >= 200:
                    done += 1
                view = memoryview(rest)
            elif self._state in ("body", "chunk-data", "chunk-crlf"):
                take = min(self._left, len(view))
                out += view[:take]
                view = view[take:]
                self._left -= take
                if not self._left:
                    if self._state == "body":
                        self._state = "head"
                        done += 1
                    elif self._state == "chunk-data":
                        self._state, self._left = "chunk-crlf", 2
                    else:
                        self._state = "chunk-size"
            else:  # chunk-size or trailers: line based
                nl = bytes(view).find(b"\n")
                if nl < 0:
                    self._buf += view
                    out += view
                    view = memoryview(b"")
                    if len(self._buf) > _MAX_HEAD:
                        self.lost = True  # (those bytes are already in out)
                        self._buf.clear()
                    break
                line = bytes(self._buf) + bytes(view[:nl + 1])
                out += view[:nl + 1]
                view = view[nl + 1:]
                self._buf.clear()
                if self._state == "chunk-size":
                    try:
                        size = int(line.split(b";", 1)[0].strip(), 16)
                    except ValueError:
                        return self._lose(out + view), done
                    if size:
                        self._state, self._left = "chunk-data", size
                    else:
                        self._state = "trailers"
                elif line in (b"\r\n", b"\n"):
                    self._state = "head"
                    done += 1
        return bytes(out), done

    def _lose(self, out: bytearray | bytes) -> bytes:
        self.lost = True
        data = bytes(out) + bytes(self._buf)
        self._buf.clear()
        return data

    def _start(self, head: bytes) -> int | None:
        """Read a response head; set the state for its body. None: cannot follow."""
        match = _STATUS.match(head)
        if not match:
            return None
        status = int(match.group(1))
        fields: dict[bytes, bytes] = {}
        for line in head.split(b"\r\n")[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                key = name.strip().lower()
                fields[key] = (fields[key] + b"," if key in fields else b"") + value.strip()
        if status == 101:
            return None  # an upgraded connection is no longer HTTP
        if status < 200:
            self._state = "head"
            return status
        if (self._heads.popleft() if self._heads else False) or status in (204, 304):
            self._state = "head"
            return status
        if b"chunked" in fields.get(b"transfer-encoding", b"").lower():
            self._state = "chunk-size"
            return status
        length = fields.get(b"content-length")
        if length is not None and length.isdigit():
            self._left = int(length)
            self._state = "body" if self._left else "head"
            return status
        return None  # the body lasts until the server closes


def _head_end(buf: bytearray) -> int:
    """Offset just past the empty line that ends a head in ``buf``, or -1. Bare LF
    line ends count too: lenient servers accept them, so a request they answer
    must not look unfinished here."""
    ends = [i + n for i, n in ((buf.find(b"\n\r\n"), 3), (buf.find(b"\n\n"), 2)) if i >= 0]
    return min(ends) if ends else -1


class RequestFrames:
    """Follows the requests a client sends on one connection, observing only.

    :meth:`feed` takes bytes as they arrive and returns the methods of the
    request heads completed in them. ``phase`` says whether a request is being
    received (``"head"``, ``"body"``) or none (``"none"``); ``parts`` counts the
    heads and bodies begun, so a caller sees a new one start; ``completed``
    counts requests received in full. ``lost`` turns true on anything that is
    not an HTTP/1.x request with a length it can follow (RFC 9112 section 6.3)."""

    def __init__(self) -> None:
        self.lost = False
        self.completed = 0
        self.parts = 0
        self._state = "none"  # none, head, body, chunk-size, chunk-data, chunk-crlf, trailers
        self._buf = bytearray()
        self._left = 0

    @property
    def phase(self) -> str:
        """``none`` between requests, ``head`` or ``body`` while one is coming."""
        if self._state in ("none", "head"):
            return self._state
        return "body"

    def feed(self, data: bytes) -> list[bytes]:
        """Take client bytes; return the methods of the heads completed in them."""
        methods: list[bytes] = []
        view = memoryview(data)
        while view and not self.lost:
            if self._state == "none":
                # empty lines before a request are allowed (RFC 9112 section 2.2)
                rest = bytes(view).lstrip(b"\r\n")
                view = memoryview(rest)
                if rest:
                    self._state = "head"
                    self.parts += 1
            elif self._state == "head":
                self._buf += view
                view = memoryview(b"")
                end = _head_end(self._buf)
                if end < 0:
                    if len(self._buf) > _MAX_HEAD:
                        self._lose()
                    break
                head, rest = bytes(self._buf[:end]), bytes(self._buf[end:])
                self._buf.clear()
                method = self._start(head)
                if method is None:
                    self._lose()
                    break
                methods.append(method)
                view = memoryview(rest)
            elif self._state in ("body", "chunk-data", "chunk-crlf"):
                take = min(self._left, len(view))
                view = view[take:]
                self._left -= take
                if not self._left:
                    if self._state == "body":
                        self._end()
                    elif self._state == "chunk-data":
                        self._state, self._left = "chunk-crlf", 2
                    else:
                        self._state = "chunk-size"
            else:  # chunk-size or trailers: line based
                nl = bytes(view).find(b"\n")
                if nl < 0:
                    self._buf += view
                    if len(self._buf) > _MAX_HEAD:
                        self._lose()
                    break
                line = bytes(self._buf) + bytes(view[:nl + 1])
                view = view[nl + 1:]
                self._buf.clear()
                if self._state == "chunk-size":
                    size = line.split(b";", 1)[0].strip()
                    if not size or any(c not in b"0123456789abcdefABCDEF" for c in size):
                        self._lose()
                    elif int(size, 16):
                        self._state, self._left = "chunk-data", int(size, 16)
                    else:
                        self._state = "trailers"
                elif line in (b"\r\n", b"\n"):
                    self._end()
        return methods

    def _end(self) -> None:
        self._state = "none"
        self.completed += 1

    def _lose(self) -> None:
        self.lost = True
        self._buf.clear()

    def _start(self, head: bytes) -> bytes | None:
        """Read a request head; set the state for its body. None: cannot follow."""
        match = _REQUEST_LINE.match(head)
        if not match:
            return None
        fields: dict[bytes, list[bytes]] = {}
        for line in head.split(b"\n")[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                fields.setdefault(name.strip().lower(), []).append(value.strip())
        codings = b",".join(fields.get(b"transfer-encoding", [])).lower()
        lengths = ({v.strip() for v in b",".join(fields[b"content-length"]).split(b",")}
                   if b"content-length" in fields else set())
        if codings:
            # chunked must come last; a request without it cannot be delimited
            if codings.split(b",")[-1].strip() != b"chunked":
                return None
            self._state = "chunk-size"
            self.parts += 1
        elif lengths:
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                return None
            self._left = int(next(iter(lengths)))
            if self._left:
                self._state = "body"
                self.parts += 1
            else:
                self._end()
        else:
            self._end()  # no body (RFC 9112 section 6.3, last rule for requests)
        return match.group(1)


def path_of(target: str) -> str:
    """The path a server may route a request target to, read as widely as any
    server reads it: the path of an absolute URI, without query or fragment,
    percent-decoded until nothing changes, dot segments and repeated or
    trailing slashes removed, lower case. Refusing by this form refuses every
    spelling of a path (and some that no server would route: no loss)."""
    if "://" in target:
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    path = target.split("?", 1)[0].split("#", 1)[0]
    while (decoded := unquote(path)) != path:
        path = decoded
    path = posixpath.normpath("/" + re.sub(r"/+", "/", path.replace("\\", "/")))
    return re.sub(r"/+", "/", path).rstrip("/").lower() or "/"


class RequestGuard:
    """What a client may send through the public port: each request head is held
    back until it is complete and passed on only when its path is not refused
    (a GPU pool member's sleep endpoints are unitgen's own, not a client's).
    Bodies pass as they come. A request it cannot follow (not HTTP/1.x, a
    length it cannot read) ends the connection too: it could hide the next
    request's head from this guard, not from the server."""

    def __init__(self, refused: Iterable[str]) -> None:
        self.refused = frozenset(path_of(p) for p in refused)
        self.frames = RequestFrames()
        self._held = bytearray()

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """Client bytes in; the bytes to forward now, and True when the
        connection must end at this point (nothing after is forwarded)."""
        buf = self._held + data
        self._held = bytearray()
        out = bytearray()
        pos = 0
        frames = self.frames
        while pos < len(buf):
            if frames.lost:
                return bytes(out), True
            if frames._state in ("none", "head"):
                end = _head_end(buf[pos:])
                if end < 0:
                    if len(buf) - pos > _MAX_HEAD:
                        return bytes(out), True
                    self._held = buf[pos:]
                    return bytes(out), False
                head = bytes(buf[pos:pos + end])
                if self._refuses(head):
                    return bytes(out), True
                step = end
            elif frames._state in ("body", "chunk-data", "chunk-crlf"):
                step = min(frames._left, len(buf) - pos)
            else:  # chunk-size, trailers: one line at a time
                nl = buf.find(b"\n", pos)
                step = len(buf) - pos if nl < 0 else nl + 1 - pos
            frames.feed(bytes(buf[pos:pos + step]))
            out += buf[pos:pos + step]
            pos += step
        return bytes(out), frames.lost

    def _refuses(self, head: bytes) -> bool:
        head = head.lstrip(b"\r\n")
        if not head:
            return False  # empty lines between requests
        match = _TARGET.match(head)
        return match is None or path_of(match.group(1).decode("latin-1")) in self.refused
