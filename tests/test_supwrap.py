"""The in-program wrappers of the supervisor target, run as real processes:
fd 0 becomes fd 3 with LISTEN_FDS/LISTEN_PID, secrets come from the env file,
``hold`` hands its socket over, ``listener_pid`` finds a server by its socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

from tests.helpers import STANDIN, get, wait_for
from unitgen.inunit.supwrap import listener_pid, read_env_file

WRAP = [sys.executable, "-m", "unitgen.inunit.supwrap"]


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_exec_fd3_env_file_and_same_pid(tmp_path):
    sock = _listening()
    port = sock.getsockname()[1]
    record = tmp_path / "rec.json"
    secret = tmp_path / "x.env"
    secret.write_text("MY_KEY=k=with=equals and spaces\n")
    env = {**os.environ, "STANDIN_RECORD": str(record)}
    proc = subprocess.Popen([*WRAP, "exec", "--fd3", "--env-file", str(secret),
                             "--mkdir", str(tmp_path / "run" / "d"), "--",
                             sys.executable, str(STANDIN), "--", "-x"],
                            stdin=sock.fileno(), env=env)
    try:
        sock.close()  # only the server holds it now
        assert wait_for(record.exists, 10)
        code, body = get(port)
        rec = json.loads(record.read_text())
        assert code == 200 and body["pid"] == proc.pid == rec["pid"]  # exec kept the pid
        assert rec["env"]["LISTEN_FDS"] == "1" and rec["env"]["LISTEN_PID"] == str(proc.pid)
        assert rec["env"]["MY_KEY"] == "k=with=equals and spaces"
        assert rec["argv"] == ["--", "-x"]
        assert (tmp_path / "run" / "d").stat().st_mode & 0o777 == 0o700
    finally:
        proc.kill()
        proc.wait()


def test_hold_hands_the_socket_and_keeps_it_across_a_crash(tmp_path):
    sock = _listening()
    port = sock.getsockname()[1]
    serve = str(tmp_path / "h" / "listen.sock")
    holder = subprocess.Popen([*WRAP, "hold", "--serve", serve], stdin=sock.fileno())
    sock.close()
    servers: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(2):
            server = subprocess.Popen([*WRAP, "exec", "--fd3-from", serve, "--",
                                       sys.executable, str(STANDIN)])
            servers.append(server)
            code, body = get(port, timeout=20)
            assert code == 200 and body["pid"] == server.pid
            server.send_signal(signal.SIGKILL)
            server.wait()
            # the holder keeps the socket: a client now is queued, not refused
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
    finally:
        for p in [*servers, holder]:
            p.kill()
            p.wait()


def test_listener_pid_finds_tcp_and_unix_servers(tmp_path):
    path = str(tmp_path / "s.sock")
    code = ("import socket,sys,time\n"
            "a=socket.socket(); a.bind(('127.0.0.1',0)); a.listen()\n"
            f"u=socket.socket(socket.AF_UNIX); u.bind({path!r}); u.listen()\n"
            "print(a.getsockname()[1], flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        assert listener_pid(f"127.0.0.1:{port}") == proc.pid
        assert listener_pid(path) == proc.pid
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and listener_pid(path) is not None:
        time.sleep(0.05)
    assert listener_pid(path) is None


def test_env_file_format(tmp_path):
    path = tmp_path / "e.env"
    path.write_text("A=1\n# comment\n\nB==x\n")
    assert read_env_file(str(path)) == {"A": "1", "B": "=x"}


def test_usage_errors():
    done = subprocess.run([*WRAP, "exec", "/bin/true"], capture_output=True, text=True)
    assert done.returncode == 2 and "after --" in done.stderr
    done = subprocess.run([*WRAP, "exec", "--"], capture_output=True, text=True)
    assert done.returncode == 2
