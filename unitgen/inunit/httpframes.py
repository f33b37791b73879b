"""Where HTTP/1.x responses end in a byte stream, so a draining proxy can tell a
kept-alive connection that sits between requests from one in the middle of an
answer (a streamed generation included), and ask the client to close it.

Standard library only; it never changes a byte except, on request, by adding a
``Connection: close`` header to a response head.
"""

from __future__ import annotations

import re

__all__ = ["ResponseFrames"]

_MAX_HEAD = 64 * 1024
_STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3})")


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

    @property
    def between(self) -> bool:
        """True when the last response ended and nothing of a next one came."""
        return not self.lost and self._state == "head" and not self._buf

    def saw_request(self, data: bytes) -> None:
        """Client bytes: a HEAD request's answer has no body whatever its
        Content-Length says, so stop following rather than miscount."""
        if b"HEAD " in data:
            self.lost = True

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
            elif self._state == "body":
                take = min(self._left, len(view))
                out += view[:take]
                view = view[take:]
                self._left -= take
                if not self._left:
                    self._state = "head"
                    done += 1
            elif self._state == "chunk-data":
                take = min(self._left, len(view))
                out += view[:take]
                view = view[take:]
                self._left -= take
                if not self._left:
                    self._state, self._left = "chunk-crlf", 2
            elif self._state == "chunk-crlf":
                take = min(self._left, len(view))
                out += view[:take]
                view = view[take:]
                self._left -= take
                if not self._left:
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
        if status < 200 or status in (204, 304):
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
