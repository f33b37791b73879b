"""The GPU stand-ins (tests/gpu_standin.py) behave like vLLM and SGLang at the
edges the GPU pool uses: the memory NVML (fake) sees appears on load, goes on
sleep and on exit, comes back on wake; they are put to sleep with the calls of
the backend table; and the policy's answer, carried out on them, frees what it
promised."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, wait_for
from tests.nvml import GIB, eight_gpus, fake_nvml, held_by_processes, uuid
from unitgen.inunit.gpuneed import Need
from unitgen.inunit.nvml import read_gpus
from unitgen.inunit.poolpolicy import Action, GpuFree, Load, MemberState, Verdict, decide
from unitgen.plan.memneed import memory_need
from unitgen.spec.backends import BACKENDS, Call, SleepMode
from unitgen.spec.model import parse_spec

__all__ = ["fake_nvml"]  # the fixture, re-exported for pytest

STANDIN = Path(__file__).resolve().parents[1] / "gpu_standin.py"


def sleep_mode(backend: str) -> SleepMode:
    mode = BACKENDS[backend].sleep
    assert mode is not None, backend
    return mode


VLLM, SGLANG = sleep_mode("vllm"), sleep_mode("sglang")


def request(port: int, method: str, path: str, body: str = "", key: str | None = None
            ) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if body:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(data) if data else None


def call(port: int, c: Call) -> int:
    return request(port, c.method, c.path, c.body)[0]


@pytest.fixture
def gpus(fake_nvml: Any, tmp_path: Path) -> Path:
    scenario: Path = fake_nvml(held_by_processes(eight_gpus(), tmp_path / "held"))
    return scenario


@pytest.fixture
def start(gpus: Path, tmp_path: Path) -> Iterator[Any]:
    """Start a stand-in with these argv words and variables; stopped at the end."""
    procs: list[subprocess.Popen[bytes]] = []

    def run(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, int]:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, str(STANDIN), *argv, "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, "STANDIN_EVENTS": str(tmp_path / "events"), **(env or {})},
            stderr=subprocess.DEVNULL)
        procs.append(proc)

        def up() -> bool:
            try:
                return request(port, "GET", "/health")[0] == 200
            except OSError:
                return False

        assert wait_for(up, 15), argv
        return port, proc.pid

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def held(pid: int) -> dict[str, int]:
    """GPU UUID -> what NVML says ``pid`` holds there."""
    return {g.uuid: p.used_bytes for g in read_gpus() for p in g.processes if p.pid == pid}


def test_vllm_holds_its_utilization_sleeps_with_the_tables_calls_and_wakes(start, tmp_path):
    argv = ["serve", "org/m", "--gpu-memory-utilization", "0.5", "--enable-sleep-mode",
            "--served-model-name", "m1", "m2"]
    port, pid = start(argv, {"CUDA_VISIBLE_DEVICES": f"{uuid(0)},{uuid(1)}",
                             "VLLM_SERVER_DEV_MODE": "1", "VLLM_API_KEY": "k"})
    assert held(pid) == {uuid(0): 40 * GIB, uuid(1): 40 * GIB}
    # what unitgen would resolve for this server is what it takes
    spec = parse_spec(f'name = "m"\nbackend = "vllm"\nmodel = "org/m"\nargs = {json.dumps(argv[2:])}'
                      "\n", "m.toml")
    assert memory_need(spec).on(80 * GIB) == 40 * GIB
    # its key only under /v1; a model it does not serve is 404
    assert request(port, "GET", "/v1/models")[0] == 401
    assert request(port, "GET", "/is_sleeping")[1] == {"is_sleeping": False}
    chat = json.dumps({"model": "other", "messages": []})
    assert request(port, "POST", "/v1/chat/completions", chat, key="k")[0] == 404
    chat = json.dumps({"model": "m2", "messages": []})
    assert request(port, "POST", "/v1/chat/completions", chat, key="k")[0] == 200

    assert VLLM.sleep == Call("POST", "/sleep?level=1") and call(port, VLLM.sleep) == 200
    assert VLLM.is_sleeping is not None
    assert request(port, VLLM.is_sleeping.method, VLLM.is_sleeping.path)[1] == {
        "is_sleeping": True}
    assert held(pid) == {}  # the memory is free; the process lives
    assert request(port, "POST", "/v1/chat/completions", chat, key="k")[0] == 503
    assert call(port, VLLM.wake) == 200
    assert held(pid) == {uuid(0): 40 * GIB, uuid(1): 40 * GIB}
    assert request(port, "POST", "/v1/chat/completions", chat, key="k")[0] == 200
    # the level is a query parameter: a body saying another level is not read
    assert request(port, "POST", "/sleep?level=2")[0] == 200
    assert request(port, "POST", "/sleep", json.dumps({"level": 2}))[0] == 200
    levels = [e.get("level") for e in map(json.loads, (tmp_path / "events").read_text()
                                          .splitlines()) if e["event"] == "sleep"]
    assert levels == [1, 2, 1]


def test_vllm_has_no_sleep_endpoints_without_dev_mode_or_sleep_mode(start):
    port, pid = start(["serve", "org/m"], {"CUDA_VISIBLE_DEVICES": uuid(2)})
    assert held(pid) == {uuid(2): int(0.9 * 80 * GIB)}  # its default utilization
    assert request(port, "POST", "/sleep?level=1")[0] == 404
    assert request(port, "GET", "/is_sleeping")[0] == 404
    port, _ = start(["serve", "org/m"], {"VLLM_SERVER_DEV_MODE": "1"})
    assert request(port, "POST", "/sleep?level=1")[0] == 500  # no --enable-sleep-mode


def test_sglang_releases_and_resumes_with_the_tables_calls(start):
    port, pid = start(["-m", "sglang.launch_server", "--model-path", "org/m",
                       "--mem-fraction-static", "0.25", "--api-key", "k", *SGLANG.flags],
                      {"CUDA_VISIBLE_DEVICES": "3", "STANDIN_ASLEEP_BYTES": str(GIB)})
    assert held(pid) == {uuid(3): 20 * GIB}
    # its key on every path but /health and /metrics
    assert request(port, "GET", "/v1/models")[0] == 401
    assert request(port, "POST", SGLANG.sleep.path, "{}")[0] == 401

    def with_key(c: Call) -> int:
        return request(port, c.method, c.path, c.body, key="k")[0]

    assert request(port, "POST", SGLANG.sleep.path, key="k")[0] == 422  # FastAPI wants a body
    assert with_key(SGLANG.sleep) == 200 and held(pid) == {uuid(3): GIB}
    assert with_key(SGLANG.wake) == 200 and held(pid) == {uuid(3): 20 * GIB}
    chat = json.dumps({"model": "anything", "messages": []})
    assert request(port, "POST", "/v1/chat/completions", chat, key="k")[0] == 200
    port, _ = start(["-m", "sglang.launch_server", "--model-path", "org/m"])
    assert request(port, "POST", SGLANG.sleep.path, "{}")[0] == 400  # no --enable-memory-saver


def test_its_memory_goes_when_it_stops_or_is_killed(start, gpus):
    _, first = start(["serve", "org/m"])
    _, second = start(["-m", "sglang.launch_server", "--model-path", "org/m"])
    os.kill(first, signal.SIGTERM)
    assert wait_for(lambda: held(first) == {}, 10)
    assert not (Path(json.loads(gpus.read_text())["held_dir"]) / f"{first}.json").exists()
    os.kill(second, signal.SIGKILL)  # no chance to say so: the fake sees it is gone
    assert wait_for(lambda: held(second) == {}, 10)


def test_the_policys_answer_carried_out_frees_what_it_promised(start):
    """Two vLLM members loaded on GPU 0 (30 + 35 GiB), a third that needs 40:
    the policy puts the least recently used one to sleep; once it sleeps,
    NVML shows the room the policy counted on."""
    gpu0 = {"CUDA_VISIBLE_DEVICES": uuid(0), "VLLM_SERVER_DEV_MODE": "1"}
    ports, states = {}, []
    for name, fraction, used in (("a", 0.375, 100.0), ("b", 0.4375, 200.0)):
        port, pid = start(["serve", "org/m", "--gpu-memory-utilization", str(fraction),
                           "--enable-sleep-mode"], gpu0)
        ports[name] = port
        states.append(MemberState(
            name, (uuid(0),), Need.from_arg(f"backend-args:{fraction}x"), Load.LOADED,
            last_used=used, can_sleep=True, ram_asleep=16 * GIB,
            held={uuid(0): held(pid)[uuid(0)]}))
    want = MemberState("c", (uuid(0),), Need.from_arg("backend-args:0.5x"))

    def pool() -> list[GpuFree]:
        return [GpuFree(g.uuid, g.total, g.free) for g in read_gpus() if g.uuid == uuid(0)]

    d = decide(want, [*states, want], pool(), 32 * GIB, now=300.0)
    assert d.verdict == Verdict.GO and [(e.name, e.action) for e in d.evict] == [
        ("a", Action.SLEEP)]
    for e in d.evict:
        assert call(ports[e.name], VLLM.sleep) == 200
    assert pool()[0].free >= want.need.on(80 * GIB)
