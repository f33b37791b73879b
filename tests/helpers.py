"""Shared test helpers: inline spec files, installing rendered units into a
sandboxed user manager, and a tiny HTTP client."""

from __future__ import annotations

import http.client
import json
import random
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from unitgen.ops.files import write_files
from unitgen.ops.systemd.sandbox import Sandbox
from unitgen.ops.systemd.specs import render_spec
from unitgen.targets.systemd.render import RenderContext, find_proxyd

# The stand-in server ships in examples/ (the demo uses it too).
STANDIN = Path(__file__).resolve().parent.parent / "examples" / "demo_server.py"
GOLDEN_CTX = RenderContext(
    python="/usr/bin/python3", proxyd="/usr/lib/systemd/systemd-socket-proxyd", scope="system"
)


def write_spec(directory: Path, name: str, text: str) -> Path:
    """Write a spec file into ``directory`` and return its path."""
    path = directory / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def custom_spec(name: str, *, port: int | None = None, env: dict[str, str] | None = None,
                extra: str = "") -> str:
    """A custom-backend spec that runs the stand-in server where unitgen says
    ({host}/{port}); ``extra`` is appended as written (keys, then tables)."""
    env_toml = ", ".join(f'{k} = "{v}"' for k, v in (env or {}).items())
    return (
        f'name = "{name}"\nbackend = "custom"\n' + (f"port = {port}\n" if port else "")
        + f'command = ["{sys.executable}", "{STANDIN}", "--host", "{{host}}", "--port", "{{port}}"]\n'
        + f"env = {{ {env_toml} }}\n{extra}"
    )


def standin_exe(directory: Path) -> Path:
    """An executable that runs the stand-in server with this interpreter."""
    exe = directory / "standin"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {STANDIN} \"$@\"\n")
    exe.chmod(0o755)
    return exe


_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nothing listens on right now, from 10000-19999: below
    the kernel's ephemeral range (32768-60999 here), where the port of any
    outgoing connection of this very process is taken from, so a port handed out
    here cannot be taken as one before the test binds it; and apart from the
    ports unitgen allocates itself (20000-29999 private, 31000-31999 public)."""
    for _ in range(1000):
        port = random.randint(10000, 19999)
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError("no free port in 10000-19999")


def user_ctx() -> RenderContext:
    """Render context for the sandbox's user manager."""
    return RenderContext(python=sys.executable, proxyd=find_proxyd(), scope="user")


def install(box: Sandbox, spec_path: Path) -> list[str]:
    """Render a spec and install its files into the sandbox; daemon-reload."""
    done = render_spec(spec_path, user_ctx())
    units = tuple(f for f in done.files if not f.secret)
    secrets = tuple(f for f in done.files if f.secret)
    write_files(box.unit_dir, done.instance.name, units)
    if secrets:
        write_files(box.root / "home" / ".config" / "unitgen" / "secrets", done.instance.name,
                    secrets)
    box.systemctl("daemon-reload", check=True)
    return [f.name for f in units]


def uninstall(box: Sandbox, name: str) -> None:
    """Stop and delete an instance's units from the sandbox."""
    box.systemctl("stop", f"{name}.socket", f"{name}.service", f"{name}-backend.service")
    for path in box.unit_dir.glob(f"{name}*"):
        path.unlink()
    box.systemctl("reset-failed")
    box.systemctl("daemon-reload")


def prop(box: Sandbox, unit: str, name: str) -> str:
    """One property of a unit, as systemctl show prints it."""
    out = box.systemctl("show", "-p", name, "--value", unit).stdout
    return out.strip()


def get(port: int, path: str = "/health", *, timeout: float = 30.0,
        key: str | None = None, host: str = "127.0.0.1") -> tuple[int, dict[str, Any]]:
    """GET over TCP; returns (status, json body)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = {"raw": body.decode("utf-8", "replace")}
    return resp.status, data


def wait_for(predicate: Any, timeout: float, interval: float = 0.1) -> bool:
    """Poll until ``predicate()`` is true or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def stream_until(sdk: Any, model: str, stop: threading.Event, outcomes: list[str],
                 last: str = ":9") -> None:
    """Stream chat completions from ``model`` with the OpenAI SDK client ``sdk``
    until ``stop`` is set; one outcome per stream: "ok" when its text has the
    stand-in's ``last`` token, else what went wrong (every failure is counted)."""
    while not stop.is_set():
        try:
            chunks = sdk.chat.completions.create(model=model, stream=True, messages=[])
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            outcomes.append("ok" if last in text else f"cut: {text[-40:]}")
        except Exception as exc:
            outcomes.append(f"error: {type(exc).__name__}: {exc}")


def keepalive_until(port: int, model: str, stop: threading.Event,
                    outcomes: list[tuple[float, str]], pause: float = 0.0) -> None:
    """Stream chat completions of ``model`` through the gateway at ``port`` until
    ``stop`` is set, one request after the other (``pause`` seconds apart) on
    one kept-alive connection (a new one only when the server says it closes
    it), the way wrk and most HTTP libraries do, and never retrying: one (start
    time, outcome) per request, "ok" or what went wrong, so every failure counts."""
    body = json.dumps({"model": model, "stream": True, "messages": []})
    conn: http.client.HTTPConnection | None = None
    while not stop.wait(pause):
        t0 = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/v1/chat/completions", body=body,
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            ok = resp.status == 200 and data.rstrip().endswith(b"data: [DONE]")
            outcomes.append((t0, "ok" if ok else f"{resp.status}: {data[-120:]!r}"))
            if resp.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            outcomes.append((t0, f"error: {type(exc).__name__}: {exc}"))
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()


class RecordingUnixListener:
    """A Unix socket that records the first bytes of each connection and answers
    ``answer`` (an HTTP 200 body): what a proxy, probe or checker sent there.
    ``mode`` 0o600 in a 0700 directory made by root: a socket only root may use
    (the target of the link a hostile server plants, issue 25)."""

    def __init__(self, path: Path, answer: bytes = b"ok", mode: int | None = None) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(self.path)
        if mode is not None:
            Path(self.path).chmod(mode)
        self.sock.listen()
        self.received: list[bytes] = []
        self._reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
        threading.Thread(target=self._serve, daemon=True).start()

    @classmethod
    def root_only(cls, directory: Path) -> RecordingUnixListener:
        """``directory/root.sock``, 0600 in a new 0700 directory; answers ROOT-ONLY."""
        directory.mkdir(mode=0o700)
        return cls(directory / "root.sock", b"ROOT-ONLY", 0o600)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.received.append(conn.recv(65536))
                    conn.sendall(self._reply)
                except OSError:
                    pass


def raw_get(port: int, timeout: float = 8.0) -> bytes:
    """What a client of a public port gets for ``GET /v1/models`` (b"" when closed)."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
    return out
