#!/usr/bin/env python3
"""A stand-in model server for the demo and the tests: standard library only.

It reads its listen address from a model server's argv, whatever the backend:
``--uds PATH`` (vLLM), ``--host PATH.sock`` (llama-server, llama-box),
``--host H --port N`` (SGLang, vox-box, custom), or fd 3 when systemd passes a
socket (``LISTEN_FDS``). Behaviour comes from environment variables:

STANDIN_LOAD_SECONDS   time to "load the model" before answering 200 (default 0)
STANDIN_LOADING        while loading: ``refuse`` (not listening yet), ``503`` or ``404``
STANDIN_NEVER_READY    ``1``: keep loading for ever
STANDIN_KEY_ENV        name of a variable holding the API key; requests without
                       ``Authorization: Bearer <key>`` get 401 (health included; run
                       as vLLM, only paths under /v1, as vLLM checks them)
STANDIN_KEY_SCOPE      with STANDIN_KEY_ENV: check the key only on paths that start with
                       this (``/v1``, as vLLM does), on every method, POST included
STANDIN_AUTH_LOG       file to append each request's ``Authorization`` header to (one a line)
STANDIN_RECORD         file to write ``{"argv": [...], "env": {...}, "pid": N}`` to at start
STANDIN_EXTRA_PORT     also listen on this loopback TCP port (a misconfigured server)
STANDIN_WORKERS        start this many child processes, like tensor-parallel workers
STANDIN_HANG_AFTER     after answering this many requests, accept but never answer
                       (a wedged CUDA context behind a live HTTP layer)
STANDIN_HANG_ONCE      with STANDIN_HANG_AFTER: a file created when the hang starts; a
                       server started while it exists does not hang (so a restart heals)
STANDIN_EXIT_AFTER     exit with status 3 this many seconds after starting (a crash)
POST (OpenAI-shaped) answers a chat completion naming the request's "model" and
                       the server's own name (STANDIN_NAME); with "stream": true, as
                       server-sent events over STANDIN_STREAM_SECONDS (default 0.5 s)
STANDIN_UNLISTEN_AFTER close the listening socket this many seconds after starting and
                       live on (a server whose HTTP layer died: its port is free)
STANDIN_SLOW_PATH      requests to this path take STANDIN_SLOW_SECONDS (a long generation)
STANDIN_STREAM_SECONDS stream answers to paths other than /health, /v1/models and /
                       over this many seconds (10 chunks, like tokens), then a last
                       line ``{"done": true, ...}``

Run as vLLM (``serve MODEL ...``, how unitgen starts a vLLM instance), it is as
strict as vLLM about names: it answers only a ``model`` it serves (each value of
``--served-model-name``, else MODEL), and anything else with vLLM's 404 ("The
model `x` does not exist."); ``/v1/models`` lists those names.

Every answer is JSON and carries the server's pid, so a test can tell restarts apart.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

STARTED = time.monotonic()
_COUNT_LOCK = threading.Lock()
_ANSWERED = [0]
_HANG_ONCE = os.environ.get("STANDIN_HANG_ONCE")
_WILL_HANG = bool(os.environ.get("STANDIN_HANG_AFTER")) and not (
    _HANG_ONCE and os.path.exists(_HANG_ONCE))


def _hang_if_due() -> None:
    """Once the configured number of requests was answered, block this request for ever."""
    if not _WILL_HANG:
        return
    with _COUNT_LOCK:
        _ANSWERED[0] += 1
        due = _ANSWERED[0] > int(os.environ.get("STANDIN_HANG_AFTER", "0"))
    if due:
        if _HANG_ONCE and not os.path.exists(_HANG_ONCE):
            with open(_HANG_ONCE, "w", encoding="utf-8") as fh:
                fh.write(str(os.getpid()))
        while True:
            time.sleep(3600)


def _arg(argv: list[str], *names: str) -> str | None:
    for i, word in enumerate(argv):
        for name in names:
            if word == name and i + 1 < len(argv):
                return argv[i + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None


def served_names(argv: list[str]) -> list[str] | None:
    """The model names a server started as vLLM (``serve MODEL ...``) answers
    to: the values of ``--served-model-name`` (vLLM reads ``_`` as ``-``), else
    MODEL. None for any other server: those answer any name."""
    if not argv or argv[0] != "serve":
        return None
    names: list[str] = []
    for i, word in enumerate(argv):
        flag, eq, value = word.partition("=")
        if flag.replace("_", "-") != "--served-model-name":
            continue
        if eq:
            names.append(value)
            continue
        for more in argv[i + 1:]:
            if more.startswith("-"):
                break
            names.append(more)
    model = argv[1] if len(argv) > 1 and not argv[1].startswith("-") else ""
    return names or [model]


SERVED = served_names(sys.argv[1:]) if __name__ == "__main__" else None


def loaded() -> bool:
    if os.environ.get("STANDIN_NEVER_READY") == "1":
        return False
    return time.monotonic() - STARTED >= float(os.environ.get("STANDIN_LOAD_SECONDS", "0"))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps({**payload, "pid": os.getpid()}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, seconds: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        lines = [{"chunk": i, "pid": os.getpid()} for i in range(10)]
        lines.append({"done": True, "path": self.path, "pid": os.getpid()})
        for i, line in enumerate(lines):
            if i:
                time.sleep(seconds / 10)
            data = (json.dumps(line) + "\n").encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _refused(self, *, post: bool = False) -> bool:
        """Record the request's key; answer 401 when it is not the server's. Run as
        vLLM: only under /v1, every method, in vLLM's words; else a POST only with
        STANDIN_KEY_SCOPE."""
        log = os.environ.get("STANDIN_AUTH_LOG")
        if log:
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(f"{self.headers.get('Authorization')}\n")
        key_env = os.environ.get("STANDIN_KEY_ENV")
        key = os.environ.get(key_env) if key_env else None
        if not key or self.headers.get("Authorization") == f"Bearer {key}":
            return False
        if SERVED is not None:
            if not self.path.startswith("/v1"):
                return False
            self._send(401, {"error": "Unauthorized"})  # vLLM's words
            return True
        scope = os.environ.get("STANDIN_KEY_SCOPE")
        if (scope is None and post) or (scope is not None and not self.path.startswith(scope)):
            return False
        self._send(401, {"error": {"message": "invalid api key"}})
        return True

    def do_GET(self) -> None:
        _hang_if_due()
        if self._refused():
            return
        if not loaded():
            mode = os.environ.get("STANDIN_LOADING", "503")
            status = 404 if mode == "404" else 503
            self._send(status, {"error": {"message": "Loading model"}})
            return
        if self.path == os.environ.get("STANDIN_SLOW_PATH"):
            time.sleep(float(os.environ.get("STANDIN_SLOW_SECONDS", "60")))
        if self.path == "/v1/models" and SERVED is not None:
            self._send(200, {"status": "ok", "path": self.path, "object": "list", "data": [
                {"id": n, "object": "model", "owned_by": "vllm"} for n in SERVED]})
        elif self.path in ("/health", "/v1/models", "/"):
            self._send(200, {"status": "ok", "path": self.path})
        elif os.environ.get("STANDIN_STREAM_SECONDS"):
            self._stream(float(os.environ["STANDIN_STREAM_SECONDS"]))
        else:
            self._send(200, {"status": "ok", "path": self.path, "echo": True})

    def do_POST(self) -> None:
        """An OpenAI-shaped chat completion (or its stream) naming the request's model."""
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self._refused(post=True):
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        if not loaded():
            self._send(503, {"error": {"message": "Loading model"}})
            return
        model = str(body.get("model", "")) if isinstance(body, dict) else ""
        if SERVED is not None and model and model not in SERVED:
            # vLLM's answer (vllm/entrypoints/openai: _check_model)
            self._send(404, {"error": {"message": f"The model `{model}` does not exist.",
                                       "type": "NotFoundError", "param": "model",
                                       "code": 404}})
            return
        who = os.environ.get("STANDIN_NAME", "standin")
        if isinstance(body, dict) and body.get("stream"):
            self._sse(model, who, float(os.environ.get("STANDIN_STREAM_SECONDS", "0.5")))
            return
        self._send(200, {"id": "chatcmpl-standin", "object": "chat.completion", "created": 0,
                         "model": model, "server": who, "bytes": len(raw),
                         "choices": [{"index": 0, "finish_reason": "stop", "message": {
                             "role": "assistant", "content": f"{who} answers {model}"}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                   "total_tokens": 2}})

    def _sse(self, model: str, who: str, seconds: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(10):
            if i:
                time.sleep(seconds / 10)
            delta = {"content": f"{who}:{i} "} if i else {"role": "assistant", "content": ""}
            event = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 0,
                     "model": model, "choices": [{"index": 0, "delta": delta,
                                                  "finish_reason": None}]}
            data = f"data: {json.dumps(event)}\n\n".encode()
            try:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            except OSError:
                print(f"standin: client went away after chunk {i}", file=sys.stderr, flush=True)
                return
        data = b"data: [DONE]\n\n"
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
        self.wfile.flush()

    def log_message(self, format: str, *args: Any) -> None:
        return


class UnixServer(ThreadingHTTPServer):
    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        self.socket.bind(self.server_address)
        self.server_name, self.server_port = "localhost", 0

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)


