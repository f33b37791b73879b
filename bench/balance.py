"""Rows about the cache-aware replica choice (docs/gateway.md, "Replicas"):
what choosing by the conversation costs against fewest in flight, the way
the gateway chose before. One gateway, two routes of two replicas each, the
same stand-in servers behind both: ``bconv`` (``balance = "conversation"``)
and ``bleast`` (``balance = "leastconn"``); wrk hits them alternately in one
run, so drifting load hits both alike. Deployed by ``unitgen deploy`` with
keys, as bench/gateway.py does, so every request passes the whole door.

The time to the first token with real model servers is ``python -m
bench.cache`` (minutes, and llama-server): not a row here."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench.gateway import GATEWAY, GATEWAY_KEY, MEMBER_KEY, unitgen
from bench.proxy import server_spec, standin_exe
from bench.rows import Profile, Row
from bench.tools import WrkResult, free_port, median, wrk
from unitgen.ops.systemd.sandbox import Sandbox

ROUTES = {"bconv": "conversation", "bleast": "leastconn"}
SYSTEM = "You are a careful assistant who answers in full sentences. " * 130  # ~2,000 tokens


@contextlib.contextmanager
def two_routes(box: Sandbox, script: str, env: dict[str, str] | None = None
               ) -> Iterator[tuple[int, Path]]:
    """The gateway and, per route of :data:`ROUTES`, two replicas running
    ``bench/<script>``; yield the gateway's port and the scratch directory."""
    with tempfile.TemporaryDirectory(prefix="bench-balance-") as tmpname:
        tmp = Path(tmpname)
        tmp.chmod(0o755)
        specs, names = [], []
        for route, balance in ROUTES.items():
            for i in (1, 2):
                name = f"{route}{i}"
                exe = standin_exe(tmp, script, f"{name}-server")
                spec = tmp / f"{name}.toml"
                spec.write_text(server_spec(
                    name, exe, free_port(), {"BENCH_DIR": str(tmp), "LLAMA_API_KEY": MEMBER_KEY,
                                             "BENCH_DIRECT_PORT": str(free_port()), **(env or {})},
                    f'gateway = "{GATEWAY}"\naliases = ["{route}"]\nbalance = "{balance}"\n'),
                    encoding="utf-8")
                specs.append(spec)
                names.append(name)
        keys = tmp / "gateway.keys"
        keys.write_text(f"{GATEWAY_KEY}\n", encoding="utf-8")
        keys.chmod(0o600)
        port = free_port()
        gw = tmp / f"{GATEWAY}.toml"
        gw.write_text(f'kind = "gateway"\nname = "{GATEWAY}"\nhost = "127.0.0.1"\n'
                      f'port = {port}\napi_keys_file = "{keys}"\n', encoding="utf-8")
        unitgen(box, "deploy", *map(str, specs), str(gw))
        try:
            yield port, tmp
        finally:
            unitgen(box, "remove", *names, GATEWAY)


def script(tmp: Path, route: str, *, stream: bool, system: str = "",
           conversations: int = 1) -> Path:
    """A wrk script POSTing chat requests for ``route``: ``conversations``
    different ones in turn (each client a conversation of its own), with the
    SDK's key order (``model`` last)."""
    bodies = []
    for i in range(conversations):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": f"Say hello to {i}."}]
        bodies.append(json.dumps({"messages": messages, "model": route, "stream": stream}))
    path = tmp / f"{route}-{len(system)}-{conversations}.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {GATEWAY_KEY}"\n'
        f"local bodies = {{{', '.join(json.dumps(b) for b in bodies)}}}\n"
        "local n = 0\n"
        "request = function()\n"
        "  n = n + 1\n"
        "  return wrk.format(nil, nil, nil, bodies[(n % #bodies) + 1])\n"
        "end\n", encoding="utf-8")
    return path


def alternate(port: int, scripts: dict[str, Path], *, connections: int, seconds: float,
              rounds: int) -> dict[str, WrkResult]:
    """wrk on each route's script in turn (a b b a ...); the median run of each."""
    runs: dict[str, list[WrkResult]] = {r: [] for r in scripts}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    for s in scripts.values():  # warm-up: the proxies' first connections
        wrk(url, connections=connections, seconds=1, script=s)
    for i in range(rounds):
        for r in (list(scripts) if i % 2 == 0 else list(reversed(scripts))):
            res = wrk(url, connections=connections, seconds=seconds, script=scripts[r])
            if res.errors:
                raise RuntimeError(f"{r}: wrk saw {res.errors} errors of {res.requests}")
            runs[r].append(res)
    out = {}
    for r, got in runs.items():
        mid = median([x.requests_per_s for x in got])
        out[r] = min(got, key=lambda x: abs(x.requests_per_s - mid))
    return out


def latency_rows(box: Sandbox, profile: Profile) -> list[Row]:
    """What choosing by the conversation adds to one request at c=1 (nginx
    answering 16 bytes): a small chat body, and one with a 2,000-token system
    prompt (the key is read from the body)."""
    rounds = 2 if profile.quick else 4
    rows = []
    with two_routes(box, "fastserver.py", {"BENCH_NGINX_WORKERS": "1"}) as (port, tmp):
        for what, system in (("small body", ""), ("8 KB system prompt", SYSTEM)):
            got = alternate(port, {r: script(tmp, r, stream=False, system=system)
                                   for r in ROUTES}, connections=1,
                            seconds=profile.load_seconds, rounds=rounds)
            ours, base = got["bconv"].p50_ms, got["bleast"].p50_ms
            added = ours - base
            rows.append(Row(
                row=f"gateway: conversation choice, added latency p50, c=1, {what}",
                ours=f"{ours * 1000:.0f} µs ({added * 1000:+.0f} µs)",
                baseline=f"{base * 1000:.0f} µs with leastconn", goal="+ ≤ 50 µs",
                met=added <= 0.05, figures={"ours": ours, "baseline": base, "added": added}))
    return rows


def stream_rows(box: Sandbox, profile: Profile) -> list[Row]:
    """LLM-shaped streams at c=16, 64 conversations in turn: throughput (Little's
    law, as bench/gateway.py) by the conversation vs fewest in flight."""
    rounds = 2 if profile.quick else 4
    with two_routes(box, "streamer.py") as (port, tmp):
        got = alternate(port, {r: script(tmp, r, stream=True, conversations=64)
                               for r in ROUTES}, connections=16,
                        seconds=profile.stream_seconds, rounds=rounds)
    ours, base = 16 / got["bconv"].mean_ms * 1000, 16 / got["bleast"].mean_ms * 1000
    ratio = ours / base
    return [Row(row="gateway: conversation choice, LLM-shaped stream, c=16, throughput",
                ours=f"{ours:.1f} req/s", baseline=f"{base:.1f} req/s with leastconn",
                ratio=ratio, goal="≥ 0.98", met=ratio >= 0.98,
                figures={"ours": ours, "baseline": base})]


def balance_rows(box: Sandbox, profile: Profile) -> list[Row]:
    """The conversation choice's rows: latency at c=1, stream throughput at c=16."""
    return latency_rows(box, profile) + stream_rows(box, profile)
