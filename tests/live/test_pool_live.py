"""GPU pools on a real systemd user manager (issue 27): on-demand members on the
same GPUs share them by memory. NVML is faked at the pynvml boundary
(tests/fake_nvml); the members are the GPU stand-ins (tests/gpu_standin.py), which
hold memory on the fake GPU while loaded, release it asleep and on exit, so the
pool's proxies read what they really did. The manager's environment carries
the fake NVML to every unit (the proxies, the GPU waits, the stand-ins)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import custom_spec, free_port, prop, wait_for, write_spec
from tests.live.test_swap_live import Sampler, run_ports
from tests.nvml import FAKE_DIR, GIB, held_by_processes, uuid, write_scenario
from unitgen.ops.systemd.sandbox import Sandbox

pytestmark = pytest.mark.systemd

STANDIN = Path(__file__).resolve().parents[1] / "gpu_standin.py"
LOAD = "0.3"


@dataclass
class Pool:
    """A sandbox with a fake GPU host whose processes say what they hold."""

    box: Sandbox
    tmp: Path
    scenario: Path
    held: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, **self.box.env, "PYTHONPATH": str(FAKE_DIR),
                "FAKE_NVML_SCENARIO": str(self.scenario)}

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "unitgen", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def deploy(self, *specs: Path) -> dict[str, int]:
        done = self.cli("deploy", "--user", "--json", *map(str, specs))
        assert done.returncode == 0, done.stdout + done.stderr
        data = json.loads(done.stdout)
        return {i["name"]: int(i["public"].rsplit(":", 1)[1]) for i in data["instances"]}

    def member(self, name: str, *, gib: float, gpus: str = "[0]", backend: str = "vllm",
               min_turn: str = "0s", extra: str = "", **env: str) -> Path:
        """A stand-in member that holds ``gib`` GiB on each of its 80 GiB GPUs."""
        exe = self.tmp / "gpu-standin"
        if not exe.exists():
            exe.write_text(f"#!/bin/sh\nexec {sys.executable} {STANDIN} \"$@\"\n")
            exe.chmod(0o755)
        share = ("--gpu-memory-utilization" if backend == "vllm" else "--mem-fraction-static")
        env = {"STANDIN_LOAD_SECONDS": LOAD, "STANDIN_EVENTS": str(self.tmp / "events.jsonl"),
               **env}
        env_toml = ", ".join(f'{k} = "{v}"' for k, v in env.items())
        return write_spec(self.tmp, name, (
            f'name = "{name}"\nbackend = "{backend}"\nmodel = "m-{name}"\n'
            f'executable = "{exe}"\nactivation = "on-demand"\ngpus = {gpus}\n'
            f"port = {run_ports(name)[0]}\n"
            f'args = ["{share}", "{gib / 80:g}"]\npool_min_turn = "{min_turn}"\nswap_drain = "20s"\n'
            f"env = {{ {env_toml} }}\n{extra}"
            '[health]\ntimeout = "30s"\n'))

    def held_by(self) -> dict[str, dict[str, int]]:
        """Instance -> GPU UUID -> bytes, as NVML (fake) shows it now."""
        out: dict[str, dict[str, int]] = {}
        data = json.loads(self.cli("gpus", "--json").stdout)
        for g in data["gpus"]:
            for p in g["processes"]:
                if p["instance"]:
                    out.setdefault(p["instance"], {})[g["uuid"]] = p["used_bytes"]
        return out

    def events(self) -> list[dict[str, Any]]:
        path = self.tmp / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]


def gpus_of(count: int) -> dict[str, Any]:
    return {"gpus": [{"uuid": uuid(i), "name": "NVIDIA H100 80GB HBM3", "total": 80 * GIB,
                      "minor": i, "reserved": GIB // 2, "processes": []} for i in range(count)]}


@pytest.fixture
def pool(sandbox: Sandbox, tmp_path: Path) -> Iterator[Pool]:
    """Two fake 80 GiB GPUs; the manager's environment names them to every unit;
    a generous sleeping budget unless a test says otherwise."""
    scenario = write_scenario(tmp_path / "nvml.json",
                              held_by_processes(gpus_of(2), tmp_path / "held"))
    p = Pool(sandbox, tmp_path, scenario, tmp_path / "held")
    sandbox.systemctl("set-environment", f"PYTHONPATH={FAKE_DIR}",
                      f"FAKE_NVML_SCENARIO={scenario}", "UNITGEN_POOL_SLEEP_RAM=400GiB",
                      check=True)
    try:
        yield p
    finally:
        names = [f.stem for f in sandbox.unit_dir.glob("*.socket")
                 if "unitgen-instance" in f.read_text()]
        if names:
            p.cli("remove", "--user", *names)
        sandbox.systemctl("unset-environment", "PYTHONPATH", "FAKE_NVML_SCENARIO",
                          "UNITGEN_POOL_SLEEP_RAM")
        sandbox.systemctl("reset-failed")


def chat(port: int, model: str, timeout: float = 60) -> tuple[int, dict[str, Any]]:
    import http.client  # noqa: PLC0415

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": model}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def active(box: Sandbox, name: str) -> bool:
    return prop(box, f"{name}-backend.service", "ActiveState") == "active"


def test_two_members_side_by_side_and_a_third_evicts_the_least_recently_used(pool):
    ports = pool.deploy(*(pool.member(n, gib=30, extra="pool_sleep = false\n")
                          for n in ("a", "b")),
                        pool.member("c", gib=40, extra="pool_sleep = false\n"))
    assert chat(ports["a"], "m-a")[0] == 200
    time.sleep(1.2)  # a is used before b: b is the more recently used
    assert chat(ports["b"], "m-b")[0] == 200
    assert active(pool.box, "a") and active(pool.box, "b")  # 30 + 30 of 80: side by side
    held = pool.held_by()
    assert held["a"] == {uuid(0): 30 * GIB} and held["b"] == {uuid(0): 30 * GIB}
    status, body = chat(ports["c"], "m-c")
    assert status == 200, body
    assert not active(pool.box, "a") and active(pool.box, "b") and active(pool.box, "c")
    assert set(pool.held_by()) == {"b", "c"}
    journal = pool.box.journal("c.service", lines=40)
    assert "stopping a (idle since" in journal, journal



def test_a_member_that_cannot_fit_even_alone_is_refused_at_deploy(pool):
    # a 90 GiB GGUF (sparse: no disk taken) whose header does not say its shape:
    # its estimate is the file's size x 1.25, on an 80 GiB GPU
    model = pool.tmp / "huge.gguf"
    with model.open("wb") as fh:
        fh.truncate(90 * GIB)
    pool.member("big", gib=1)  # writes the stand-in's executable
    spec = write_spec(pool.tmp, "big", (
        f'name = "big"\nbackend = "llama-server"\nmodel = "{model}"\n'
        f'executable = "{pool.tmp / "gpu-standin"}"\nactivation = "on-demand"\ngpus = [0]\n'
        f"port = {run_ports('big')[0]}\n"))
    done = pool.cli("deploy", "--user", str(spec))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "big.toml: gpus: needs 112.5 GiB on GPU " in done.stderr, done.stderr
    assert "(estimate: GGUF 90.0 GiB x 1.25" in done.stderr
    assert "it cannot run even alone" in done.stderr
    assert not (pool.box.unit_dir / "big.socket").exists()


def test_always_on_instances_that_leave_a_member_no_room_are_refused(pool):
    eager = write_spec(pool.tmp, "fixed", custom_spec("fixed", extra=(
        'gpus = [0]\ngpu_share = true\ngpu_memory = "60GiB"\n')))
    member = pool.member("m", gib=30, extra="gpu_share = true\n")
    done = pool.cli("deploy", "--user", str(eager), str(member))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "m.toml: args: needs 30.0 GiB on GPU " in done.stderr, done.stderr
    assert "but the always-on fixed (" in done.stderr and "it could never load" in done.stderr
    assert not (pool.box.unit_dir / "m.socket").exists()


def test_a_member_on_two_gpus_makes_room_on_both(pool):
    ports = pool.deploy(pool.member("g0", gib=50, extra="pool_sleep = false\n"),
                        pool.member("g1", gib=50, gpus="[1]", extra="pool_sleep = false\n"),
                        pool.member("tp", gib=40, gpus="[0, 1]", extra="pool_sleep = false\n"))
    for name in ("g0", "g1"):
        assert chat(ports[name], f"m-{name}")[0] == 200
    assert pool.held_by() == {"g0": {uuid(0): 50 * GIB}, "g1": {uuid(1): 50 * GIB}}
    status, body = chat(ports["tp"], "m-tp")
    assert status == 200, body
    assert pool.held_by() == {"tp": {uuid(0): 40 * GIB, uuid(1): 40 * GIB}}
    journal = pool.box.journal("tp.service", lines=40)
    assert "stopping g0" in journal and "stopping g1" in journal, journal



def request(port: int, method: str, path: str) -> int:
    import http.client  # noqa: PLC0415

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path)
        return conn.getresponse().status
    finally:
        conn.close()


def test_an_evicted_vllm_member_sleeps_and_the_next_request_wakes_it(pool):
    ports = pool.deploy(pool.member("a", gib=50), pool.member("b", gib=50))
    status, first = chat(ports["a"], "m-a")
    assert status == 200
    # the sleep endpoints are unitgen's own: not through the public port, however spelled
    for path in ("/sleep?level=1", "/%73leep?level=1", "//sleep", "/is_sleeping", "/wake_up"):
        assert request(ports["a"], "POST" if "sleeping" not in path else "GET", path) == 404
    assert chat(ports["a"], "m-a")[0] == 200 and not pool.events()
    assert chat(ports["b"], "m-b")[0] == 200
    assert active(pool.box, "a")  # asleep: its process stays
    assert pool.held_by() == {"b": {uuid(0): 50 * GIB}}
    assert [(e["event"], e.get("level")) for e in pool.events()] == [("sleep", 1)]
    status, again = chat(ports["a"], "m-a")
    # woken, not loaded again
    assert status == 200 and again["pid"] == first["pid"], pool.box.journal("a.service")
    assert [e["event"] for e in pool.events()] == ["sleep", "sleep", "wake"]  # b slept for it
    assert pool.held_by() == {"a": {uuid(0): 50 * GIB}}
    assert "woken in" in pool.box.journal("a.service", lines=40)


def test_past_the_sleeping_budget_a_member_is_stopped_instead(pool):
    pool.box.systemctl("set-environment", "UNITGEN_POOL_SLEEP_RAM=1GiB", check=True)
    ports = pool.deploy(pool.member("a", gib=50), pool.member("b", gib=50))
    status, first = chat(ports["a"], "m-a")
    assert status == 200
    assert chat(ports["b"], "m-b")[0] == 200
    assert not active(pool.box, "a") and pool.events() == []
    journal = pool.box.journal("b.service", lines=40)
    assert "past the budget" in journal, journal
    status, again = chat(ports["a"], "m-a")
    assert status == 200 and again["pid"] != first["pid"]


def hammer(port: int, model: str, until: float, out: list[tuple[str, int, int]],
           timeout: float = 120) -> None:
    """Requests one after the other until ``until``: (model, status, pid) each."""
    while time.monotonic() < until:
        try:
            status, body = chat(port, model, timeout=timeout)
        except (OSError, http.client.HTTPException) as exc:
            status, body = -1, {"error": repr(exc), "at": time.monotonic()}
        out.append((model, status, int(body.get("pid", 0))))


def test_alternating_load_from_several_clients_is_all_answered(pool):
    ports = pool.deploy(*(pool.member(n, gib=50, min_turn="1s", extra="pool_sleep = false\n")
                          for n in ("a", "b")))
    sampler = Sampler(pool.box, ["a-backend.service", "b-backend.service"])
    sampler.start()
    results: list[tuple[str, int, int]] = []
    until = time.monotonic() + 12
    threads = [threading.Thread(target=hammer, args=(ports[n], f"m-{n}", until, results))
               for n in ("a", "b") for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    sampler.stop()
    bad = [r for r in results if r[1] != 200]
    assert bad == [], (bad, pool.box.journal(lines=200))
    loads = {n: {pid for m, _, pid in results if m == f"m-{n}"} for n in ("a", "b")}
    swaps = len(loads["a"]) + len(loads["b"]) - 1
    print(f"\n{len(results)} requests from 8 clients in 12 s, {swaps} swaps, "
          f"{len(results) / max(1, swaps):.1f} requests a swap")
    assert len(loads["a"]) >= 2 and len(loads["b"]) >= 2  # both kept getting turns
    assert sampler.overlaps() == []  # 50 + 50 of 80 GiB: never both loaded
    assert len(results) / swaps >= 4


def test_a_member_that_crashes_while_loading_frees_its_claim(pool):
    crash = pool.tmp / "crashing"
    crash.write_text(f"#!/bin/sh\n{sys.executable} {STANDIN} \"$@\" &\nsleep 0.3\n"
                     "kill -9 $!\nexit 1\n")
    crash.chmod(0o755)
    bad = pool.member("bad", gib=50, STANDIN_LOAD_SECONDS="5")
    bad.write_text(bad.read_text().replace(f'executable = "{pool.tmp / "gpu-standin"}"',
                                           f'executable = "{crash}"'))
    ports = pool.deploy(bad, pool.member("good", gib=50))
    failed: list[tuple[str, int, int]] = []
    asking = threading.Thread(target=hammer, args=(ports["bad"], "m-bad",
                                                   time.monotonic() + 0.5, failed, 60))
    asking.start()
    assert wait_for(lambda: prop(pool.box, "bad-backend.service", "ActiveState")
                    in ("activating", "failed"), 10, 0.02)
    t0 = time.monotonic()
    status, _ = chat(ports["good"], "m-good", timeout=120)
    took = time.monotonic() - t0
    assert status == 200
    print(f"\na request to good waited {took:.1f} s behind a member crashing while it loads")
    assert took < 30
    asking.join(180)
    # answered, not left waiting in its socket: a 503 that says why
    assert failed and all(s == 503 for _, s, _ in failed), failed
    # bad's queued requests tried it again until its start limit: it holds nothing
    assert wait_for(lambda: prop(pool.box, "bad-backend.service", "ActiveState")
                    not in ("active", "activating"), 60)
    assert chat(ports["good"], "m-good", timeout=120)[0] == 200
    assert pool.held_by() == {"good": {uuid(0): 50 * GIB}}


def test_two_deploys_race_and_both_members_know_each_other(pool):
    specs = [pool.member(n, gib=30) for n in ("ra", "rb")]
    procs = [subprocess.Popen([sys.executable, "-m", "unitgen", "deploy", "--user", str(s)],
                              env=pool.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for s in specs]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, out + err
    config = Path(pool.box.env["XDG_CONFIG_HOME"]) / "unitgen" / "pool"
    for name, other in (("ra", "rb"), ("rb", "ra")):
        members = [m["name"] for m in json.loads((config / f"{name}.json").read_text())["members"]]
        assert members == [name, other]
    ports = {n: run_ports(n)[0] for n in ("ra", "rb")}
    assert chat(ports["ra"], "m-ra")[0] == 200 and chat(ports["rb"], "m-rb")[0] == 200
    assert set(pool.held_by()) == {"ra", "rb"}


def test_requests_during_a_deploy_and_a_remove_of_a_member(pool):
    ports = pool.deploy(pool.member("a", gib=30), pool.member("b", gib=30))
    results: list[tuple[str, int, int]] = []
    stop = time.monotonic() + 3600
    flag = threading.Event()

    def load() -> None:
        while not flag.is_set():
            hammer(ports["a"], "m-a", min(stop, time.monotonic() + 0.2), results)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert chat(ports["b"], "m-b")[0] == 200
        # b changes (its spec and its pool file): a keeps answering meanwhile
        pool.deploy(pool.member("b", gib=40))
        assert chat(ports["b"], "m-b")[0] == 200
        pool.deploy(pool.member("c", gib=10))
        done = pool.cli("remove", "--user", "b")
        assert done.returncode == 0, done.stderr
    finally:
        flag.set()
        for t in threads:
            t.join(120)
    assert results and all(s == 200 for _, s, _ in results), [r for r in results if r[1] != 200]
    config = Path(pool.box.env["XDG_CONFIG_HOME"]) / "unitgen" / "pool"
    assert not (config / "b.json").exists()
    assert [m["name"] for m in json.loads((config / "a.json").read_text())["members"]] \
        == ["a", "c"]


def test_status_gpus_and_doctor_say_who_is_loaded_and_why_a_member_waits(pool):
    ports = pool.deploy(pool.member("a", gib=50, min_turn="10s", extra="pool_sleep = false\n"),
                        pool.member("b", gib=50))
    assert chat(ports["a"], "m-a")[0] == 200
    out: dict[str, Any] = {}
    waiting = threading.Thread(target=lambda: out.update(b=chat(ports["b"], "m-b")))
    waiting.start()
    assert wait_for(lambda: prop(pool.box, "b.service", "ActiveState") == "activating", 10)
    time.sleep(1)
    status = json.loads(pool.cli("status", "--user", "--json").stdout)
    doctor = pool.cli("doctor", "--user", "b").stdout
    gpus = pool.cli("gpus", "--user").stdout
    waiting.join(60)
    assert out["b"][0] == 200
    members = {m["name"]: m for m in status["gpu_pools"]["gpus"][0]["members"]}
    assert members["a"]["state"] == "loaded" and members["a"]["held_bytes"] == 50 * GIB
    assert members["a"]["need"].startswith("50.0 GiB: 0.625 of each GPU (backend-args")
    assert members["b"]["state"] == "waiting"
    assert "a's minimum turn ends in" in members["b"]["waiting_why"], members["b"]
    assert "needs 50.0 GiB on GPU-" in members["b"]["waiting_why"]
    assert "b has waited" in doctor and "a's minimum turn ends in" in doctor, doctor
    assert "on GPU-" in doctor and "a loaded, holds 50.0 GiB" in doctor, doctor
    assert f"GPU 0 {uuid(0)} (80.0 GiB, 29.5 GiB free): GPU pool of 2" in gpus, gpus
    assert "  b  waiting  needs 50.0 GiB" in gpus, gpus
    assert not active(pool.box, "a")  # made room once its minimum turn was over


def test_pool_members_behind_the_gateway_wait_and_are_answered_never_503(pool):
    from tests.gateway_cases import client, gateway  # noqa: PLC0415

    port = free_port()
    specs = [pool.member(n, gib=50, extra='gateway = "gwp"\n', STANDIN_LOAD_SECONDS="1")
             for n in ("pa", "pb")]
    pool.deploy(*specs, gateway(pool.tmp, "gwp", port))
    sdk = client(port)
    for name in ("pa", "pb", "pa"):  # each one makes the other sleep
        r = sdk.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}])
        assert r.model == name
    answers: list[str] = []
    errors: list[str] = []

    def ask(name: str) -> None:
        for _ in range(5):
            try:
                r = client(port).chat.completions.create(model=name, messages=[])
                answers.append(r.model)
            except Exception as exc:  # the assertion below names it
                errors.append(f"{name}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=ask, args=(n,)) for n in ("pa", "pb") for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    assert sorted(answers) == ["pa"] * 10 + ["pb"] * 10
    assert {e["event"] for e in pool.events()} == {"sleep", "wake"}


def test_a_sleeping_member_idle_past_its_idle_stop_is_stopped(pool):
    ports = pool.deploy(pool.member("a", gib=50, extra='idle_stop = "3s"\n'),
                        pool.member("b", gib=50))
    assert chat(ports["a"], "m-a")[0] == 200
    assert chat(ports["b"], "m-b")[0] == 200
    assert [e["event"] for e in pool.events()] == ["sleep"]
    assert active(pool.box, "a")  # asleep, its proxy waiting for the next request
    assert prop(pool.box, "a.service", "ActiveState") == "active"
    assert wait_for(lambda: not active(pool.box, "a"), 10)
    assert wait_for(lambda: prop(pool.box, "a.service", "ActiveState") == "inactive", 10)
    assert "asleep and idle for 3 s (idle_stop): stopping the server" in pool.box.journal(
        "a.service", lines=30)
    assert chat(ports["a"], "m-a")[0] == 200  # loaded again