def make_server(argv: list[str]) -> ThreadingHTTPServer:
    if os.environ.get("LISTEN_FDS") and os.environ.get("LISTEN_PID") == str(os.getpid()):
        sock = socket.socket(fileno=3)
        server = ThreadingHTTPServer(sock.getsockname()[:2], Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        return server
    uds = _arg(argv, "--uds")
    host = _arg(argv, "--host")
    if uds is None and host is not None and (host.endswith(".sock") or host.startswith("/")):
        uds = host
    if uds is not None:
        if os.path.exists(uds):
            os.unlink(uds)
        return UnixServer(uds, Handler)  # type: ignore[arg-type]  # AF_UNIX takes a path
    port = int(_arg(argv, "--port") or "8080")
    return ThreadingHTTPServer((host or "127.0.0.1", port), Handler)


def main() -> None:
    argv = sys.argv[1:]
    if os.getpid() == 1:
        # the first process of a container: the kernel drops SIGTERM to it unless
        # it has a handler (podman stop would wait for its SIGKILL)
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    record = os.environ.get("STANDIN_RECORD")
    if record:
        with open(record, "w", encoding="utf-8", errors="surrogateescape") as fh:
            json.dump({"argv": argv, "env": dict(os.environ), "pid": os.getpid()}, fh)
    print(f"standin: pid {os.getpid()} argv {argv}", file=sys.stderr, flush=True)
    if os.environ.get("STANDIN_LOADING") == "refuse" and not os.environ.get("LISTEN_FDS"):
        while not loaded():
            time.sleep(0.05)
    for _ in range(int(os.environ.get("STANDIN_WORKERS", "0"))):
        # children that outlive a kill of the parent alone, like vLLM's TP workers
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"],
                         start_new_session=True)
    extra = os.environ.get("STANDIN_EXTRA_PORT")
    if extra:
        side = ThreadingHTTPServer(("127.0.0.1", int(extra)), Handler)
        threading.Thread(target=side.serve_forever, daemon=True).start()
    server = make_server(argv)
    print("standin: listening", file=sys.stderr, flush=True)
    exit_after = os.environ.get("STANDIN_EXIT_AFTER")
    if exit_after:
        def crash() -> None:
            time.sleep(float(exit_after))
            print("standin: crashing (STANDIN_EXIT_AFTER)", file=sys.stderr, flush=True)
            os._exit(3)
        threading.Thread(target=crash, daemon=True).start()
    unlisten = os.environ.get("STANDIN_UNLISTEN_AFTER")
    if unlisten:
        def close_listener() -> None:
            time.sleep(float(unlisten))
            print("standin: closing the listener (STANDIN_UNLISTEN_AFTER)", file=sys.stderr,
                  flush=True)
            server.shutdown()
            server.server_close()
        threading.Thread(target=close_listener, daemon=True).start()
    server.serve_forever()
    if unlisten:
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
