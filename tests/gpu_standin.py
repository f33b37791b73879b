#!/usr/bin/env python3
"""A stand-in for vLLM and SGLang as a GPU pool sees them (issue 27): they hold
GPU memory, and can release it and keep their process (sleep) and take it
back (wake). Standard library only; run as the server's program.

Which server it is comes from its argv, as unitgen writes it:
``serve MODEL ...`` is vLLM, ``-m sglang.launch_server --model-path MODEL ...``
is SGLang. It listens where the argv says (``--uds``, or ``--host``/``--port``).

Like the real servers, at their edges:

* vLLM answers 404 to a model it does not serve (``--served-model-name``, else
  the model), checks its key (``--api-key``, ``VLLM_API_KEY``) only under
  ``/v1``, and refuses connections until it is loaded. Its sleep endpoints
  exist only with ``VLLM_SERVER_DEV_MODE=1``: ``POST /sleep?level=N`` (the
  level is a query parameter; a body is not read), ``POST /wake_up``,
  ``GET /is_sleeping`` -> ``{"is_sleeping": bool}``; sleeping without
  ``--enable-sleep-mode`` is an error. Asleep, completions answer 503.
* SGLang answers any model, checks its key (``--api-key``) on every path but
  ``/health*`` and ``/metrics*``, and answers 503 until loaded.
  ``/release_memory_occupation`` and ``/resume_memory_occupation`` (GET or
  POST) take a JSON body (an empty one is FastAPI's 422) and need
  ``--enable-memory-saver``.

Memory: on the fake NVML (tests/fake_nvml), through the scenario's
``held_dir``: from the start of its load it holds, on each GPU of
``CUDA_VISIBLE_DEVICES`` (UUIDs or indexes; GPU 0 without it), vLLM's
``--gpu-memory-utilization`` (0.9) or SGLang's ``--mem-fraction-static``
(0.88) of that GPU's total, or ``STANDIN_GPU_BYTES``; asleep it keeps
``STANDIN_ASLEEP_BYTES`` (0); on SIGTERM it lets go and exits.

STANDIN_LOAD_SECONDS   time to load (default 0); STANDIN_WAKE_SECONDS: to wake
STANDIN_EVENTS         a file to append one JSON line per sleep and wake to
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

ARGV = sys.argv[1:]
SGLANG = "--model-path" in ARGV
STATE: dict[str, Any] = {"loaded": False, "asleep": False}
LOCK = threading.Lock()
EMPTY = object()  # an answer without a body (FastAPI's Response(status_code=200))


def arg(*names: str, many: bool = False) -> list[str]:
    """The values of an option (several words for ``many``), the last one given."""
    out: list[str] = []
    for i, word in enumerate(ARGV):
        name, eq, value = word.partition("=")
        if name not in names:
            continue
        if eq:
            out = [value]
            continue
        out = []
        for nxt in ARGV[i + 1:]:
            if nxt.startswith("--") or (out and not many):
                break
            out.append(nxt)
    return out


def model() -> str:
    if SGLANG:
        return (arg("--model-path") or [""])[0]
    return ARGV[1] if len(ARGV) > 1 and ARGV[0] == "serve" else ""


def served_names() -> list[str]:
    return arg("--served-model-name", many=not SGLANG) or [model()]


def api_keys() -> list[str]:
    keys = arg("--api-key", many=not SGLANG)
    if not keys and not SGLANG and os.environ.get("VLLM_API_KEY"):
        keys = [os.environ["VLLM_API_KEY"]]
    return keys


# --- memory on the fake GPU ---------------------------------------------------


def _scenario() -> dict[str, Any]:
    path = os.environ.get("FAKE_NVML_SCENARIO")
    if not path:
        return {}
    with open(path, encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def my_gpus() -> dict[str, int]:
    """UUID -> total of the GPUs it may use."""
    gpus = _scenario().get("gpus", [])
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",") if v]
    out = {}
    for v in visible:
        gpu = next((g for i, g in enumerate(gpus) if v in (g["uuid"], str(i))), None)
        if gpu is not None:
            out[gpu["uuid"]] = int(gpu["total"])
    return out


def loaded_bytes(total: int) -> int:
    if os.environ.get("STANDIN_GPU_BYTES"):
        return int(os.environ["STANDIN_GPU_BYTES"])
    flag = "--mem-fraction-static" if SGLANG else "--gpu-memory-utilization"
    fraction = float((arg(flag) or ["0.88" if SGLANG else "0.9"])[0])
    return int(fraction * total)


def hold(asleep: bool) -> None:
    """Say what it holds now on each of its GPUs (nothing: no file)."""
    directory = _scenario().get("held_dir")
    if not directory:
        return
    gpus = {u: int(os.environ.get("STANDIN_ASLEEP_BYTES", "0")) if asleep else loaded_bytes(t)
            for u, t in my_gpus().items()}
    path = os.path.join(directory, f"{os.getpid()}.json")
    if not any(gpus.values()):
        let_go()
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"pid": os.getpid(), "gpus": gpus}, fh)
    os.chmod(tmp, 0o644)  # as the driver shows it to every process (a sandboxed server: 0077)
    os.replace(tmp, path)


def let_go() -> None:
    directory = _scenario().get("held_dir")
    if directory:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, f"{os.getpid()}.json"))


def event(**what: Any) -> None:
    path = os.environ.get("STANDIN_EVENTS")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**what, "pid": os.getpid()}) + "\n")


def set_asleep(asleep: bool, **what: Any) -> None:
    with LOCK:
        if not asleep:
            time.sleep(float(os.environ.get("STANDIN_WAKE_SECONDS", "0")))
        STATE["asleep"] = asleep
        hold(asleep)
    event(event="sleep" if asleep else "wake", **what)


# --- HTTP ---------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def send(self, status: int, payload: object = EMPTY) -> None:
        """JSON (``None`` is FastAPI's ``null``), or an empty body."""
        body = b"" if payload is EMPTY else json.dumps(payload).encode()
        self.send_response(status)
        if payload is not EMPTY:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def key_ok(self, path: str) -> bool:
        keys = api_keys()
        if not keys:
            return True
        guarded = (not path.startswith(("/health", "/metrics")) if SGLANG
                   else path.startswith("/v1"))
        return not guarded or self.headers.get("Authorization") in [f"Bearer {k}" for k in keys]

    def do_GET(self) -> None:
        self.route("GET")

    def do_POST(self) -> None:
        self.route("POST")

    def route(self, method: str) -> None:
        url = urlsplit(self.path)
        raw = self.last_body = self.body() if method == "POST" else b""
        if not self.key_ok(url.path):
            self.send(401, {"error": "Unauthorized"})
        elif not STATE["loaded"]:
            self.send(503, {"error": {"message": "Loading model"}})
        elif SGLANG:
            self.sglang(method, url.path, raw)
        else:
            self.vllm(method, url.path, parse_qs(url.query))

    def vllm(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        dev = os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
        if dev and (method, path) in (("POST", "/sleep"), ("POST", "/wake_up")):
            if "--enable-sleep-mode" not in ARGV:
                self.send(500, {"error": "sleep mode is not enabled: start with "
                                         "--enable-sleep-mode"})
                return
            if path == "/sleep":
                set_asleep(True, level=int(query.get("level", ["1"])[0]))
            else:
                set_asleep(False)
            self.send(200)
        elif dev and (method, path) == ("GET", "/is_sleeping"):
            self.send(200, {"is_sleeping": STATE["asleep"]})
        else:
            self.common(method, path, vllm=True)

    def sglang(self, method: str, path: str, raw: bytes) -> None:
        if path in ("/release_memory_occupation", "/resume_memory_occupation"):
            try:
                json.loads(raw)
            except ValueError:
                self.send(422, {"detail": [{"type": "missing", "loc": ["body"],
                                            "msg": "Field required"}]})
                return
            if "--enable-memory-saver" not in ARGV:
                self.send(400, {"error": {"message": "memory saver is not enabled: start with "
                                                     "--enable-memory-saver"}})
                return
            set_asleep(path.startswith("/release"))
            self.send(200, None)
        else:
            self.common(method, path, vllm=False)

    def common(self, method: str, path: str, *, vllm: bool) -> None:
        if path == "/health":
            self.send(200)
        elif path == "/v1/models":
            self.send(200, {"object": "list", "data": [{"id": n, "object": "model"}
                                                       for n in served_names()]})
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            self.complete(vllm)
        else:
            self.send(404, {"detail": "Not Found"})

    def complete(self, vllm: bool) -> None:
        try:
            name = str(json.loads(self.last_body or b"{}").get("model", ""))
        except (ValueError, AttributeError):
            name = ""
        if vllm and name not in served_names():
            self.send(404, {"object": "error", "message": f"The model `{name}` does not exist.",
                            "type": "NotFoundError", "param": None, "code": 404})
        elif STATE["asleep"]:
            self.send(503, {"error": {"message": "the model is sleeping"}})
        else:
            self.send(200, {"object": "chat.completion", "model": name, "pid": os.getpid(),
                            "choices": [{"index": 0, "message": {"role": "assistant",
                                                                 "content": "ok"}}]})

    last_body: bytes = b""

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


def main() -> None:
    def stop(*_: object) -> None:
        let_go()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    hold(False)  # the load allocates first
    load = float(os.environ.get("STANDIN_LOAD_SECONDS", "0"))
    uds = None if SGLANG else next(iter(arg("--uds")), None)
    if not SGLANG:
        time.sleep(load)  # vLLM listens once loaded: connections are refused until then
    if uds:
        if os.path.exists(uds):
            os.unlink(uds)
        server: ThreadingHTTPServer = UnixServer(uds, Handler)  # type: ignore[arg-type]
    else:
        server = ThreadingHTTPServer(((arg("--host") or ["127.0.0.1"])[0],
                                      int((arg("--port") or ["8000"])[0])), Handler)
    if SGLANG:
        threading.Timer(load, lambda: STATE.update(loaded=True)).start()
    else:
        STATE["loaded"] = True
    print(f"gpu standin: {'sglang' if SGLANG else 'vllm'} pid {os.getpid()} serving",
          file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
