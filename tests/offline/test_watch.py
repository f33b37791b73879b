"""The liveness checker (unitgen.inunit.watch) without a manager: what it sends
to NOTIFY_SOCKET while a real stand-in server answers, and once it hangs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import STANDIN, free_port, get, wait_for
from unitgen.inunit import watch


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for the manager's notify socket."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            return out


def standin(port: int, **env: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, str(STANDIN), "--host", "127.0.0.1", "--port",
                             str(port)], env={**os.environ, **env}, stderr=subprocess.DEVNULL)
    assert wait_for(lambda: _answers(port), 10)
    return proc


def _answers(port: int) -> bool:
    try:
        return get(port, timeout=1)[0] == 200
    except OSError:
        return False


def test_feeds_the_watchdog_only_while_the_server_answers(notify_socket, capsys):
    port = free_port()
    server = standin(port, STANDIN_HANG_AFTER="3")  # one answer went to the start check
    try:
        watch.check_loop(f"127.0.0.1:{port}", "/health", 3.0, rounds=2)
        assert received(notify_socket) == ["WATCHDOG=1", "WATCHDOG=1"]
        t0 = time.monotonic()
        watch.check_loop(f"127.0.0.1:{port}", "/health", 3.0, label="private", rounds=3)
        took = time.monotonic() - t0
    finally:
        server.kill()
        server.wait()
    messages = received(notify_socket)
    assert not any("WATCHDOG=1" in m for m in messages), messages
    assert all(m.startswith("STATUS=unhealthy: private 127.0.0.1:") for m in messages), messages
    # each check is bounded by a third of the bound, so three take about the bound
    assert took < 3.0 + 1.5
    err = capsys.readouterr().err
    assert "did not answer (check 1" in err and "no answer within 1 s" in err
    assert "did not answer for 3s" in err and "systemd's watchdog stops the server" in err


def test_arms_the_bound_and_detaches(notify_socket, tmp_path):
    port = free_port()
    server = standin(port)
    argv = [sys.executable, "-I", "-m", "unitgen.inunit.watch", "--target",
            f"127.0.0.1:{port}", "--bound", "30s"]
    log = tmp_path / "stderr"
    try:
        with log.open("w") as err:
            done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=err, timeout=20,
                                  cwd=Path(__file__).resolve().parents[2], check=False)
        assert done.returncode == 0, log.read_text()  # returned at once: the checker runs on
        first = received(notify_socket)
        assert first[0] == "WATCHDOG_USEC=30000000\nWATCHDOG=1", first
        assert "restart after 30s without an answer" in log.read_text()
        assert len(checkers(argv)) == 1
    finally:
        server.kill()
        server.wait()
        for pid in checkers(argv):  # the detached checker, by its pid
            os.kill(pid, 9)


def checkers(argv: list[str]) -> list[int]:
    """Processes whose argv is exactly ``argv`` (this test's detached checker)."""
    want = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == want:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_refuses_a_bound_below_three_seconds():
    assert watch.main(["--target", "127.0.0.1:1", "--bound", "2s", "--foreground"]) == 2
