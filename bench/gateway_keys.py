"""Rows about the keys' policy (issue 28): what a request pays for the gateway
knowing who asks (its key's name from a map, tracked in a stick-table, its
models, its rate and its bound in flight checked, a JSON log line, the
answer's tokens read and counted) against the gateway as it was before
(``gateway_before28.cfg``: the key matched against a list, nothing more).

Two HAProxy processes side by side in one run, each with its socket on fd 3 as
the socket unit passes it, in front of the same nginx answering a small chat
completion with ``usage`` (as vLLM does, so the tokens are read and counted);
wrk POSTs the bench's chat request with a key, the two alternately, round
after round: the median of the per-round differences is the cost, whatever
the machine's load does meanwhile. No service manager: only HAProxy's
configuration differs between the two."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from statistics import median

from bench.rows import Profile, Row
from bench.tools import WrkResult, connectable, free_port, running, stop_pid, wait_until, wrk
from unitgen.features.gateway.plan import GatewayPlan, GatewaySettings, Member
from unitgen.features.gateway.render import CONFIG, MEMBER_KEYS, GatewayPaths, render_gateway
from unitgen.inunit.gwkeys import write_maps
from unitgen.ops.systemd.sandbox import Sandbox

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
BEFORE = Path(__file__).resolve().parent / "gateway_before28.cfg"
STREAMER = Path(__file__).resolve().parent / "streamer.py"
KEY = "sk-bench-gateway"
# a policy that holds back nothing in the run, so every request pays its checks
KEYS = f"{KEY} name=bench models=m rpm=1000000000 in_flight=1000\n"
ANSWER = json.dumps({"id": "c", "object": "chat.completion", "model": "m", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "Hello."}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})

NGINX = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    client_body_temp_path {dir}/body;
    default_type application/json;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ return 200 '{body}'; }}
    }}
}}
"""


def _script(directory: Path, *, stream: bool = False) -> Path:
    body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}], "model": "m",
                       **({"stream": True} if stream else {})})
    path = directory / "post.lua"
    path.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                    f'wrk.headers["Authorization"] = "Bearer {KEY}"\nwrk.body = {json.dumps(body)}\n',
                    encoding="utf-8")
    return path


def _configs(root: Path, server: str) -> tuple[Path, Path]:
    """The two gateways' directories: the one unitgen renders now, the one before."""
    now, before = root / "now", root / "before"
    for d in (now, before):
        d.mkdir()
    keys = root / "keys"
    keys.write_text(KEYS, encoding="utf-8")
    keys.chmod(0o600)
    settings = GatewaySettings("bench", api_keys_file=str(keys))
    plan = GatewayPlan(settings, (Member("m", server, ("m",)),))
    for d in (now, before):
        for f in render_gateway(settings, plan.routes, GatewayPaths(str(d), str(d))):
            (d / f.name).write_text(f.text, encoding="utf-8")
        (d / MEMBER_KEYS).write_text("", encoding="utf-8")
    write_maps(str(keys), str(now / "models.json"), str(now))
    (before / "api-keys").write_text(f"{KEY}\n", encoding="utf-8")
    (before / CONFIG).write_text(BEFORE.read_text(encoding="utf-8").replace(
        "@DIR@", str(before)).replace("@SERVER@", server), encoding="utf-8")
    return now, before


