"""Issue 25: a server's runtime directory is its own, so its socket path can be
a link to a socket another uid created. The probe and the liveness checker
connect there with the server's uid (``--own-listener``) and must send it
nothing, the key included: the listener here is a real process of uid 65534,
the probe runs as this test's uid. Failed before the fix (Unix sockets were
not checked: the listener received the key)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import RecordingUnixListener
from unitgen.inunit import probe, watch

NOBODY = 65534
KEY = "sk-peer-unix-5b1e"
# Becomes uid 65534, answers 200 to every connection and prints what each carried.
LISTENER = r"""
import os, socket, sys
os.setgroups([]); os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen()
print("LISTENING", flush=True)
while True:
    c, _ = s.accept(); c.settimeout(1)
    try:
        data = c.recv(65536)
    except OSError:
        data = b""
    print("GOT", data, flush=True)
    try:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    except OSError:
        pass
    c.close()
"""


@pytest.fixture
def linked(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """The server's socket path, a link to a listener uid 65534 created."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the listener as uid 65534")
    theirs = Path(tempfile.mkdtemp(prefix="unitgen-peer-"))
    os.chown(theirs, NOBODY, NOBODY)
    target = str(theirs / "theirs.sock")
    proc = subprocess.Popen([sys.executable, "-I", "-c", LISTENER, target],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "LISTENING"
        runtime = tmp_path / "unitgen-x"
        runtime.mkdir()
        (runtime / "http.sock").symlink_to(target)
        yield str(runtime / "http.sock"), proc
    finally:
        proc.kill()
        proc.wait()
        for child in theirs.iterdir():
            child.unlink()
        theirs.rmdir()


def _received(proc: subprocess.Popen[str]) -> list[str]:
    proc.kill()
    out, _ = proc.communicate()
    return [ln for ln in out.splitlines() if ln.startswith("GOT") and ln != "GOT b''"]


def test_the_probe_sends_no_key_to_a_socket_another_uid_created(linked):
    link, listener = linked
    result = probe.attempt(link, "/health", KEY, timeout=2.0, peer_uid=os.geteuid())
    assert result.outcome == "wait" and "is a link" in result.detail, result
    # the socket itself, by its own path: its listener is another uid's
    path = os.readlink(link)
    result = probe.attempt(path, "/health", KEY, timeout=2.0, peer_uid=os.geteuid())
    assert result.outcome == "wait", result
    assert f"created by uid {NOBODY}, not the server's uid {os.geteuid()}" in result.detail
    # the same socket, expected: it answers, so the check alone kept the key back
    again = probe.attempt(path, "/health", KEY, timeout=3.0, peer_uid=NOBODY)
    assert again.outcome == "ready", again
    got = _received(listener)
    assert len(got) == 1 and KEY in got[0], got


def test_the_probe_command_line_checks_unix_sockets_too(linked, monkeypatch):
    path, listener = linked
    monkeypatch.setenv("THE_KEY", KEY)
    t0 = time.monotonic()
    code = probe.main(["--target", path, "--path", "/health", "--timeout", "1s",
                       "--key-env", "THE_KEY", "--own-listener"])
    assert code == probe.EXIT_NOT_READY and time.monotonic() - t0 < 5
    assert _received(listener) == []


def test_the_liveness_checker_sends_no_key_and_feeds_no_watchdog(linked, tmp_path, monkeypatch):
    path, listener = linked
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    try:
        watch.check_loop(path, "/health", 3.0, key=KEY, rounds=2, peer_uid=os.geteuid())
        messages = []
        while True:
            try:
                messages.append(notify.recv(4096).decode())
            except TimeoutError:
                break
    finally:
        notify.close()
    assert messages and not any("WATCHDOG=1" in m for m in messages), messages
    assert _received(listener) == []


def test_a_socket_of_ones_own_uid_passes(tmp_path):
    from unitgen.inunit.peer import foreign_peer, unix_peer_uid  # noqa: PLC0415

    path = str(tmp_path / "own.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
            assert unix_peer_uid(client) == os.geteuid()
            assert foreign_peer(client, os.geteuid()) is None
            assert "not the server's uid" in (foreign_peer(client, os.geteuid() + 1) or "")



def test_a_link_is_never_followed_even_to_a_socket_of_ones_own(tmp_path):
    # the uid cannot tell a container's server (root) from root's own sockets:
    # the socket file itself must be where the path says, not behind a link
    listener = RecordingUnixListener(tmp_path / "elsewhere.sock")
    link = tmp_path / "http.sock"
    link.symlink_to(tmp_path / "elsewhere.sock")
    result = probe.attempt(str(link), "/health", KEY, timeout=2.0, peer_uid=os.geteuid())
    assert result.outcome == "wait" and "is a link" in result.detail, result
    result = probe.attempt(str(link), "/health", KEY, timeout=2.0)
    assert result.outcome == "wait" and "is a link" in result.detail, result
    assert listener.received == []
    assert probe.attempt(str(tmp_path / "elsewhere.sock"), "/health", KEY,
                         timeout=2.0).outcome == "ready"


def test_the_relay_forwards_to_the_socket_and_never_through_a_link(tmp_path):
    import asyncio  # noqa: PLC0415

    from unitgen.inunit.relay import Relay  # noqa: PLC0415

    listener = RecordingUnixListener(tmp_path / "http.sock")
    public = socket.create_server(("127.0.0.1", 0))
    port = public.getsockname()[1]
    relay = Relay(public, str(tmp_path / "http.sock"), connections_max=4, exit_idle=1.0)

    def ask() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            out = b""
            try:
                while chunk := c.recv(65536):
                    out += chunk
            except ConnectionResetError:
                pass  # closed with the request unread: nothing was forwarded
            return out

    async def scene() -> tuple[bytes, bytes, float]:
        serving = asyncio.get_running_loop().create_task(relay.serve())
        first = await asyncio.to_thread(ask)
        (tmp_path / "http.sock").rename(tmp_path / "moved.sock")
        (tmp_path / "http.sock").symlink_to(tmp_path / "moved.sock")
        second = await asyncio.to_thread(ask)
        t0 = time.monotonic()
        await asyncio.wait_for(serving, 10)  # exits once idle for its bound
        return first, second, time.monotonic() - t0

    first, second, idle = asyncio.run(scene())
    public.close()
    assert first.endswith(b"ok") and second == b""
    assert len(listener.received) == 1  # the link's target never saw the second client
    assert idle < 3.0
