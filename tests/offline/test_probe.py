"""The readiness probe against small scripted HTTP servers (TCP and Unix).

The second half pins the probe's smaller promises (mutation testing found
them unchecked): exact outcomes, what it sends, timeouts on a silent server,
IPv6 targets, how an answer is summarised, the status line it sends to
systemd, and the command-line entry point run in-process."""

from __future__ import annotations

import json
import re
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

from unitgen.inunit.probe import Attempt, attempt, main, run


class Script:
    """Answers in order; the last answer repeats."""

    def __init__(self, answers: list[tuple[int, bytes]]) -> None:
        self.answers = answers
        self.seen_auth: list[str | None] = []
        self.sent: list[int] = []  # the status of every answer given, in order
        self.requests: list[tuple[str, dict[str, str]]] = []  # path and headers of each


def serve(script: Script, server_cls: type[ThreadingHTTPServer], address: Any) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            script.seen_auth.append(self.headers.get("Authorization"))
            script.requests.append((self.path, dict(self.headers.items())))
            status, body = script.answers.pop(0) if len(script.answers) > 1 else script.answers[0]
            script.sent.append(status)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return

    server = server_cls(address, Handler)
    # a short poll interval: shutdown() returns at once, not after 0.5 s per server
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01},
                     daemon=True).start()
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


# --- smaller promises ---------------------------------------------------------

