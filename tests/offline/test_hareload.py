"""The gateway's ExecReload (``unitgen.inunit.hareload``) against a scripted
runtime API and a stand-in master: it returns only once a worker other than
the one before the signal serves, several answers in a row, and fails at its
bound when none does."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from unitgen.inunit import hareload

MASTER = """\
import signal, sys, time
signal.signal(signal.SIGUSR2, lambda *_: open(sys.argv[1], "w").close())
print("ready", flush=True)
time.sleep(60)
"""


# HAProxy's master while it starts: SIGUSR2 blocked, then its handlers reset
# (ignored for a moment), which throws a pending one away, then caught
STARTING = """\
import signal, sys, time
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
print("ready", flush=True)
time.sleep(float(sys.argv[2]))
signal.signal(signal.SIGUSR2, signal.SIG_IGN)
signal.signal(signal.SIGUSR2, lambda *_: open(sys.argv[1], "w").close())
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR2])
time.sleep(60)
"""


def _master(flag: Path, script: str = MASTER, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", script, str(flag), *args],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


@pytest.fixture
def master(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A process that notes SIGUSR2 in a file, as HAProxy's master reloads on it."""
    flag = tmp_path / "signalled"
    proc = _master(flag)
    try:
        yield proc.pid, flag
    finally:
        proc.kill()
        proc.wait()


