"""What a GPU pool's turns cost (issue 27), on a private manager with the fake
NVML (tests/fake_nvml) and the GPU stand-ins (tests/gpu_standin.py), which hold
memory on the fake GPU while loaded and let go asleep or on exit.

* stop and start: two members of 50 GiB on one 80 GiB GPU that cannot sleep,
  stand-ins loading in 1 s; with one loaded and idle, a request to the other
  is timed from connect to answer. The work a swap cannot avoid, measured
  bare: the stand-in's own start to its first 200, and its exit on SIGTERM.
* sleep and wake: the same members, able to sleep (vLLM's endpoints), waking
  in 0.5 s: the swap puts one to sleep and wakes the other. The work it cannot
  avoid: the stand-in's own sleep and wake calls, timed bare.
* alternating traffic: 4 clients per model for a while; requests served per
  swap (a load or a wake).

``python -m bench.poolswap`` prints the rows."""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.rows import Profile, Row
from tests.helpers import free_port, write_spec
from tests.nvml import FAKE_DIR, GIB, held_by_processes, uuid, write_scenario
from unitgen.ops.systemd.sandbox import Sandbox

STANDIN = Path(__file__).resolve().parents[1] / "tests" / "gpu_standin.py"
LOAD, WAKE = 1.0, 0.5
GOALS = {"stop": 0.3, "sleep": 0.1, "per_swap": 4.0}


