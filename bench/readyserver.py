#!/usr/bin/env python3
"""A stand-in that "loads" for a while (503 meanwhile, like llama-server) and
writes down, on the system-wide monotonic clock, when it became able to answer
200 and when it first did. The readiness rows measure from those instants.

Started the way llama-server is (``--host PATH.sock``) or with ``--port N`` on
loopback. Environment: BENCH_LOAD_SECONDS (0), BENCH_RECORD (file for
``{"ready_at": t, "first_200_at": t}``). Standard library only.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

READY_AT = time.monotonic() + float(os.environ.get("BENCH_LOAD_SECONDS", "0"))
FIRST_200: list[float] = []


def record() -> None:
    """Write both instants (the first 200 once it happened)."""
    path = os.environ.get("BENCH_RECORD")
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"ready_at": READY_AT, "first_200_at": FIRST_200[0] if FIRST_200 else None},
                      fh)
        os.replace(tmp, path)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        now = time.monotonic()
        ok = now >= READY_AT
        body = b'{"status":"ok"}' if ok else b'{"error":{"message":"Loading model"}}'
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if ok and not FIRST_200:
            FIRST_200.append(now)
            record()

    def log_message(self, format: str, *args: Any) -> None:
        return


class UnixServer(HTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        self.socket.bind(self.server_address)
        self.server_name, self.server_port = "localhost", 0

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)


def _arg(argv: list[str], name: str) -> str | None:
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def main() -> None:
    """Listen where the argv says and serve until stopped."""
    argv = sys.argv[1:]
    record()
    host = _arg(argv, "--host")
    server: HTTPServer
    if host and host.startswith("/"):
        if os.path.exists(host):
            os.unlink(host)
        server = UnixServer(host, Handler)  # type: ignore[arg-type]  # AF_UNIX takes a path
    else:
        server = HTTPServer(("127.0.0.1", int(_arg(argv, "--port") or "8080")), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
