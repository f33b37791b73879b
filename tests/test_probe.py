"""The readiness probe against small scripted HTTP servers (TCP and Unix)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from unitgen.inunit.probe import attempt, run


class Script:
    """Answers in order; the last answer repeats."""

    def __init__(self, answers: list[tuple[int, bytes]]) -> None:
        self.answers = answers
        self.seen_auth: list[str | None] = []
        self.sent: list[int] = []  # the status of every answer given, in order


def serve(script: Script, server_cls: type[ThreadingHTTPServer], address: Any) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            script.seen_auth.append(self.headers.get("Authorization"))
            status, body = script.answers.pop(0) if len(script.answers) > 1 else script.answers[0]
            script.sent.append(status)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return

    server = server_cls(address, Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def tcp() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def start(answers: list[tuple[int, bytes]]) -> tuple[str, Script]:
        script = Script(answers)
        server = serve(script, ThreadingHTTPServer, ("127.0.0.1", 0))
        servers.append(server)
        return f"127.0.0.1:{server.server_address[1]}", script

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


LOADING = (503, b'{"error":{"message":"Loading model"}}')


def test_waits_through_503_then_ready(tcp, capsys):
    target, script = tcp([LOADING, LOADING, LOADING, (200, b'{"status":"ok"}')])
    assert run(target, "/health", 10, interval=0.01, progress_every=0) == 0
    # every loading answer was asked for and waited through, and nothing after ready
    assert script.sent == [503, 503, 503, 200]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4, err
    assert all("still loading after" in line and line.endswith(": 503 Loading model")
               for line in err[:3]), err
    assert "ready after" in err[3] and err[3].endswith("(200 OK)"), err


def test_404_while_loading_is_not_yet(tcp, capsys):
    target, script = tcp([(404, b"not found"), (404, b"not found"), (200, b"ok")])
    assert run(target, "/health", 10, interval=0.01, progress_every=0) == 0
    assert script.sent == [404, 404, 200]
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.rsplit(": ", 1)[1] for line in err[:2]] == ["404 not found"] * 2, err
    assert "ready after" in err[2] and err[2].endswith("(200 ok)"), err


def test_deadline_gives_a_one_line_reason(tcp, capsys):
    target, _ = tcp([LOADING])
    t0 = time.monotonic()
    assert run(target, "/health", 0.5, interval=0.05, progress_every=0.2) == 1
    assert time.monotonic() - t0 < 3
    err = capsys.readouterr().err.strip().splitlines()
    assert "still loading after" in err[0] and "503 Loading model" in err[0]
    assert err[-1].endswith("not ready after 500ms (the [health] timeout); last answer: "
                            "503 Loading model")


def test_401_fails_at_once_and_says_why(tcp, capsys):
    target, _ = tcp([(401, b'{"error":"unauthorized"}')])
    t0 = time.monotonic()
    assert run(target, "/health", 30, interval=0.01) == 1
    assert time.monotonic() - t0 < 2
    assert "wants an API key" in capsys.readouterr().err


def test_sends_the_bearer_key(tcp):
    target, script = tcp([(200, b"ok")])
    assert attempt(target, "/health", "sk-1").outcome == "ready"
    assert script.seen_auth == ["Bearer sk-1"]


def test_refused_and_missing_socket_are_not_yet(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert attempt(f"127.0.0.1:{port}", "/health", None).detail == "connection refused"
    assert attempt(str(tmp_path / "none.sock"), "/", None).detail == "socket not created yet"


def test_unix_socket(tmp_path):
    class UnixServer(ThreadingHTTPServer):
        address_family = socket.AF_UNIX

        def server_bind(self) -> None:
            self.socket.bind(self.server_address)
            self.server_name, self.server_port = "localhost", 0

    path = str(tmp_path / "s.sock")
    server = serve(Script([(200, b"ok")]), UnixServer, path)
    try:
        assert attempt(path, "/health", None).outcome == "ready"
    finally:
        server.shutdown()
        server.server_close()


def test_module_entry_point_usage_errors(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "unitgen.inunit.probe", "--target", "nope"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "neither host:port" in done.stderr
    done = subprocess.run([sys.executable, "-m", "unitgen.inunit.probe", "--target", "127.0.0.1:1",
                           "--key-env", "UNSET_KEY_X"], capture_output=True, text=True)
    assert done.returncode == 1 and "UNSET_KEY_X is not set" in done.stderr


def test_probe_imports_only_the_standard_library():
    code = ("import sys, unitgen.inunit.probe; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('click', 'jinja2', 'psutil', 'dbus_fast', 'pynvml')]; print(bad)")
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "[]"
