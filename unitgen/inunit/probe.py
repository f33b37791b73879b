"""The readiness probe that units run as ``ExecStartPost=``.

Standard library only (it runs inside every unit, before anything else is
known to work). It polls an HTTP health path over TCP or a Unix socket about
every 100 ms and exits 0 as soon as it answers 2xx. Refused connections, a
missing socket, 503 and 404 mean "still loading"; 401/403 mean the probe cannot
authenticate and fail at once; at the deadline it exits 1 with one line that
says why. Progress goes to stderr (the journal) every few seconds and to the
unit's status line (``sd_notify STATUS=``, with ``NotifyAccess=all``).

    python -m unitgen.inunit.probe --target 127.0.0.1:40001 --path /health --timeout 30min
    python -m unitgen.inunit.probe --target /run/unitgen-x/http.sock --path /health
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
from dataclasses import dataclass

from unitgen.timespan import format_seconds, parse_timespan

__all__ = ["Attempt", "attempt", "main", "run"]

EXIT_READY = 0
EXIT_NOT_READY = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class Attempt:
    """One poll's outcome: ``ready``, ``wait`` (still loading) or ``fatal``."""

    outcome: str
    detail: str


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _connection(target: str, timeout: float) -> http.client.HTTPConnection:
    if target.startswith("/"):
        return _UnixHTTPConnection(target, timeout)
    host, _, port = target.rpartition(":")
    return http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)


def _summary(status: int, reason: str, body: bytes) -> str:
    text = body[:2000].decode("utf-8", "replace").strip()
    message = ""
    try:
        data = json.loads(text)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            message = str(err.get("message", ""))
        elif isinstance(err, str):
            message = err
        elif isinstance(data, dict) and "detail" in data:
            message = str(data["detail"])
    except ValueError:
        message = text
    message = " ".join(message.split())[:80]
    return f"{status} {message or reason}".strip()


def attempt(target: str, path: str, key: str | None, timeout: float = 5.0) -> Attempt:
    """Poll once; never raises for network trouble."""
    conn = _connection(target, timeout)
    headers = {"Connection": "close", "User-Agent": "unitgen-probe"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read(4096)
    except FileNotFoundError:
        return Attempt("wait", "socket not created yet")
    except ConnectionRefusedError:
        return Attempt("wait", "connection refused")
    except TimeoutError:
        return Attempt("wait", f"no answer within {timeout:g} s")
    except (OSError, http.client.HTTPException) as exc:
        return Attempt("wait", f"{type(exc).__name__}: {exc}".rstrip(": "))
    finally:
        conn.close()
    summary = _summary(resp.status, resp.reason, body)
    if 200 <= resp.status < 300:
        return Attempt("ready", summary)
    if resp.status in (401, 403):
        hint = ("the key the probe sent was refused" if key else
                "the server wants an API key the probe was not given: declare it in the spec "
                "(--api-key in args, or the server's key variable in env)")
        return Attempt("fatal", f"{summary}: {hint}")
    return Attempt("wait", summary)


def _notify(message: str) -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(f"STATUS={message}".encode(), addr)
    except OSError:
        pass  # a status line is a courtesy; readiness does not depend on it


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    _notify(line)


def run(
    target: str,
    path: str,
    timeout: float,
    *,
    key: str | None = None,
    label: str = "",
    interval: float = 0.1,
    progress_every: float = 5.0,
) -> int:
    """Poll until ready (0) or the deadline / a fatal answer (1)."""
    where = f"{label} {target}{path}".strip()
    start = time.monotonic()
    deadline = start + timeout
    next_progress = start + progress_every
    result = Attempt("wait", "no answer yet")
    while True:
        result = attempt(target, path, key, timeout=min(5.0, max(0.5, timeout)))
        now = time.monotonic()
        elapsed = now - start
        if result.outcome == "ready":
            _say(f"{where}: ready after {elapsed:.1f} s ({result.detail})")
            return EXIT_READY
        if result.outcome == "fatal":
            _say(f"{where}: not ready: {result.detail}")
            return EXIT_NOT_READY
        if now >= deadline:
            _say(f"{where}: not ready after {format_seconds(timeout)} "
                 f"(the [health] timeout); last answer: {result.detail}")
            return EXIT_NOT_READY
        if now >= next_progress:
            _say(f"{where}: still loading after {elapsed:.0f} s: {result.detail}")
            next_progress = now + progress_every
        time.sleep(min(interval, max(0.0, deadline - now)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unitgen probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="host:port, [v6]:port, or a Unix socket path")
    p.add_argument("--path", default="/health", help="HTTP path that answers 2xx when ready")
    p.add_argument("--timeout", default="30min", help="deadline, a systemd time span")
    p.add_argument("--key-env", default=None, help="variable holding the bearer key to send")
    p.add_argument("--label", default="", help="word printed before the target (public/private)")
    p.add_argument("--interval", default="100ms", help="time between polls")
    p.add_argument("--progress-every", default="5s", help="time between progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m unitgen.inunit.probe`` and ``unitgen probe``."""
    parser = _parser()
    ns = parser.parse_args(argv)
    try:
        timeout = parse_timespan(ns.timeout)
        interval = parse_timespan(ns.interval)
        progress = parse_timespan(ns.progress_every)
    except ValueError as exc:
        print(f"unitgen probe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    target: str = ns.target
    if not target.startswith("/") and not target.rpartition(":")[2].isdigit():
        print(f"unitgen probe: --target {target!r} is neither host:port nor a socket path",
              file=sys.stderr)
        return EXIT_USAGE
    key = None
    if ns.key_env:
        key = os.environ.get(ns.key_env)
        if not key:
            print(f"unitgen probe: {ns.key_env} is not set; the probe cannot authenticate",
                  file=sys.stderr)
            return EXIT_NOT_READY
    return run(target, ns.path, timeout, key=key, label=ns.label, interval=interval,
               progress_every=progress)


if __name__ == "__main__":
    sys.exit(main())
