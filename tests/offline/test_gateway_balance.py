"""How a gateway shares a route's requests among its replicas (issue 28,
cache-aware choice), against a real HAProxy running the rendered configuration
and members that say who answered: a conversation keeps to one replica across
its turns (so that replica's prompt cache holds it), conversations spread over
the replicas, no replica takes more than 1.5x its share in flight, and a
replica that is full, down or drained passes its turn. ``leastconn`` stays
selectable per route."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.offline.test_gateway_door import HAPROXY
from unitgen.errors import SpecError
from unitgen.features.gateway.files import gateway_files
from unitgen.features.gateway.plan import GatewayPlan, GatewaySettings, Member
from unitgen.features.gateway.render import CONFIG, MEMBER_KEYS, GatewayPaths, render_gateway
from unitgen.inunit.hareload import runtime_api

pytestmark = pytest.mark.skipif(not Path(HAPROXY).exists(),
                                reason="HAProxy is not installed (./setup installs it)")


def _replica(name: str, delay: float) -> ThreadingHTTPServer:
    """A member that answers its own name after ``delay`` seconds."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(delay)
            body = name.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return

    class Server(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            return

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@dataclass
class Gateway:
    port: int
    admin: Path
    servers: dict[str, ThreadingHTTPServer]

    def ask(self, body: dict[str, Any], **headers: str) -> str:
        """The replica that answered."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                         headers={"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
            data = resp.read().decode()
            assert resp.status == 200, (resp.status, data)
            return data
        finally:
            conn.close()

    def at_once(self, bodies: list[dict[str, Any]]) -> list[tuple[str, float]]:
        """Send them all together: (who answered, seconds) each."""
        out: list[tuple[str, float]] = []
        lock = threading.Lock()

        def one(body: dict[str, Any]) -> None:
            t0 = time.monotonic()
            who = self.ask(body)
            with lock:
                out.append((who, time.monotonic() - t0))

        threads = [threading.Thread(target=one, args=(b,)) for b in bodies]
        for t in threads:
            t.start()
            time.sleep(0.02)  # in this order: the load each one sees is known
        for t in threads:
            t.join()
        return out


@contextlib.contextmanager
def gateway(tmp: Path, names: list[str], *, delay: float = 0.0, balance: str = "conversation",
            max_concurrent: int | None = None) -> Iterator[Gateway]:
    """HAProxy with the configuration unitgen renders for replicas ``names`` of route ``m``."""
    servers = {n: _replica(n, delay) for n in names}
    plan = GatewayPlan(GatewaySettings("bal"), tuple(
        Member(n, f"127.0.0.1:{s.server_address[1]}", ("m",), max_concurrent=max_concurrent,
               balance=balance) for n, s in servers.items()))
    for f in render_gateway(plan.settings, plan.routes, GatewayPaths(str(tmp), str(tmp))):
        (tmp / f.name).write_text(f.text, encoding="utf-8")
    (tmp / MEMBER_KEYS).write_text("", encoding="utf-8")
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    fd = listener.fileno()
    proc = subprocess.Popen([HAPROXY, "-W", "-f", str(tmp / CONFIG)], pass_fds=(3, fd),
                            preexec_fn=lambda: os.dup2(fd, 3) if fd != 3 else None,  # noqa: PLW1509
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    gw = Gateway(listener.getsockname()[1], tmp / "admin.sock", servers)
    try:
        deadline = time.monotonic() + 10
        while not gw.admin.exists() or not _answers(gw.port):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.05)
        yield gw
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        listener.close()
        for s in servers.values():
            s.shutdown()
            s.server_close()


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/unitgen/health")
        return conn.getresponse().status == 200
    return False


SYSTEM = "You are a careful assistant. " * 40  # shared by every conversation


def turns(i: int, n: int = 3) -> list[dict[str, Any]]:
    """Conversation ``i``'s requests: each turn carries the whole history."""
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": f"question {i}"}]
    out = []
    for t in range(n):
        out.append({"messages": list(messages), "model": "m", "stream": True})
        messages += [{"role": "assistant", "content": f"answer {t}"},
                     {"role": "user", "content": f"and then {t}?"}]
    return out


def test_a_conversation_keeps_to_one_replica_and_conversations_spread(tmp_path):
    with gateway(tmp_path, ["ra", "rb", "rc"]) as gw:
        homes = {}
        for i in range(30):
            seen = {gw.ask(body) for body in turns(i)}
            assert len(seen) == 1, f"conversation {i} moved: {seen}"
            homes[i] = seen.pop()
        # a conversation that starts with its user message: the same from its first turn
        plain = [{"messages": [{"role": "user", "content": "hi there"}], "model": "m"},
                 {"messages": [{"role": "user", "content": "hi there"},
                               {"role": "assistant", "content": "hello"},
                               {"role": "user", "content": "more"}], "model": "m"}]
        assert len({gw.ask(b) for b in plain}) == 1
        # the other names of a conversation, each stable whatever else the body says
        for key in ({"user": "alice"}, {"prompt_cache_key": "c-17"}):
            assert len({gw.ask({**b, **key}) for b in turns(99, 2) + turns(98, 2)}) == 1
        assert len({gw.ask(b, **{"X-Session-Id": "s-1"}) for b in turns(5) + turns(6)}) == 1
        completions = [{"prompt": "Once upon a time " * 20 + tail, "model": "m"}
                       for tail in ("", "there was", "there was a gateway")]
        assert len({gw.ask(b) for b in completions}) == 1
    spread = Counter(homes.values())
    assert set(spread) == {"ra", "rb", "rc"} and min(spread.values()) >= 5, spread


def test_leastconn_stays_selectable(tmp_path):
    with gateway(tmp_path, ["ra", "rb"], balance="leastconn") as gw:
        seen = {gw.ask(b) for b in turns(1, 6)}
    assert seen == {"ra", "rb"}  # fewest in flight: the turns take turns
    cfg = (tmp_path / CONFIG).read_text(encoding="utf-8")
    assert "use-server" not in cfg


def _home(gw: Gateway, body: dict[str, Any]) -> str:
    return gw.ask(body)


def test_no_replica_takes_more_than_one_and_a_half_times_its_share(tmp_path):
    with gateway(tmp_path, ["ra", "rb"], delay=1.0) as gw:
        body = turns(3, 1)[0]
        home = _home(gw, body)
        got = Counter(who for who, _ in gw.at_once([body] * 8))
    assert got[home] == 6 and sum(got.values()) == 8, got  # 1.5 x 4 in flight


def test_a_full_replica_passes_its_turn(tmp_path):
    with gateway(tmp_path, ["ra", "rb"], delay=1.0, max_concurrent=1) as gw:
        body = turns(4, 1)[0]
        home = _home(gw, body)
        got = gw.at_once([body, body])
    assert {who for who, _ in got} == {"ra", "rb"}, got
    assert max(s for _, s in got) < 1.8, got  # neither waited for the other
    assert home in {who for who, _ in got}


def test_a_down_or_drained_replica_passes_its_turn(tmp_path):
    with gateway(tmp_path, ["ra", "rb"]) as gw:
        conversations = [turns(i, 1)[0] for i in range(12)]
        homes = [gw.ask(b) for b in conversations]
        gone = homes[0]
        runtime_api(gw.admin, f"set server r1/{gone} weight 0")
        assert gone not in {gw.ask(b) for b in conversations}
        runtime_api(gw.admin, f"set server r1/{gone} weight 100%")
        assert [gw.ask(b) for b in conversations] == homes  # back: the same homes
        gw.servers[gone].shutdown()
        gw.servers[gone].server_close()  # connections refused: retried on the other
        assert gone not in {gw.ask(b) for b in conversations}


def test_replicas_that_disagree_on_their_balance_are_refused(tmp_path):
    plan = GatewayPlan(GatewaySettings("g"), (
        Member("qa", "127.0.0.1:1", ("q",)), Member("qb", "127.0.0.1:2", ("q",),
                                                    balance="leastconn")))
    with pytest.raises(SpecError) as err:
        gateway_files("g", plan, GatewayPaths(str(tmp_path), str(tmp_path)), "gw",
                      ("qb.toml", "balance"))
    assert "qa, qb are replicas (route q) with different balance (conversation, leastconn)" \
        in str(err.value)
    assert "qb.toml" in str(err.value)
