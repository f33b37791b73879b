"""Rows about starting: how long after the server can answer 200 does
``systemctl start`` return (vs a 3 s poll loop like GPUStack's), and what an
on-demand instance's first request pays on top of the server's own load time."""

from __future__ import annotations

import http.client
import json
import subprocess
import tempfile
import time
from pathlib import Path

from bench.proxy import HERE, deployed
from bench.rows import Profile, Row
from bench.tools import PYTHON, free_port, median, stop_pid
from unitgen.ops.systemd.sandbox import Sandbox

SERVER = HERE / "readyserver.py"
GPUSTACK_POLL = 3.0  # GPUStack's health poll interval (it has no start deadline either)


def load_times(n: int) -> list[float]:
    """Load times spread over 0.5-3.5 s (golden-ratio steps): a poll loop's lag
    depends on where the load ends within its period, so it must vary."""
    return [0.5 + ((i * 0.6180339887) % 1.0) * 3.0 for i in range(n)]


def health(port: int, timeout: float = 5.0) -> int:
    """Status of GET /health on loopback (raises OSError when nothing listens)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _record(path: Path) -> dict[str, float]:
    data: dict[str, float] = json.loads(path.read_text())
    return data


def unitgen_lag(box: Sandbox, load: float, tmp: Path) -> tuple[float, float]:
    """``systemctl start`` of an eager instance: seconds from the server being
    able to answer 200 to the command returning, and from its first 200."""
    record = tmp / "record.json"
    env = {"BENCH_LOAD_SECONDS": str(load), "BENCH_RECORD": str(record)}
    with deployed(box, "bready", "readyserver.py", env, start=None):
        box.systemctl("start", "bready.service", check=True, timeout=60)
        done = time.monotonic()
        rec = _record(record)
        return done - rec["ready_at"], done - rec["first_200_at"]


def poll_loop_lag(load: float, tmp: Path, interval: float = GPUSTACK_POLL) -> float:
    """The baseline: the same server run bare, polled every ``interval`` seconds."""
    record = tmp / "poll.json"
    port = free_port()
    proc = subprocess.Popen([PYTHON, str(SERVER), "--port", str(port)],
                            env={"BENCH_LOAD_SECONDS": str(load), "BENCH_RECORD": str(record),
                                 "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if health(port) == 200:
                    return time.monotonic() - _record(record)["ready_at"]
            except OSError:
                pass
            time.sleep(interval)
    finally:
        stop_pid(proc)


def bare_load_time(load: float) -> float:
    """The server's own time from launch to its first 200, polled every 5 ms."""
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([PYTHON, str(SERVER), "--port", str(port)],
                            env={"BENCH_LOAD_SECONDS": str(load), "PATH": "/usr/bin:/bin"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                if health(port) == 200:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.005)
    finally:
        stop_pid(proc)


def cold_start(box: Sandbox, load: float) -> float:
    """First request to an on-demand instance (only its socket started): seconds to 200."""
    env = {"BENCH_LOAD_SECONDS": str(load)}
    with deployed(box, "bcold", "readyserver.py", env, extra='activation = "on-demand"\n',
                  start="socket") as dep:
        t0 = time.monotonic()
        status = health(dep.public, timeout=60)
        took = time.monotonic() - t0
        if status != 200:
            raise RuntimeError(f"on-demand first request answered {status}")
        return took


def ready_rows(box: Sandbox, profile: Profile) -> list[Row]:
    """Readiness lag vs a 3 s poll loop; on-demand cold start overhead."""
    loads = [0.4] if profile.quick else load_times(profile.ready_rounds)
    ours: list[float] = []
    since_200: list[float] = []
    theirs: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-ready-") as tmpname:
        tmp = Path(tmpname)
        for load in loads:
            lag, after_200 = unitgen_lag(box, load, tmp)
            ours.append(lag)
            since_200.append(after_200)
            theirs.append(poll_loop_lag(load, tmp))
    lag, base = median(ours), median(theirs)
    rows = [Row(
        row="readiness lag: server able to answer 200 → `systemctl start` returns (median)",
        ours=f"{lag:.3f} s ({median(since_200):.3f} s after its first 200)",
        baseline=f"{base:.2f} s, 3 s poll loop",
        ratio=lag / base, goal="≤ 0.15 s", met=lag <= 0.15,
        note=f"{len(loads)} starts, server load times {min(loads):.1f}-{max(loads):.1f} s; "
             "the lag includes the private probe's poll interval, the proxy's start and the "
             "public probe's Python start-up",
        figures={"ours": lag, "baseline": base, "after_first_200": median(since_200)},
    )]
    cold_load = 0.3 if profile.quick else 1.0
    cold_rounds = 1 if profile.quick else 5
    bare, cold = [], []
    for _ in range(cold_rounds):
        bare.append(bare_load_time(cold_load))
        cold.append(cold_start(box, cold_load))
    b, c = median(bare), median(cold)
    rows.append(Row(
        row=f"on-demand cold start: first request minus the server's own load time "
            f"({cold_load:g} s load)",
        ours=f"+{c - b:.3f} s ({c:.3f} s)", baseline=f"{b:.3f} s server alone",
        ratio=c / b, goal="≤ 0.2 s", met=(c - b) <= 0.2,
        figures={"ours": c, "baseline": b, "added": c - b},
    ))
    return rows