def serve(sock: Path, answer: Callable[[int], tuple[int, int]]) -> threading.Event:
    """A runtime API answering ``show info`` with ``answer(n)`` = (Pid, Stopping)
    for its n-th connection, until the returned event is set."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(sock))
    srv.listen(16)
    srv.settimeout(0.05)
    done = threading.Event()

    def loop() -> None:
        n = 0
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(100)
                pid, stopping = answer(n)
                conn.sendall(f"Name: HAProxy\nPid: {pid}\nStopping: {stopping}\n\n".encode())
            n += 1
        srv.close()

    threading.Thread(target=loop, daemon=True).start()
    return done


def test_it_returns_once_the_new_worker_serves(master, tmp_path):
    pid, flag = master
    # after the signal: the old worker twice more (once stopping), then the new one
    script = [(100, 0), (100, 1), (100, 0)]
    served = serve(tmp_path / "admin.sock", lambda n: (100, 0) if not flag.exists() else
                   script.pop(0) if script else (200, 0))
    try:
        t0 = time.monotonic()
        assert hareload.reload(pid, str(tmp_path / "admin.sock"), timeout=5) is None
        assert flag.exists() and not script and time.monotonic() - t0 < 3
    finally:
        served.set()


def test_an_old_worker_that_still_serves_starts_the_count_again(master, tmp_path):
    pid, flag = master
    after: list[int] = []

    def answer(n: int) -> tuple[int, int]:
        if not flag.exists():
            return 100, 0
        after.append(n)
        return (100, 0) if len(after) % 3 == 0 else (200, 0)  # never 3 new in a row

    served = serve(tmp_path / "admin.sock", answer)
    try:
        why = hareload.reload(pid, str(tmp_path / "admin.sock"), timeout=0.5)
    finally:
        served.set()
    assert why is not None and "no new HAProxy worker answered within 500ms" in why


def test_a_master_that_keeps_its_worker_fails_the_reload_with_why(master, tmp_path):
    pid, _ = master
    served = serve(tmp_path / "admin.sock", lambda n: (100, 0))
    try:
        done = subprocess.run([sys.executable, "-I", "-m", "unitgen.inunit.hareload",
                               f"--pid={pid}", "--admin", str(tmp_path / "admin.sock"),
                               "--timeout", "300ms"],
                              capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PYTHONPATH": str(Path(hareload.__file__)
                                                                   .parents[2])})
    finally:
        served.set()
    assert done.returncode == 1
    assert "the previous routes still hold" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("argv", [["--pid=0", "--admin", "/x"], ["--pid=abc", "--admin", "/x"],
                                  ["--pid=1", "--admin", "/x", "--timeout", "soon"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
    assert hareload.main(argv) == hareload.EXIT_USAGE
    assert "unitgen hareload:" in capsys.readouterr().err


def test_a_gone_master_is_said(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert hareload.worker(str(tmp_path / "none.sock")) is None
    assert hareload.main([f"--pid={proc.pid}", "--admin", str(tmp_path / "none.sock"),
                          "--timeout", "1s"]) == hareload.EXIT_FAILED


def test_the_signal_waits_until_the_master_takes_it(tmp_path):
    # sent at once, the signal was thrown away with the master's reset handlers,
    # and the reload failed at its bound with the previous routes still there
    flag = tmp_path / "signalled"
    proc = _master(flag, STARTING, "0.4")
    served = serve(tmp_path / "admin.sock", lambda n: (100, 0) if not flag.exists() else (200, 0))
    try:
        assert hareload.takes_signal(proc.pid, signal.SIGUSR2) is False
        assert hareload.reload(proc.pid, str(tmp_path / "admin.sock"), timeout=5) is None
        assert flag.exists()
    finally:
        served.set()
        proc.kill()
        proc.wait()


def test_a_master_that_never_takes_the_signal_fails_at_the_bound(tmp_path):
    flag = tmp_path / "signalled"
    proc = _master(flag, STARTING, "60")
    try:
        why = hareload.reload(proc.pid, str(tmp_path / "none.sock"), timeout=0.3)
        assert why is not None and "did not take SIGUSR2 within 300ms" in why, why
        assert not flag.exists()
    finally:
        proc.kill()
        proc.wait()


HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


@pytest.mark.skipif(not Path(HAPROXY).exists(), reason="HAProxy is not installed")
def test_a_reload_right_after_haproxy_starts_is_not_lost(tmp_path):
    # a real master asked to reload as soon as its first worker answers: one in
    # four such reloads was lost before the signal waited for the master
    admin = tmp_path / "admin.sock"
    (tmp_path / "h.cfg").write_text(f"global\n  stats socket {admin} mode 600 level admin\n"
                                    "defaults\n  mode http\n  timeout client 5s\n"
                                    "  timeout server 5s\n  timeout connect 1s\n")
    # and asked before any worker answers: the first worker never passes for the new one
    for first_answer in [True] * 6 + [False] * 6:
        admin.unlink(missing_ok=True)
        log = tmp_path / "haproxy.log"
        with log.open("wb") as err:
            proc = subprocess.Popen([HAPROXY, "-W", "-f", str(tmp_path / "h.cfg")],
                                    stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 10
            while first_answer and hareload.worker(str(admin)) is None:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.005)
            assert hareload.reload(proc.pid, str(admin), timeout=5) is None, log.read_text()
            assert wait_reloaded(log), log.read_text()  # the master did reload
        finally:
            proc.terminate()
            proc.wait(10)


def wait_reloaded(log: Path) -> bool:
    """HAProxy's master said it reloaded (its log lines come a moment late)."""
    deadline = time.monotonic() + 5
    while "Reloading HAProxy" not in log.read_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_gone_or_zombie_master_is_said_at_once(tmp_path):
    # it was taken for a master whose status cannot be read: signalled, then
    # waited for 30 s "did it refuse the new configuration?"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert wait_for_zombie(proc.pid)
        with pytest.raises(ProcessLookupError):
            hareload.takes_signal(proc.pid, signal.SIGUSR2)
    finally:
        proc.wait()
    with pytest.raises(ProcessLookupError):
        hareload.takes_signal(proc.pid, signal.SIGUSR2)
    t0 = time.monotonic()
    assert hareload.main([f"--pid={proc.pid}", "--admin", str(tmp_path / "none.sock"),
                          "--timeout", "20s"]) == hareload.EXIT_FAILED
    assert time.monotonic() - t0 < 15


def wait_for_zombie(pid: int) -> bool:
    """The child exited and is not reaped yet."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
        if state == "Z":
            return True
        time.sleep(0.01)
    return False