def chat(port: int, model: str, timeout: float = 120) -> dict[str, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": model}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body: dict[str, object] = json.loads(resp.read() or b"{}")
        if resp.status != 200:
            raise RuntimeError(f"{model}: {resp.status} {body}")
        return body
    finally:
        conn.close()


class Host:
    """A fake one-GPU host under the sandbox's manager."""

    def __init__(self, box: Sandbox, tmp: Path) -> None:
        self.box, self.tmp = box, tmp
        gpus = {"gpus": [{"uuid": uuid(0), "name": "NVIDIA H100 80GB HBM3", "total": 80 * GIB,
                          "minor": 0, "reserved": GIB // 2, "processes": []}]}
        self.scenario = write_scenario(tmp / "nvml.json", held_by_processes(gpus, tmp / "held"))
        self.env = {**os.environ, **box.env, "PYTHONPATH": str(FAKE_DIR),
                    "FAKE_NVML_SCENARIO": str(self.scenario)}
        self.exe = tmp / "gpu-standin"
        self.exe.write_text(f"#!/bin/sh\nexec {sys.executable} {STANDIN} \"$@\"\n")
        self.exe.chmod(0o755)

    def cli(self, *args: str) -> None:
        subprocess.run([sys.executable, "-m", "unitgen", *args], env=self.env, check=True,
                       capture_output=True, text=True)

    @contextmanager
    def members(self, *, sleep: bool, min_turn: str = "0s") -> Iterator[dict[str, int]]:
        """Two 50 GiB members, deployed; removed afterwards."""
        ports = {n: free_port() for n in ("pa", "pb")}
        specs = [write_spec(self.tmp, n, (
            f'name = "{n}"\nbackend = "vllm"\nmodel = "m-{n}"\nexecutable = "{self.exe}"\n'
            f'activation = "on-demand"\ngpus = [0]\nport = {p}\n'
            f'args = ["--gpu-memory-utilization", "0.625"]\npool_min_turn = "{min_turn}"\n'
            f"pool_sleep = {'true' if sleep else 'false'}\n"
            f'env = {{ STANDIN_LOAD_SECONDS = "{LOAD}", STANDIN_WAKE_SECONDS = "{WAKE}" }}\n'))
                 for n, p in ports.items()]
        self.box.systemctl("set-environment", f"PYTHONPATH={FAKE_DIR}",
                           f"FAKE_NVML_SCENARIO={self.scenario}",
                           "UNITGEN_POOL_SLEEP_RAM=400GiB", check=True)
        self.cli("deploy", "--user", *map(str, specs))
        try:
            yield ports
        finally:
            self.cli("remove", "--user", *ports)
            self.box.systemctl("unset-environment", "PYTHONPATH", "FAKE_NVML_SCENARIO",
                               "UNITGEN_POOL_SLEEP_RAM")


def _bare(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int, float]:
    """A stand-in run directly: the process, its port, seconds to its first 200."""
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(STANDIN), "serve", "m", "--port", str(port),
                             "--enable-sleep-mode"], env=env, stderr=subprocess.DEVNULL)
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port, time.monotonic() - t0
        except OSError:
            time.sleep(0.01)


def bare_costs(host: Host) -> dict[str, float]:
    """The work a swap cannot avoid, run bare: load, exit, sleep and wake calls."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(FAKE_DIR),
           "FAKE_NVML_SCENARIO": str(host.scenario), "VLLM_SERVER_DEV_MODE": "1",
           "STANDIN_LOAD_SECONDS": str(LOAD), "STANDIN_WAKE_SECONDS": str(WAKE)}
    loads: list[float] = []
    exits: list[float] = []
    sleeps: list[float] = []
    wakes: list[float] = []
    for _ in range(3):
        proc, port, load = _bare(env)
        loads.append(load)
        for path, out in (("/sleep?level=1", sleeps), ("/wake_up", wakes)):
            t0 = time.monotonic()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", path)
            conn.getresponse().read()
            out.append(time.monotonic() - t0)
        t0 = time.monotonic()
        proc.terminate()
        proc.wait()
        exits.append(time.monotonic() - t0)
    return {"load": min(loads), "exit": min(exits), "sleep": min(sleeps), "wake": min(wakes)}


def swaps(ports: dict[str, int], rounds: int) -> list[float]:
    """Alternating requests (each one a swap after the first): their times."""
    out = []
    for i in range(rounds * 2 + 1):
        name = "pa" if i % 2 == 0 else "pb"
        t0 = time.monotonic()
        chat(ports[name], f"m-{name}")
        if i:
            out.append(time.monotonic() - t0)
    return out


def alternating(ports: dict[str, int], seconds: float) -> tuple[int, int]:
    """4 clients per model for ``seconds``: requests answered, and swaps (the
    loads and wakes the stand-ins' pids and the pool's journal count)."""
    answered: list[tuple[str, object]] = []
    until = time.monotonic() + seconds

    def client(name: str) -> None:
        while time.monotonic() < until:
            answered.append((name, chat(ports[name], f"m-{name}").get("pid")))

    threads = [threading.Thread(target=client, args=(n,)) for n in ports for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    turns, last = 0, None
    for name, _ in answered:  # in the order they were answered
        if name != last:
            turns, last = turns + 1, name
    return len(answered), max(1, turns - 1)


def pool_swap_rows(box: Sandbox, profile: Profile) -> list[Row]:
    """The three rows (see the module docstring)."""
    rounds = 2 if profile.quick else 6
    with tempfile.TemporaryDirectory() as name:
        host = Host(box, Path(name))
        bare = bare_costs(host)
        with host.members(sleep=False) as ports:
            stop = statistics.median(swaps(ports, rounds))
        with host.members(sleep=True) as ports:
            chat(ports["pa"], "m-pa")
            chat(ports["pb"], "m-pb")  # both have loaded once: from now on, sleep and wake
            wake = statistics.median(swaps(ports, rounds))
        with host.members(sleep=True, min_turn="5s") as ports:
            served, turns = alternating(ports, 5 if profile.quick else 20)
    stop_over = stop - bare["load"] - bare["exit"]
    wake_over = wake - bare["wake"] - bare["sleep"]
    return [
        Row(row=f"GPU pool: stop-and-start swap overhead ({LOAD:g} s load), median",
            ours=f"{stop:.2f} s a swap (+{stop_over:.2f} s)",
            baseline=f"{bare['load']:.2f} s own load + {bare['exit'] * 1000:.0f} ms exit, bare",
            goal=f"+ ≤ {GOALS['stop']:g} s", met=stop_over <= GOALS["stop"],
            figures={"ours": stop, "overhead": stop_over, **bare}),
        Row(row=f"GPU pool: sleep/wake swap overhead ({WAKE:g} s wake), median",
            ours=f"{wake:.2f} s a swap (+{wake_over:.2f} s)",
            baseline=f"{bare['wake']:.2f} s own wake + {bare['sleep'] * 1000:.0f} ms sleep, bare",
            goal=f"+ ≤ {GOALS['sleep']:g} s", met=wake_over <= GOALS["sleep"],
            figures={"ours": wake, "overhead": wake_over}),
        Row(row="GPU pool: alternating traffic, 4 clients per model (2 models that do not "
                "fit together)", ours=f"{served / turns:.0f} requests a swap ({served} "
            f"requests, {turns} swaps)", goal=f"≥ {GOALS['per_swap']:g}",
            met=served / turns >= GOALS["per_swap"],
            figures={"ours": served / turns, "served": served, "swaps": turns}),
    ]


def main() -> None:
    from bench.rows import FULL, table  # noqa: PLC0415

    box = Sandbox.start(tie_to_parent=True)
    try:
        print(table(pool_swap_rows(box, FULL)))
    finally:
        box.stop()


if __name__ == "__main__":
    main()
