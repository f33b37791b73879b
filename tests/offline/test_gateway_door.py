"""What the gateway lets through to its members (issue 25, items 3, 4, 5, 8
and 9), against a real HAProxy running the rendered configuration (its socket on
fd 3, as the socket unit passes it) and members that record every request they
get: only the OpenAI paths, one ``model`` a body, never the client's gateway
key (a member's own key instead), slow clients that cannot lock others out,
and an exporter that wants its own key. No service manager: the live tier
deploys the same files."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unitgen.features.gateway.patterns import ROUTED_PATHS
from unitgen.features.gateway.plan import GatewayPlan, GatewaySettings, Member, route_keys
from unitgen.features.gateway.render import (
    CONFIG,
    FILES,
    MEMBER_KEYS,
    GatewayPaths,
    member_keys_map,
    render_gateway,
)
from unitgen.inunit.gwkeys import write_maps

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
pytestmark = pytest.mark.skipif(not Path(HAPROXY).exists(),
                                reason="HAProxy is not installed (./setup installs it)")


@dataclass
class Seen:
    """What the members received: (member, method, path, headers, body) per request."""

    requests: list[tuple[str, str, str, dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _member(seen: Seen, name: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with seen.lock:
                seen.requests.append((name, self.command, self.path,
                                      {k.lower(): v for k, v in self.headers.items()}, raw))
            asked: dict[str, Any] = {}
            try:  # the model a Python server reads: the last one
                asked = json.loads(raw)
                model = asked.get("model")
                time.sleep(float(asked.get("sleep", 0)))  # a slow answer, when asked for
            except (ValueError, AttributeError, TypeError):
                model = None
            # what vLLM and llama-server say of a whole answer's tokens
            body = json.dumps({"model": model, "path": self.path, "server": name,
                               "usage": {"prompt_tokens": 7, "completion_tokens": 5}}).encode()
            later = float(asked.get("body_after", 0)) if isinstance(asked, dict) else 0.0
            chunked = isinstance(asked, dict) and asked.get("chunked") is True
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if later:  # the head first, the body some time after it (a large answer)
                self.wfile.flush()
                time.sleep(later)
            if chunked:  # in two pieces, the second after a pause
                half = len(body) // 2
                for piece in (body[:half], body[half:]):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                    time.sleep(later)
                self.wfile.write(b"0\r\n\r\n")
            else:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer()

        def do_POST(self) -> None:
            self._answer()

        def log_message(self, format: str, *args: Any) -> None:
            return

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            return  # HAProxy closing a kept-alive connection: nothing to report

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class Door:
    """A running gateway in front of recording members (routes ``m1``, ``m2``)."""

    port: int
    seen: Seen
    metrics_port: int = 0
    master: int = 0  # HAProxy's master process
    directory: Path = Path()  # its files, runtime ones included (admin.sock)

    def request(self, method: str, path: str, body: bytes | None = None,
                key: str | None = None, **more: str) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        headers = {"Content-Type": "application/json", **more}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, json.loads(data) if data else {}
        finally:
            conn.close()


def _dup(fds: list[int]) -> None:
    for target, fd in enumerate(fds, 3):  # as the socket unit passes them: fd 3, fd 4
        if fd != target:
            os.dup2(fd, target)


@contextlib.contextmanager
def door(tmp: Path, gw: GatewaySettings, keys: dict[str, str] | None = None) -> Iterator[Door]:
    """HAProxy with the configuration unitgen renders for ``gw`` and two members:
    ``m1`` (also called ``alias``) and ``m2``, with their own API keys ``keys``."""
    keys = keys or {}
    seen = Seen()
    servers = {n: _member(seen, n) for n in ("m1", "m2")}
    plan = GatewayPlan(gw, tuple(
        Member(n, f"127.0.0.1:{s.server_address[1]}", (n, "alias") if n == "m1" else (n,),
               key_env="KEY" if n in keys else None) for n, s in servers.items()),
        keys=tuple(keys.items()))
    sent, problems = route_keys(plan)
    assert not problems, problems
    paths = GatewayPaths(str(tmp), str(tmp))
    for f in render_gateway(gw, plan.routes, paths, keyed=set(sent)):
        (tmp / f.name).write_text(f.text, encoding="utf-8")
    (tmp / MEMBER_KEYS).write_text(member_keys_map(gw.name, sent), encoding="utf-8")
    # what the unit's ExecStartPre=+ makes of the keys files (unitgen.inunit.gwkeys)
    if gw.api_keys_file or gw.metrics_keys_file:
        write_maps(gw.api_keys_file, str(tmp / FILES["models"]), str(tmp), gw.metrics_keys_file)
    listeners = [socket.create_server(("127.0.0.1", 0), backlog=128)
                 for _ in range(2 if gw.metrics else 1)]
    fds = [s.fileno() for s in listeners]
    # the sockets on fd 3 (and 4), as the socket unit passes them (the child only
    # dup2s, then execs)
    log = (tmp / "haproxy.log").open("wb")  # its stderr: what the journal would get
    proc = subprocess.Popen([HAPROXY, "-W", "-f", str(tmp / CONFIG)],
                            pass_fds=(3, 4, *fds), preexec_fn=lambda: _dup(fds),  # noqa: PLW1509
                            stdout=subprocess.DEVNULL, stderr=log)
    port = listeners[0].getsockname()[1]
    metrics_port = listeners[-1].getsockname()[1] if gw.metrics else 0
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                if Door(port, seen).request("GET", "/unitgen/health")[0] == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "haproxy.log"
                                                                        ).read_text()
            time.sleep(0.05)
        yield Door(port, seen, metrics_port, proc.pid, tmp)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        for s in listeners:
            s.close()
        for server in servers.values():
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    with door(tmp_path_factory.mktemp("door"), GatewaySettings("door")) as d:
        yield d


def _chat(model: str = "m1") -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": model}).encode()


# The admin endpoints of the servers behind a gateway (issue 25, item 4), and
# spellings of the routed paths that reach other handlers on some server.
ADMIN_PATHS = [
    "/update_weights_from_disk", "/release_memory_occupation", "/configure_logging",  # SGLang
    "/slots/0?action=erase", "/lora-adapters",  # llama-server
    "/sleep", "/wake_up", "/collective_rpc",  # vLLM (dev mode)
    "/v1/load_lora_adapter",  # vLLM (runtime LoRA)
    "/v1/../update_weights_from_disk", "/v1/chat/completions/../../sleep",
    "/v1/%2e%2e/sleep", "/v1/%2E%2E/collective_rpc", "/v1/chat%2fcompletions",
    "//v1/chat/completions", "/v1/chat/completions/", "/v1/./chat/completions",
    "/V1/chat/completions", "/v1/chat/completions;x=1",
]


@pytest.mark.parametrize("path", ADMIN_PATHS)
def test_only_the_openai_paths_reach_a_member(gateway, path):
    before = len(gateway.seen.requests)
    status, body = gateway.request("POST", path, _chat())
    assert status == 404, (path, body)
    assert body["error"]["type"] == "not_found_error", body  # the gateway's own, OpenAI's shape
    assert "/v1/chat/completions" in body["error"]["message"]
    assert len(gateway.seen.requests) == before, gateway.seen.requests[before:]


@pytest.mark.parametrize("path", ROUTED_PATHS)
def test_the_openai_paths_are_routed(gateway, path):
    status, body = gateway.request("POST", f"{path}?api-version=1", _chat("alias"))
    assert status == 200 and body["path"] == f"{path}?api-version=1", body


@pytest.mark.parametrize("body", [
    b'{"model": "m1", "messages": [], "model": "lora-secret"}',
    b'{"model": "m1", "mod\\u0065l": "lora-secret"}',
    b'{"model": "m1", "MODEL": 1, "m\\u006Fdel": "lora-secret"}',
    b'{"model": "m1", "x": {"y": [1, {"z": "}"}]}, "model": "lora-secret"}',
    b'{"model": "m1"} {"model": "lora-secret"}',
    b'{"model": "m1", "x": ' + b"[" * 400 + b"]" * 400 + b'}',  # deeper than the pattern reads
])
def test_a_body_that_names_its_model_twice_is_refused(gateway, body):
    before = len(gateway.seen.requests)
    status, answer = gateway.request("POST", "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
    assert "once" in answer["error"]["message"]
    assert len(gateway.seen.requests) == before


def test_a_model_key_nested_in_a_tool_is_not_a_second_model(gateway):
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"model": {"type": "string"}}}}}
    body = {"tools": [tool], "messages": [{"role": "user", "content": '"model": "x"'}],
            "model": "m1", "response_format": {"model": "nested"}}
    status, answer = gateway.request("POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200 and answer["model"] == "m1", answer


_KEY_SPELLINGS = ['"model"', '"mod\\u0065l"', '"\\u006D\\u006f\\u0064\\u0065\\u006c"']
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3),
    st.dictionaries(st.sampled_from(["model", "a", 'q"', "\\"]), inner, max_size=3)), max_leaves=8)
_pairs = st.lists(st.one_of(
    st.tuples(st.sampled_from(_KEY_SPELLINGS), st.sampled_from(['"m1"', '"alias"', '"other"'])),
    st.tuples(st.sampled_from(['"messages"', '"x"', '"models"', '"model "']),
              _values.map(json.dumps))), max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rest=_pairs, ws=st.sampled_from(["", " ", "\n\t"]))
def test_the_model_that_is_routed_is_the_model_the_member_reads(gateway, rest, ws):
    # whatever the body, a member never serves a model other than the one routed
    text = "{" + f",{ws}".join([f'"model":{ws}"m1"', *(f"{k}{ws}:{v}" for k, v in rest)]) + "}"
    models = [v for k, v in json.loads(text, object_pairs_hook=lambda kv: kv) if k == "model"]
    status, answer = gateway.request("POST", "/v1/chat/completions", text.encode())
    if len(models) == 1:
        assert status == 200 and answer["model"] == "m1", (text, answer)
    else:
        assert status == 400, (text, answer)


def _slow(source: str, port: int) -> socket.socket:
    """A connection from ``source`` that sends the start of a request and stops."""
    s = socket.socket()
    s.bind((source, 0))
    s.settimeout(10)
    with contextlib.suppress(OSError):  # one over the bound may be closed already
        s.connect(("127.0.0.1", port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    return s


def _closed(s: socket.socket) -> str:
    """How the gateway ended a slow connection: ``closed`` or the status it sent."""
    try:
        data = s.recv(4096)
    except TimeoutError:
        return "still open"
    except OSError:  # reset, or never connected
        return "closed"
    return data.split(b"\r\n", 1)[0].decode() if data else "closed"


def test_slow_clients_from_one_address_lock_no_one_out(tmp_path):
    # issue 25, item 5: 20 connections trickling a header held all of
    # max_connections for client_timeout (10 min)
    gw = GatewaySettings("slow", max_connections=20, request_timeout=2.0)
    with door(tmp_path, gw) as d:
        slow = [_slow("127.0.0.2", d.port) for _ in range(20)]
        try:
            t0 = time.monotonic()
            for s in slow:  # they keep sending, a byte at a time
                with contextlib.suppress(OSError):
                    s.send(b"a")
            status, answer = d.request("POST", "/v1/chat/completions", _chat())
            assert status == 200 and answer["model"] == "m1", answer
            assert time.monotonic() - t0 < 1.5
            # and none of them holds its connection longer than request_timeout
            ends = [_closed(s) for s in slow]
            waited = time.monotonic() - t0
            assert waited < 5.0, waited
            assert ends.count("closed") >= 10, ends  # over the per-address bound: at once
            # the others at request_timeout (HAProxy's own 408 for a head cut short)
            assert all(e == "closed" or e.startswith("HTTP/1.1 408 ") for e in ends), ends
        finally:
            for s in slow:
                s.close()


GATEWAY_KEY = "sk-gateway-5e1f"


def test_a_member_gets_its_own_key_and_never_the_gateways(tmp_path):
    # issue 25, item 3: the client's gateway key reached every member
    keys = tmp_path / "keys"
    keys.write_text(f"{GATEWAY_KEY}\n")
    keys.chmod(0o600)
    gw = GatewaySettings("keyed", api_keys_file=str(keys))
    with door(tmp_path, gw, keys={"m1": "sk-member-m1"}) as d:
        for model in ("m1", "alias", "m2"):
            status, answer = d.request("POST", "/v1/chat/completions", _chat(model),
                                       key=GATEWAY_KEY, **{"X-Api-Key": GATEWAY_KEY})
            assert status == 200 and answer["server"] == model.replace("alias", "m1"), answer
        got = {(name, h.get("authorization")) for name, _, _, h, _ in d.seen.requests}
        assert got == {("m1", "Bearer sk-member-m1"), ("m2", None)}, got
        assert not [h for *_, h, _ in d.seen.requests if "x-api-key" in h]
        assert GATEWAY_KEY.encode() not in repr(d.seen.requests).encode()
        before = len(d.seen.requests)
        assert d.request("POST", "/v1/chat/completions", _chat("m1"), key="sk-member-m1")[0] == 401
        assert len(d.seen.requests) == before


def test_the_key_comes_as_a_bearer_token_whatever_the_schemes_case(tmp_path):
    # "bearer KEY" was refused (a scheme is case-insensitive, RFC 9110) and a bare
    # "KEY" with no scheme was let in; the exporter's door the same
    keys = tmp_path / "keys"
    keys.write_text(f"{GATEWAY_KEY}\n")
    keys.chmod(0o600)
    scrapers = tmp_path / "metrics.keys"
    scrapers.write_text("sk-prometheus\n")
    scrapers.chmod(0o600)
    gw = GatewaySettings("scheme", api_keys_file=str(keys), metrics="127.0.0.1:9101",
                         metrics_keys_file=str(scrapers))
    with door(tmp_path, gw) as d:
        said = {}
        for value in (f"Bearer {GATEWAY_KEY}", f"bearer {GATEWAY_KEY}", f"BEARER  {GATEWAY_KEY}",
                      GATEWAY_KEY, f"Basic {GATEWAY_KEY}", f"Bearer{GATEWAY_KEY}"):
            said[value.replace(GATEWAY_KEY, "K")] = d.request(
                "POST", "/v1/chat/completions", _chat("m1"), Authorization=value)[0]
        assert said == {"Bearer K": 200, "bearer K": 200, "BEARER  K": 200, "K": 401,
                        "Basic K": 401, "BearerK": 401}, said
        for value, status in (("bearer sk-prometheus", 200), ("sk-prometheus", 401)):
            conn = http.client.HTTPConnection("127.0.0.1", d.metrics_port, timeout=10)
            conn.request("GET", "/metrics", headers={"Authorization": value})
            assert conn.getresponse().status == status, value
            conn.close()


def test_without_gateway_keys_the_client_speaks_to_a_member_for_itself(tmp_path):
    # a gateway without api_keys_file is no door to a member's key: the client's
    # Authorization passes through, and the member's own key is never added
    with door(tmp_path, GatewaySettings("open"), keys={"m1": "sk-member-m1"}) as d:
        d.request("POST", "/v1/chat/completions", _chat("m1"), key="sk-client")
        d.request("POST", "/v1/chat/completions", _chat("m1"))
        got = [h.get("authorization") for *_, h, _ in d.seen.requests]
        assert got == ["Bearer sk-client", None], got


def _scrape(port: int, key: str | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_the_exporter_answers_only_a_scraper_with_its_key(tmp_path):
    # issue 25, item 9: it showed HAProxy's version and every route and server
    keys = tmp_path / "metrics.keys"
    keys.write_text("sk-prometheus\n")
    keys.chmod(0o600)
    api = tmp_path / "api.keys"
    api.write_text(f"{GATEWAY_KEY}\n")
    api.chmod(0o600)
    gw = GatewaySettings("prom", api_keys_file=str(api), metrics="0.0.0.0:9101",
                         metrics_keys_file=str(keys))
    with door(tmp_path, gw) as d:
        for key in (None, GATEWAY_KEY, "sk-wrong"):
            status, body = _scrape(d.metrics_port, key)
            assert status == 401 and "haproxy" not in body, (key, body[:200])
        status, body = _scrape(d.metrics_port, "sk-prometheus")
        assert status == 200 and 'haproxy_process_build_info{version="2.' in body, body[:300]
        assert 'server="m1"' in body  # what it shows: routes and servers
