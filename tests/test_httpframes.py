"""Response boundaries for the swap proxy's drain: split anywhere, the count
and the bytes come out right; anything it cannot follow is never 'between'."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from unitgen.inunit.httpframes import ResponseFrames

LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n1a\r\n" + b"x" * 26 + b"\r\n0\r\nX-Trailer: 1\r\n\r\n")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
NO_BODY = b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n"
STREAM = [LENGTH, CHUNKED, CONTINUE + LENGTH, NO_BODY, CHUNKED]


def run(parts: list[bytes], close: bool = False) -> tuple[bytes, list[tuple[int, bool]]]:
    frames = ResponseFrames()
    out, seen = b"", []
    for part in parts:
        data, done = frames.feed(part, close=close)
        out += data
        seen.append((done, frames.between))
    return out, seen


@given(st.lists(st.integers(min_value=0, max_value=len(b"".join(STREAM))), max_size=12))
def test_any_split_gives_the_same_bytes_and_count(cuts):
    whole = b"".join(STREAM)
    bounds = sorted({0, len(whole), *cuts})
    parts = [whole[a:b] for a, b in itertools.pairwise(bounds)]
    out, seen = run(parts)
    assert out == whole
    assert sum(d for d, _ in seen) == 5
    assert seen[-1][1] is True


def test_between_only_after_the_last_byte_of_an_answer():
    out, seen = run([CHUNKED[:-1], CHUNKED[-1:], LENGTH[:20]])
    assert seen == [(0, False), (1, True), (0, False)]
    assert out == CHUNKED + b""  # an unfinished head is held back


def test_close_is_added_to_heads_when_asked():
    out, _ = run([CONTINUE + LENGTH], close=True)
    assert out == CONTINUE + LENGTH.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")


def test_what_it_cannot_follow_is_never_between():
    for stream in (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close",
                   b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
                   b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\n" + b"x" * 70000):
        frames = ResponseFrames()
        out, _ = frames.feed(stream)
        assert out == stream and not frames.between
    frames = ResponseFrames()
    frames.saw_request(b"HEAD / HTTP/1.1\r\n\r\n")
    assert frames.feed(LENGTH) == (LENGTH, 0) and not frames.between
