"""Rows about the gateway (docs/gateway.md): requests routed by their body's
``model`` through HAProxy vs the same requests straight at the instance's own
port, same client (wrk with a POST script), alternately in one run.

Both paths end at the same instance (its ``.socket``, systemd-socket-proxyd,
the stand-in on its private Unix socket), so the ratio is the gateway's cost
alone. The instance and the gateway are deployed by ``unitgen deploy``, the way
users do it (the gateway's HAProxy configuration is rendered from the
instances that join it), with keys, so every request passes the whole door:
the client's gateway key checked and removed, the instance's own key sent in
its place, the path and the one-``model`` rule (docs/gateway.md)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench.proxy import Deployed, paired, server_spec, standin_exe
from bench.rows import Profile, Row
from bench.tools import PYTHON, WrkResult, free_port, wrk
from unitgen.ops.systemd.sandbox import Sandbox

GATEWAY = "bgw"
GATEWAY_KEY = "sk-bench-gateway"  # what clients send (api_keys_file)
MEMBER_KEY = "sk-bench-member"  # the instances' own (the gateway sends it)


def unitgen(box: Sandbox, *args: str, timeout: float = 180) -> None:
    """``unitgen ARGS --user`` against the sandbox's manager; fails loudly."""
    done = subprocess.run([PYTHON, "-m", "unitgen", *args, "--user"], env=box.env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"unitgen {' '.join(args)}: exit {done.returncode}: "
                           f"{done.stderr.strip()[-800:]}")


def post_script(directory: Path, model: str, *, stream: bool) -> Path:
    """A wrk script that POSTs an OpenAI-style chat request for ``model``, with
    ``model`` after ``messages`` (the order the OpenAI Python SDK writes)."""
    body = json.dumps({"messages": [{"role": "user", "content": "Say hello."}],
                       "model": model, "stream": stream})
    path = directory / f"post-{model}.lua"
    path.write_text('wrk.method = "POST"\n'
                    'wrk.headers["Content-Type"] = "application/json"\n'
                    f'wrk.headers["Authorization"] = "Bearer {GATEWAY_KEY}"\n'
                    f"wrk.body = {json.dumps(body)}\n", encoding="utf-8")
    return path


def member(tmp: Path, name: str, script: str, env: dict[str, str] | None = None
           ) -> tuple[Path, int]:
    """An instance spec joining the gateway that runs ``bench/<script>``, and
    the instance's own port."""
    exe = standin_exe(tmp, script, f"{name}-server")
    full_env = {"BENCH_DIR": str(tmp), "BENCH_DIRECT_PORT": str(free_port()),
                "LLAMA_API_KEY": MEMBER_KEY, **(env or {})}
    spec, port = tmp / f"{name}.toml", free_port()
    spec.write_text(server_spec(name, exe, port, full_env, f'gateway = "{GATEWAY}"\n'),
                    encoding="utf-8")
    return spec, port