@contextlib.contextmanager
def _haproxy(directory: Path) -> Iterator[int]:
    """HAProxy on ``directory``'s configuration, its socket on fd 3; its port."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    fd = listener.fileno()

    def on_fd_3() -> None:
        os.dup2(fd, 3)

    log = (directory / "haproxy.log").open("wb")  # where the request lines go
    proc = subprocess.Popen([HAPROXY, "-W", "-f", str(directory / CONFIG)], pass_fds=(3, fd),
                            preexec_fn=on_fd_3, stdout=subprocess.DEVNULL, stderr=log)  # noqa: PLW1509 - dup2 only
    port = listener.getsockname()[1]
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
                s.sendall(b"GET /unitgen/health HTTP/1.0\r\n\r\n")
                if b" 200 " in s.recv(100):
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"HAProxy did not start on {directory / CONFIG}: "
                                   f"{(directory / 'haproxy.log').read_text()[-600:]}")
            time.sleep(0.05)
        yield port
    finally:
        stop_pid(proc)
        log.close()
        listener.close()


@contextlib.contextmanager
def _serving(argv: list[str], port: int, what: str,
             env: dict[str, str] | None = None) -> Iterator[str]:
    """``argv`` started, once it answers on ``port``: its address."""
    with running(argv, env=env) as proc:
        wait_until(lambda: proc.poll() is not None or connectable(port), 10, 0.05)
        if not connectable(port):
            raise RuntimeError(f"{what} did not start")
        yield f"127.0.0.1:{port}"


def _nginx(directory: Path) -> contextlib.AbstractContextManager[str]:
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(NGINX.format(dir=directory, port=port, body=ANSWER), encoding="utf-8")
    return _serving(["/usr/sbin/nginx", "-e", "stderr", "-p", str(directory), "-c", str(conf)],
                    port, "nginx")


def _streamer(directory: Path) -> contextlib.AbstractContextManager[str]:
    """bench/streamer.py (20 ms, then 256 chunks): the LLM-shaped answer."""
    port = free_port()
    return _serving([sys.executable, str(STREAMER), "--host", str(directory / "s.sock")],
                    port, "the streamer", {**os.environ, "BENCH_DIRECT_PORT": str(port)})


def _stream_ratio(root: Path, profile: Profile, rounds: int) -> tuple[float, float, float]:
    """Streams at c=16 through both gateways, alternately: (now, before, median ratio)."""
    root.mkdir()
    with _streamer(root) as server:
        now, before = _configs(root, server)
        script = _script(root, stream=True)
        with _haproxy(now) as new_port, _haproxy(before) as old_port:
            url = "http://127.0.0.1:{}/v1/chat/completions"
            rate: dict[int, list[float]] = {new_port: [], old_port: []}
            for i in range(rounds):
                order = (new_port, old_port) if i % 2 == 0 else (old_port, new_port)
                for port in order:
                    rate[port].append(_ok(wrk(url.format(port), connections=16,
                                              seconds=profile.stream_seconds,
                                              script=script)).requests_per_s)
    ratio = median(n / b for n, b in zip(rate[new_port], rate[old_port], strict=True))
    return median(rate[new_port]), median(rate[old_port]), ratio


def _ok(res: WrkResult) -> WrkResult:
    """Every answer a 200: a 429 of the policy would measure something else."""
    if res.errors:
        raise RuntimeError(f"wrk saw {res.errors} errors or non-2xx of {res.requests} requests")
    return res


def keys_rows(box: Sandbox, profile: Profile) -> list[Row]:
    """Added latency at c=1 and throughput at c=16, now against before."""
    rounds, seconds = (1, 1.0) if profile.quick else (12, 3.0)
    with tempfile.TemporaryDirectory(prefix="bench-keys-") as name:
        root = Path(name)
        with _nginx(root) as server:
            now, before = _configs(root, server)
            script = _script(root)
            with _haproxy(now) as new_port, _haproxy(before) as old_port:
                url = "http://127.0.0.1:{}/v1/chat/completions"
                for port in (new_port, old_port):  # warm up; and both answer, keyed
                    warm = wrk(url.format(port), connections=1, seconds=1, script=script)
                    if warm.errors:
                        raise RuntimeError(f"{warm.errors} errors of {warm.requests} on {port}")
                p50: dict[int, list[float]] = {new_port: [], old_port: []}
                rate: dict[int, list[float]] = {new_port: [], old_port: []}
                for i in range(rounds):
                    order = (new_port, old_port) if i % 2 == 0 else (old_port, new_port)
                    for port in order:
                        p50[port].append(_ok(wrk(url.format(port), connections=1,
                                                 seconds=seconds, script=script)).p50_ms)
                    for port in order:
                        rate[port].append(_ok(wrk(url.format(port), connections=16,
                                                  seconds=seconds, script=script)).requests_per_s)
                logged = sum(1 for line in (now / "haproxy.log").read_text().splitlines()
                             if line.startswith('{"gateway"'))
        stream_new, stream_old, stream_ratio = _stream_ratio(root / "stream", profile,
                                                             max(1, rounds // 3))
    added = median(n - b for n, b in zip(p50[new_port], p50[old_port], strict=True))
    ratio = median(n / b for n, b in zip(rate[new_port], rate[old_port], strict=True))
    new_ms, old_ms = median(p50[new_port]), median(p50[old_port])
    new_rate, old_rate = median(rate[new_port]), median(rate[old_port])
    return [
        Row(row="gateway: added latency of the keys' policy, p50, c=1 (median of "
                f"{rounds} paired rounds)",
            ours=f"{new_ms * 1000:.0f} µs ({added * 1000:+.0f} µs)",
            baseline=f"{old_ms * 1000:.0f} µs, the gateway before issue 28",
            goal="+ ≤ 50 µs", met=added <= 0.05,
            note=f"every request named, checked against its key's models, rate and bound, "
                 f"logged as a JSON line ({logged} lines) and its tokens counted",
            figures={"ours": new_ms, "baseline": old_ms, "added": added}),
        Row(row="gateway: throughput with the keys' policy, c=16",
            ours=f"{new_rate:,.0f} req/s", baseline=f"{old_rate:,.0f} req/s before issue 28",
            ratio=ratio, goal="≥ 0.95 (noise)", met=ratio >= 0.95,
            note="tiny answers (a 200-byte JSON completion from nginx): HAProxy's own CPU "
                 "a request is the bound",
            figures={"ours": new_rate, "baseline": old_rate}),
        Row(row="gateway: LLM-shaped stream with the keys' policy, c=16, throughput",
            ours=f"{stream_new:.1f} req/s", baseline=f"{stream_old:.1f} req/s before issue 28",
            ratio=stream_ratio, goal="≥ 0.95 (noise)", met=stream_ratio >= 0.95,
            figures={"ours": stream_new, "baseline": stream_old}),
    ]