@pytest.fixture
def silent() -> Iterator[str]:
    """A TCP port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_outcomes_are_exact(tcp, tmp_path):
    ready, _ = tcp([(200, b'{"status":"ok"}')])
    loading, _ = tcp([LOADING])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{s.getsockname()[1]}"
    assert attempt(ready, "/health", None) == Attempt("ready", "200 OK")
    assert attempt(loading, "/health", None) == Attempt("wait", "503 Loading model")
    assert attempt(refused, "/health", None) == Attempt("wait", "connection refused")
    assert attempt(str(tmp_path / "no.sock"), "/", None) == Attempt("wait",
                                                                    "socket not created yet")


def test_what_the_probe_sends(tcp):
    target, script = tcp([(200, b"ok")])
    assert run(target, "/v1/models", 5, key="sk-2", interval=0.01) == 0
    ((path, headers),) = script.requests
    assert path == "/v1/models"
    assert headers["Authorization"] == "Bearer sk-2"
    assert headers["User-Agent"] == "unitgen-probe"
    assert headers["Connection"] == "close"  # one connection per poll, none left open


def test_a_silent_server_is_not_yet_and_the_attempt_is_bounded(silent):
    t0 = time.monotonic()
    got = attempt(silent, "/health", None, timeout=0.3)
    assert time.monotonic() - t0 < 2
    assert got == Attempt("wait", "no answer within 0.3 s")


def test_a_silent_unix_socket_is_bounded_too(tmp_path):
    path = str(tmp_path / "quiet.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(path)
        s.listen(8)
        t0 = time.monotonic()
        got = attempt(path, "/health", None, timeout=0.3)
        assert time.monotonic() - t0 < 2
    assert got == Attempt("wait", "no answer within 0.3 s")


def test_run_against_a_silent_server_ends_near_its_deadline(silent, capsys):
    t0 = time.monotonic()
    assert run(silent, "/health", 0.3, interval=0.01) == 1
    assert time.monotonic() - t0 < 1.5
    assert "no answer within" in capsys.readouterr().err


def test_run_sleeps_no_longer_than_the_deadline(tcp):
    target, script = tcp([LOADING])
    t0 = time.monotonic()
    assert run(target, "/health", 0.3, interval=5) == 1
    assert time.monotonic() - t0 < 0.9
    assert len(script.sent) == 2  # one poll, a sleep cut short by the deadline, a last poll


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_target():
    class V6(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    server = serve(Script([(200, b"ok")]), V6, ("::1", 0))
    try:
        assert attempt(f"[::1]:{server.server_address[1]}", "/", None).outcome == "ready"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("status", "body", "detail"), [
    (503, b'{"detail": "warming up"}', "503 warming up"),
    (503, b'{"error": "plain   words\\n here"}', "503 plain words here"),
    (503, b'{"error": {"code": 1}}', "503 Service Unavailable"),
    (503, b"[1, 2]", "503 Service Unavailable"),
    (503, b"", "503 Service Unavailable"),
    (503, b"\xff\xfe still loading", "503 \ufffd\ufffd still loading"),
    (503, json.dumps({"error": {"message": "x" * 200}}).encode(), "503 " + "x" * 80),
    (404, b"  not\tfound  ", "404 not found"),
    (300, b"", "300 Multiple Choices"),
])
def test_how_an_answer_is_summarised(tcp, status, body, detail):
    target, _ = tcp([(status, body)])
    assert attempt(target, "/", None) == Attempt("wait", detail)


def test_only_2xx_is_ready(tcp):
    for status in (204, 299):
        target, _ = tcp([(status, b"")])
        assert attempt(target, "/", None).outcome == "ready", status
    for status in (300, 302, 500):
        target, _ = tcp([(status, b"")])
        assert attempt(target, "/", None).outcome == "wait", status


def test_a_refused_key_is_named_as_such(tcp):
    target, _ = tcp([(403, b'{"error":"forbidden"}')])
    got = attempt(target, "/", "sk-wrong")
    assert got == Attempt("fatal", "403 forbidden: the key the probe sent was refused")
    assert attempt(target, "/", None) == Attempt(
        "fatal", "403 forbidden: the server wants an API key the probe was not given: declare it "
                 "in the spec (--api-key in args, or the server's key variable in env)")


def test_output_lines_name_the_target_and_the_label(tcp, capsys):
    target, _ = tcp([LOADING, (200, b"ok")])
    assert run(target, "/health", 5, interval=0.01) == 0
    (line,) = capsys.readouterr().err.splitlines()
    m = re.fullmatch(rf"{re.escape(target)}/health: ready after (\d+\.\d) s \(200 ok\)", line)
    assert m and float(m[1]) < 5, line  # the time since the probe started
    target, _ = tcp([(200, b"ok")])
    assert run(target, "/h", 5, label="public", interval=0.01) == 0
    assert capsys.readouterr().err.startswith(f"public {target}/h: ready after ")


def test_progress_lines_come_every_progress_interval_not_every_poll(tcp, capsys):
    target, script = tcp([LOADING])
    assert run(target, "/health", 0.6, interval=0.01, progress_every=0.25) == 1
    err = capsys.readouterr().err.splitlines()
    progress = [line for line in err if "still loading after" in line]
    assert len(script.sent) > 10  # it polled often...
    assert 1 <= len(progress) <= 3, err  # ...and spoke about every 0.25 s
    target, _ = tcp([LOADING, LOADING, (200, b"ok")])
    assert run(target, "/health", 5, interval=0.01, progress_every=5) == 0
    assert "still loading" not in capsys.readouterr().err  # nothing before the first interval


@pytest.fixture
def notify_socket(tmp_path, monkeypatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock


def test_each_line_also_goes_to_the_units_status(tcp, notify_socket, capsys):
    target, _ = tcp([LOADING, (200, b"ok")])
    assert run(target, "/health", 5, interval=0.01, progress_every=0) == 0
    lines = capsys.readouterr().err.splitlines()
    got = [notify_socket.recv(4096).decode() for _ in lines]
    assert got == [f"STATUS={line}" for line in lines]


def test_abstract_notify_socket(tcp, monkeypatch):
    name = f"unitgen-probe-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        target, _ = tcp([(200, b"ok")])
        assert run(target, "/health", 5) == 0
        assert sock.recv(4096).decode().startswith(f"STATUS={target}/health: ready after")


def test_a_missing_notify_socket_is_harmless(tcp, tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    target, _ = tcp([(200, b"ok")])
    assert run(target, "/health", 5) == 0


# --- the command line, in-process -------------------------------------------

def test_main_probes_with_every_option(tcp, capsys, monkeypatch):
    target, script = tcp([LOADING, (200, b"ok")])
    monkeypatch.setenv("PROBE_TEST_KEY", "sk-3")
    code = main(["--target", target, "--path", "/ready", "--timeout", "5s", "--interval", "10ms",
                 "--progress-every", "0", "--label", "private", "--key-env", "PROBE_TEST_KEY"])
    assert code == 0
    assert [p for p, _ in script.requests] == ["/ready", "/ready"]
    assert script.seen_auth == ["Bearer sk-3"] * 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"private {target}/ready: still loading after 0 s: 503 Loading model"
    assert err[1].startswith(f"private {target}/ready: ready after ")


def test_main_defaults(tcp, capsys):
    target, script = tcp([LOADING, (200, b"ok")])
    t0 = time.monotonic()
    assert main(["--target", target]) == 0
    assert time.monotonic() - t0 >= 0.045  # one default interval (50 ms) between polls
    assert [p for p, _ in script.requests] == ["/health", "/health"]
    assert script.seen_auth == [None, None]
    assert capsys.readouterr().err.startswith(f"{target}/health: ready after ")  # no label


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["--target", "127.0.0.1:1", "--timeout", "soon"], 2, "unitgen probe: "),
    (["--target", "127.0.0.1:1", "--interval", "often"], 2, "unitgen probe: "),
    (["--target", "127.0.0.1:1", "--progress-every", "x"], 2, "unitgen probe: "),
    (["--target", "localhost"], 2, "--target 'localhost' is neither host:port nor a socket path"),
    (["--target", "127.0.0.1:1", "--key-env", "PROBE_TEST_UNSET"], 1,
     "PROBE_TEST_UNSET is not set; the probe cannot authenticate"),
])
def test_main_refusals(argv, code, message, capsys, monkeypatch):
    monkeypatch.delenv("PROBE_TEST_UNSET", raising=False)
    assert main(argv) == code
    assert message in capsys.readouterr().err


def test_main_unix_target_and_usage(tmp_path, capsys):
    path = tmp_path / "s.sock"
    assert main(["--target", str(path), "--timeout", "200ms", "--interval", "50ms"]) == 1
    assert "socket not created yet" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2 and "--target" in capsys.readouterr().err


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith("usage: unitgen probe [-h] --target TARGET")
    assert "The readiness probe that units run as ``ExecStartPost=``." in out
    assert "Standard library only" not in out  # the first paragraph only
    for option, text in [
        ("--target TARGET", "host:port, [v6]:port, or a Unix socket path"),
        ("--path PATH", "HTTP path that answers 2xx when ready"),
        ("--timeout TIMEOUT", "deadline, a systemd time span"),
        ("--key-env KEY_ENV", "variable holding the bearer key to send"),
        ("--label LABEL", "word printed before the target (public/private)"),
        ("--interval INTERVAL", "time between polls"),
        ("--progress-every PROGRESS_EVERY", "time between progress lines"),
    ]:
        assert f"{option} {text}" in out, option


def test_main_takes_an_ipv6_target(capsys):
    with socket.socket(socket.AF_INET6 if _ipv6_loopback() else socket.AF_INET) as s:
        s.bind(("::1" if _ipv6_loopback() else "127.0.0.1", 0))
        port = s.getsockname()[1]
    target = f"[::1]:{port}" if _ipv6_loopback() else f"127.0.0.1:{port}"
    # not a usage error (2): a reachable shape, just nobody listening (1)
    assert main(["--target", target, "--timeout", "100ms", "--interval", "20ms"]) == 1
    assert "connection refused" in capsys.readouterr().err


def test_main_passes_its_interval_on(tcp):
    target, script = tcp([LOADING] * 15 + [(200, b"ok")])
    t0 = time.monotonic()
    assert main(["--target", target, "--interval", "1ms"]) == 0
    assert time.monotonic() - t0 < 1.2  # 15 polls 1 ms apart, not 100 ms apart
    assert len(script.sent) == 16


def test_run_polls_every_50ms_by_default(tcp):
    target, script = tcp([LOADING, LOADING, (200, b"ok")])
    t0 = time.monotonic()
    assert run(target, "/health", 10) == 0
    assert 0.09 <= time.monotonic() - t0 < 1.0
    assert script.sent == [503, 503, 200]


def test_a_body_that_never_ends_does_not_hold_the_probe():
    # a server that promises a huge body and sends only part of it: the probe
    # reads what it needs for the summary and moves on
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 10000000\r\n\r\n"
                             + b'{"error": "busy"}' + b" " * 8000)
                time.sleep(3)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        t0 = time.monotonic()
        got = attempt(f"127.0.0.1:{port}", "/health", None, timeout=2)
        assert time.monotonic() - t0 < 1.5
        thread.join(timeout=5)
    assert got.outcome == "wait" and got.detail.startswith("503 ")


def test_unix_requests_name_localhost(tmp_path):
    class UnixServer(ThreadingHTTPServer):
        address_family = socket.AF_UNIX

        def server_bind(self) -> None:
            self.socket.bind(self.server_address)
            self.server_name, self.server_port = "localhost", 0

    path = str(tmp_path / "h.sock")
    script = Script([(200, b"ok")])
    server = serve(script, UnixServer, path)
    try:
        assert attempt(path, "/health", None).outcome == "ready"
    finally:
        server.shutdown()
        server.server_close()
    assert script.requests[0][1]["Host"] == "localhost"


def test_a_server_that_hangs_up_is_not_yet():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()

        def hang_up() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)

        thread = threading.Thread(target=hang_up, daemon=True)
        thread.start()
        got = attempt(f"127.0.0.1:{server.getsockname()[1]}", "/health", None, timeout=2)
        thread.join(timeout=5)
    assert got == Attempt("wait", "the server closed the connection without an answer")


def test_a_server_that_keeps_the_connection_open_is_read_by_its_length():
    """Some servers ignore Connection: close; the answer ends at its Content-Length."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                time.sleep(3)  # keeps the connection open

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        t0 = time.monotonic()
        got = attempt(f"127.0.0.1:{port}", "/health", None, timeout=2)
        assert time.monotonic() - t0 < 1.0
        thread.join(timeout=5)
    assert got.outcome == "ready"