@contextlib.contextmanager
def behind_gateway(box: Sandbox, name: str, script: str, env: dict[str, str] | None = None
                   ) -> Iterator[tuple[Deployed, Path]]:
    """Deploy an instance and the gateway it joins; yield (``public`` = the
    gateway's port, ``direct`` = the instance's own port) and the scratch
    directory; remove both after."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmpname:
        tmp = Path(tmpname)
        tmp.chmod(0o755)
        spec, instance_port = member(tmp, name, script, env)
        gw_port = free_port()
        keys = tmp / "gateway.keys"
        keys.write_text(f"{GATEWAY_KEY}\n", encoding="utf-8")
        keys.chmod(0o600)
        gw = tmp / f"{GATEWAY}.toml"
        gw.write_text(f'kind = "gateway"\nname = "{GATEWAY}"\nhost = "127.0.0.1"\n'
                      f'port = {gw_port}\napi_keys_file = "{keys}"\n', encoding="utf-8")
        unitgen(box, "deploy", str(spec), str(gw))
        try:
            yield Deployed(name, public=gw_port, direct=instance_port), tmp
        finally:
            unitgen(box, "remove", name, GATEWAY)


def _check(res: WrkResult, what: str) -> None:
    if res.errors:
        raise RuntimeError(f"{what}: wrk saw {res.errors} errors of {res.requests} requests")


def stream_rows(box: Sandbox, profile: Profile, dep: Deployed, script: Path) -> list[Row]:
    """LLM-shaped streams (20 ms, then 256 chunks) at c=16: throughput by
    Little's law (c / mean time per request), as the proxy's stream row."""
    rounds = 1 if profile.quick else 2
    direct, routed = paired(dep, connections=16, seconds=profile.stream_seconds, rounds=rounds,
                            path="/v1/chat/completions", script=script)
    _check(direct, "stream to the instance")
    _check(routed, "stream through the gateway")
    ours, base = 16 / routed.mean_ms * 1000, 16 / direct.mean_ms * 1000
    ratio = ours / base
    return [Row(row="gateway: LLM-shaped stream, c=16, throughput",
                ours=f"{ours:.1f} req/s ({routed.mean_ms:.0f} ms each)",
                baseline=f"{base:.1f} req/s at the instance's port ({direct.mean_ms:.0f} ms)",
                ratio=ratio, goal="≥ 0.98", met=ratio >= 0.98,
                figures={"ours": ours, "baseline": base})]


def latency_rows(box: Sandbox, profile: Profile) -> list[Row]:
    """What routing adds to one small request at c=1 (nginx answering 16 bytes)."""
    rounds = 1 if profile.quick else 2
    with behind_gateway(box, "bfastg", "fastserver.py", {"BENCH_NGINX_WORKERS": "1"}) as (
            dep, tmp):
        script = post_script(tmp, "bfastg", stream=False)
        direct, routed = paired(dep, connections=1, seconds=profile.load_seconds,
                                rounds=rounds, path="/v1/chat/completions", script=script)
    _check(direct, "tiny to the instance")
    _check(routed, "tiny through the gateway")
    added = routed.p50_ms - direct.p50_ms
    return [Row(row="gateway: added latency per request, p50, c=1",
                ours=f"{routed.p50_ms * 1000:.0f} µs (+{added * 1000:.0f} µs)",
                baseline=f"{direct.p50_ms * 1000:.0f} µs at the instance's port",
                goal="+ ≤ 300 µs", met=added <= 0.3,
                figures={"ours": routed.p50_ms, "baseline": direct.p50_ms, "added": added})]


def reload_rows(box: Sandbox, profile: Profile, dep: Deployed, script: Path,
                tmp: Path) -> list[Row]:
    """Streams at c=16 through the gateway while its configuration changes
    under them: another instance joins (``unitgen deploy``: the config is
    rewritten and HAProxy reloaded), leaves (``unitgen remove``), and plain
    reloads in between. Every request must be answered."""
    seconds = 4.0 if profile.quick else 12.0
    result: list[WrkResult] = []
    load = threading.Thread(target=lambda: result.append(
        wrk(dep.url(via_proxy=True, path="/v1/chat/completions"), connections=16,
            seconds=seconds, script=script)))
    extra, _ = member(tmp, "bgw2", "streamer.py")
    load.start()
    reloads = 0
    deadline = time.monotonic() + seconds - 1.0
    try:
        time.sleep(0.5)
        while time.monotonic() < deadline:
            if reloads % 4 == 1:
                unitgen(box, "deploy", str(extra))
            elif reloads % 4 == 3:
                unitgen(box, "remove", "bgw2")
            else:
                box.systemctl("reload", f"{GATEWAY}.service", check=True, timeout=30)
                time.sleep(0.3)
            reloads += 1
    finally:
        load.join()
        with contextlib.suppress(RuntimeError):
            unitgen(box, "remove", "bgw2")
    res = result[0]
    return [Row(row="gateway: failed requests while it reloads under load (c=16 streams)",
                ours=f"{res.errors} of {res.requests} ({reloads} reloads)",
                baseline="—", goal="0", met=res.errors == 0,
                figures={"ours": float(res.requests), "failed": float(res.errors),
                         "reloads": float(reloads)})]


def gateway_rows(box: Sandbox, profile: Profile) -> list[Row]:
    """The gateway's rows: stream throughput, added latency, reloads under load."""
    rows: list[Row] = []
    with behind_gateway(box, "bstreamg", "streamer.py") as (dep, tmp):
        script = post_script(tmp, "bstreamg", stream=True)
        rows += stream_rows(box, profile, dep, script)
        rows += reload_rows(box, profile, dep, script, tmp)
    rows += latency_rows(box, profile)
    return rows
