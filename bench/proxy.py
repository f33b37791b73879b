"""Rows about the data path: traffic through ``<name>.socket`` +
systemd-socket-proxyd against the same server hit directly, same client (wrk).

The servers are deployed by unitgen as llama-server instances (private Unix
socket, the proxy in ``<name>.service``), so the rows measure the real topology;
each also listens on a loopback port for the direct baseline."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.rows import Profile, Row
from bench.tools import PYTHON, WrkResult, free_port, median, wrk
from tests.helpers import install, uninstall, write_spec
from unitgen.ops.systemd.sandbox import Sandbox

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Deployed:
    """A running instance: its public port (socket + proxy) and the server's direct port."""

    name: str
    public: int
    direct: int

    def url(self, *, via_proxy: bool, path: str = "/") -> str:
        """The URL wrk hits, through the socket or straight at the server."""
        return f"http://127.0.0.1:{self.public if via_proxy else self.direct}{path}"


def server_spec(name: str, exe: Path, public: int, env: dict[str, str], extra: str = "") -> str:
    """A llama-server spec whose executable is one of the benchmark stand-ins."""
    env_toml = ", ".join(f'{k} = "{v}"' for k, v in env.items())
    return (f'name = "{name}"\nbackend = "llama-server"\nmodel = "bench"\n'
            f'executable = "{exe}"\nport = {public}\nenv = {{ {env_toml} }}\n{extra}')


def standin_exe(tmp: Path, script: str, name: str = "server") -> Path:
    """An executable in ``tmp`` that runs ``bench/<script>`` (a spec's ``executable``)."""
    exe = tmp / name
    exe.write_text(f'#!/bin/sh\nexec {PYTHON} {HERE / script} "$@"\n')
    exe.chmod(0o755)
    return exe


@contextlib.contextmanager
def deployed(box: Sandbox, name: str, script: str, env: dict[str, str] | None = None,
             extra: str = "", start: str | None = "service") -> Iterator[Deployed]:
    """Render, install and start (``<name>.<start>``, unless None) an instance
    running ``bench/<script>``; stop and remove it after."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmpname:
        tmp = Path(tmpname)
        tmp.chmod(0o755)  # nginx workers (nobody) read nothing here, but keep it traversable
        exe = standin_exe(tmp, script)
        public, direct = free_port(), free_port()
        full_env = {"BENCH_DIR": str(tmp), "BENCH_DIRECT_PORT": str(direct), **(env or {})}
        install(box, write_spec(tmp, name, server_spec(name, exe, public, full_env, extra)))
        try:
            if start:
                box.systemctl("start", f"{name}.{start}", check=True, timeout=60)
            yield Deployed(name, public, direct)
        finally:
            uninstall(box, name)


def paired(dep: Deployed, *, connections: int, seconds: float, rounds: int,
           path: str = "/", script: Path | None = None) -> tuple[WrkResult, WrkResult]:
    """wrk direct and through the proxy, alternately (d p p d ...), so drifting
    machine load hits both alike; the median run of each (by requests/s).
    ``script``: a wrk Lua script (a POST body, say) used on both paths."""
    direct: list[WrkResult] = []
    proxied: list[WrkResult] = []
    # a short warm-up: the proxy's first connection starts nothing new, but
    # caches and the server's accept queue settle
    wrk(dep.url(via_proxy=True, path=path), connections=connections, seconds=1, script=script)
    for i in range(rounds):
        order = (False, True) if i % 2 == 0 else (True, False)
        for via in order:
            res = wrk(dep.url(via_proxy=via, path=path), connections=connections,
                      seconds=seconds, script=script)
            (proxied if via else direct).append(res)
    return _mid(direct), _mid(proxied)


def _mid(results: list[WrkResult]) -> WrkResult:
    mid = median([r.requests_per_s for r in results])
    return min(results, key=lambda r: abs(r.requests_per_s - mid))


def _check(res: WrkResult, what: str) -> None:
    if res.errors:
        raise RuntimeError(f"{what}: wrk saw {res.errors} errors of {res.requests} requests")


def stream_rows(box: Sandbox, profile: Profile) -> list[Row]:
    """LLM-shaped traffic: ~20 ms to the first token, then 256 small chunks.

    Throughput is c / mean time per request (Little's law for wrk's closed loop):
    at c=1 a 10 s run completes only ~30 streams, and counting them would
    quantize the ratio to ±3 %."""
    rows = []
    rounds = 1 if profile.quick else 2
    with deployed(box, "bstream", "streamer.py") as dep:
        for c in (1, 16, 64):
            direct, proxied = paired(dep, connections=c, seconds=profile.stream_seconds,
                                     rounds=rounds, path="/v1/completions")
            _check(direct, "stream direct")
            _check(proxied, "stream proxied")
            ours, base = c / proxied.mean_ms * 1000, c / direct.mean_ms * 1000
            ratio = ours / base
            rows.append(Row(
                row=f"LLM-shaped stream (20 ms + 256 chunks), c={c}: throughput",
                ours=f"{ours:.1f} req/s ({proxied.mean_ms:.0f} ms each)",
                baseline=f"{base:.1f} req/s direct ({direct.mean_ms:.0f} ms)",
                ratio=ratio, goal="≥ 0.98", met=ratio >= 0.98,
                figures={"ours": ours, "baseline": base,
                         "ours_counted": proxied.requests_per_s,
                         "baseline_counted": direct.requests_per_s},
            ))
    return rows


def tiny_rows(box: Sandbox, profile: Profile) -> list[Row]:
    """Tiny keep-alive requests (16-byte body) and the latency the proxy adds at c=1."""
    rows = []
    rounds = 1 if profile.quick else 2
    workers = os.environ.get("BENCH_NGINX_WORKERS", "1")
    with deployed(box, "bfast", "fastserver.py", {"BENCH_NGINX_WORKERS": workers}) as dep:
        for c in (16, 64):
            direct, proxied = paired(dep, connections=c, seconds=profile.load_seconds,
                                     rounds=rounds)
            _check(direct, "tiny direct")
            _check(proxied, "tiny proxied")
            ratio = proxied.requests_per_s / direct.requests_per_s
            rows.append(Row(
                row=f"tiny requests (16-byte body, keep-alive), c={c}",
                ours=f"{proxied.requests_per_s:,.0f} req/s",
                baseline=f"{direct.requests_per_s:,.0f} req/s direct",
                ratio=ratio, goal="≥ 0.5", met=ratio >= 0.5,
                figures={"ours": proxied.requests_per_s, "baseline": direct.requests_per_s},
            ))
        direct, proxied = paired(dep, connections=1, seconds=profile.load_seconds, rounds=rounds)
        for pct, ours, base, goal in (
            ("p50", proxied.p50_ms, direct.p50_ms, 0.1),
            ("p99", proxied.p99_ms, direct.p99_ms, None),
        ):
            added = ours - base
            rows.append(Row(
                row=f"added latency per request, {pct}, c=1",
                ours=f"{ours * 1000:.0f} µs (+{added * 1000:.0f} µs)",
                baseline=f"{base * 1000:.0f} µs direct",
                ratio=None,  # the goal is an added time, not a ratio
                goal="+ ≤ 100 µs" if goal is not None else "(reported)",
                met=(added <= goal) if goal is not None else None,
                figures={"ours": ours, "baseline": base, "added": added},
            ))
    return rows
