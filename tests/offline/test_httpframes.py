"""Request and response boundaries for the swap proxy's drain: split anywhere,
the count and the bytes come out right; anything it cannot follow is never
'between' (responses) or is 'lost' (requests)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unitgen.inunit.httpframes import RequestFrames, ResponseFrames

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


def test_the_answer_to_a_head_request_has_no_body():
    """Told by the request side, in order: the HEAD answer's Content-Length
    announces a body that never comes, the GET answer's body does."""
    head_answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    frames = ResponseFrames()
    frames.expect(b"HEAD")
    frames.expect(b"GET")
    assert frames.feed(CONTINUE + head_answer) == (CONTINUE + head_answer, 1)
    assert frames.between
    assert frames.feed(LENGTH) == (LENGTH, 1) and frames.between


GET = b"GET /v1/models HTTP/1.1\r\nHost: a\r\n\r\n"
POST = b"POST /v1/chat HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n{\"a\": \"b\"}\n"
CHUNKED_POST = (b"POST /v1/audio HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                b"4;x=y\r\nabcd\r\n10\r\n" + b"z" * 16 + b"\r\n0\r\nX-Sum: 1\r\n\r\n")
BARE_LF = b"HEAD / HTTP/1.0\nHost: a\n\n"
REQUESTS = [b"\r\n", GET, POST, CHUNKED_POST, BARE_LF, POST]


@given(st.lists(st.integers(min_value=0, max_value=len(b"".join(REQUESTS))), max_size=12))
def test_requests_split_anywhere_are_counted_in_order(cuts):
    whole = b"".join(REQUESTS)
    bounds = sorted({0, len(whole), *cuts})
    frames = RequestFrames()
    methods = []
    for a, b in itertools.pairwise(bounds):
        methods += frames.feed(whole[a:b])
    assert methods == [b"GET", b"POST", b"POST", b"HEAD", b"POST"]
    assert frames.completed == 5 and frames.phase == "none" and not frames.lost
    assert frames.parts == 5 + 3  # five heads, three bodies


def test_phase_follows_a_request_as_it_comes():
    frames = RequestFrames()
    assert frames.phase == "none" and frames.feed(b"\r\n") == [] and frames.parts == 0
    frames.feed(POST[:10])
    assert frames.phase == "head" and frames.parts == 1
    assert frames.feed(POST[10:-3]) == [b"POST"]
    assert frames.phase == "body" and frames.parts == 2 and frames.completed == 0
    frames.feed(POST[-3:] + GET[:3])
    assert frames.phase == "head" and frames.parts == 3 and frames.completed == 1
    frames.feed(GET[3:])
    assert frames.phase == "none" and frames.completed == 2
    frames.feed(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert frames.phase == "none" and frames.completed == 3 and frames.parts == 4


@pytest.mark.parametrize("stream", [
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",                      # HTTP/2 without TLS
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS
    b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/1.1\r\nX: " + b"x" * 70000,
])
def test_what_is_not_a_request_it_can_delimit_is_lost(stream):
    frames = RequestFrames()
    frames.feed(stream)
    assert frames.lost


# --- the guard of a GPU pool member's public port (issue 27) ----------------

SLEEPS = ("/sleep", "/wake_up", "/is_sleeping", "/release_memory_occupation")
ASK = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n{\"model\": \"m-a\"}\n"
CHUNKED_ASK = (b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"b\r\nPOST /sleep\r\n0\r\n\r\n")


def guard(parts: list[bytes]) -> tuple[bytes, bool]:
    from unitgen.inunit.httpframes import RequestGuard  # noqa: PLC0415

    g = RequestGuard(SLEEPS)
    out = b""
    for part in parts:
        data, refused = g.feed(part)
        out += data
        if refused:
            return out, True
    return out, False


@given(st.lists(st.integers(min_value=0, max_value=len(ASK + CHUNKED_ASK + ASK)), max_size=8))
def test_the_guard_passes_requests_for_the_model_whole_however_split(cuts):
    whole = ASK + CHUNKED_ASK + ASK  # "/sleep" inside a body is no request for it
    bounds = sorted({0, len(whole), *cuts})
    assert guard([whole[a:b] for a, b in itertools.pairwise(bounds)]) == (whole, False)


@pytest.mark.parametrize("target", [
    b"/sleep?level=1", b"/%73leep?level=1", b"/%2573leep", b"//sleep", b"/sleep/", b"/SLEEP",
    b"/v1/../wake_up", b"/./is_sleeping", b"http://x/sleep?level=1", b"/release_memory_occupation",
])
def test_the_guard_stops_a_request_for_a_sleep_path_however_spelled(target):
    head = b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    # alone, split in its head, or pipelined after a whole request: nothing of it goes on
    assert guard([head]) == (b"", True)
    assert guard([head[:7], head[7:]]) == (b"", True)
    assert guard([ASK + head]) == (ASK, True)
    assert guard([ASK[:-3], ASK[-3:] + head + ASK]) == (ASK, True)


def test_the_guard_passes_nearby_paths_and_stops_what_it_cannot_follow():
    for path in (b"/sleeping", b"/v1/sleep", b"/wake"):
        ask = b"GET " + path + b" HTTP/1.1\r\n\r\n"
        assert guard([ask]) == (ask, False)
    bad = b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\nPOST /sleep HTTP/1.1\r\n\r\n"
    assert guard([bad])[1] is True  # it could hide the next head from the guard
    assert guard([b"\x16\x03\x01 not http\r\n\r\n"])[1] is True
