"""The core behaviours on a real systemd user manager, real socket activation and
real systemd-socket-proxyd, with a stand-in server (issue 2, tests 1-8)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    custom_spec,
    free_port,
    get,
    install,
    prop,
    standin_exe,
    uninstall,
    wait_for,
    write_spec,
)
from unitgen.ops.systemd.sandbox import Sandbox

pytestmark = pytest.mark.systemd


@pytest.fixture
def names(sandbox: Sandbox) -> Iterator[list[str]]:
    """Instance names a test installs; removed afterwards whatever happened."""
    created: list[str] = []
    yield created
    for name in created:
        uninstall(sandbox, name)


def test_eager_start_returns_when_public_port_answers(sandbox, names, tmp_path):
    port = free_port()
    spec = write_spec(tmp_path, "eager", custom_spec(
        "eager", port=port, env={"STANDIN_LOAD_SECONDS": "2", "STANDIN_LOADING": "503"},
        extra='[health]\ntimeout = "60s"\n'))
    names.append("eager")
    install(sandbox, spec)
    t0 = time.monotonic()
    done = sandbox.systemctl("start", "eager.service")
    elapsed = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    assert elapsed >= 2.0, "start returned before the server finished loading"
    # Right after start returns, the public port answers the health path.
    status, body = get(port, timeout=2)
    assert status == 200 and body["status"] == "ok"
    assert prop(sandbox, "eager.service", "ActiveState") == "active"
    assert prop(sandbox, "eager-backend.service", "ActiveState") == "active"


def test_on_demand_first_request_waits_for_load(sandbox, names, tmp_path):
    port = free_port()
    spec = write_spec(tmp_path, "lazy", custom_spec(
        "lazy", port=port, env={"STANDIN_LOAD_SECONDS": "2", "STANDIN_LOADING": "refuse"},
        extra='activation = "on-demand"\n'))
    names.append("lazy")
    install(sandbox, spec)
    assert sandbox.systemctl("start", "lazy.socket").returncode == 0
    assert prop(sandbox, "lazy-backend.service", "ActiveState") == "inactive"
    t0 = time.monotonic()
    status, _ = get(port, "/v1/models", timeout=60)
    assert status == 200
    assert time.monotonic() - t0 >= 2.0
    assert prop(sandbox, "lazy-backend.service", "ActiveState") == "active"


def test_idle_stop_frees_the_server_and_restarts_on_demand(sandbox, names, tmp_path):
    port = free_port()
    spec = write_spec(tmp_path, "idle", custom_spec(
        "idle", port=port, env={"STANDIN_LOADING": "503"},
        extra='activation = "on-demand"\nidle_stop = "2s"\n'))
    names.append("idle")
    install(sandbox, spec)
    sandbox.systemctl("start", "idle.socket", check=True)
    status, first = get(port, "/x")
    assert status == 200
    pid = first["pid"]
    assert wait_for(lambda: prop(sandbox, "idle-backend.service", "ActiveState") == "inactive", 15)
    assert not Path(f"/proc/{pid}").exists(), "server process survived the idle stop"
    assert prop(sandbox, "idle.socket", "ActiveState") == "active"
    shown = subprocess.run([sys.executable, "-m", "unitgen", "status", "--user", "idle"],
                           env={**os.environ, **sandbox.env}, capture_output=True, text=True)
    assert shown.stdout.splitlines()[1].split()[1] == "idle-stopped", shown.stdout
    status, second = get(port, "/x")
    assert status == 200 and second["pid"] != pid


def test_kill_9_restarts_and_requests_during_restart_succeed(sandbox, names, tmp_path):
    port = free_port()
    spec = write_spec(tmp_path, "crashy", custom_spec(
        "crashy", port=port, env={"STANDIN_LOAD_SECONDS": "1", "STANDIN_LOADING": "refuse"}))
    names.append("crashy")
    install(sandbox, spec)
    sandbox.systemctl("start", "crashy.service", check=True)
    _, before = get(port, "/a")
    os.kill(int(before["pid"]), signal.SIGKILL)
    # "During the restart": once systemd has seen the crash. A connection that
    # reaches the proxy in the instant before that is reset, because
    # systemd-socket-proxyd never retries a backend (systemd#2105).
    assert wait_for(lambda: prop(sandbox, "crashy-backend.service", "NRestarts") != "0"
                    or prop(sandbox, "crashy-backend.service", "SubState") != "running", 10,
                    interval=0.01)
    states = (prop(sandbox, "crashy.service", "ActiveState"),
              prop(sandbox, "crashy-backend.service", "SubState"))
    t0 = time.monotonic()
    status, after = get(port, "/b", timeout=60)
    assert status == 200, (after, states)
    assert after["pid"] != before["pid"]
    assert time.monotonic() - t0 < 30
    listen = prop(sandbox, "crashy.socket", "Listen")
    assert listen == f"127.0.0.1:{port} (Stream)"
    assert int(prop(sandbox, "crashy-backend.service", "NRestarts")) >= 1


def test_stopping_the_socket_stops_every_unit(sandbox, names, tmp_path):
    port = free_port()
    spec = write_spec(tmp_path, "stopme", custom_spec("stopme", port=port, env={}))
    names.append("stopme")
    install(sandbox, spec)
    sandbox.systemctl("start", "stopme.service", check=True)
    _, body = get(port)
    sandbox.systemctl("stop", "stopme.socket", check=True)
    for unit in ("stopme.socket", "stopme.service", "stopme-backend.service"):
        assert wait_for(lambda u=unit: prop(sandbox, u, "ActiveState") == "inactive", 10), unit
    assert not Path(f"/proc/{body['pid']}").exists()
    with pytest.raises(OSError):
        get(port, timeout=2)


def test_never_ready_fails_at_the_deadline_with_a_reason(sandbox, names, tmp_path):
    port = free_port()
    spec = write_spec(tmp_path, "stuck", custom_spec(
        "stuck", port=port, env={"STANDIN_NEVER_READY": "1", "STANDIN_LOADING": "503"},
        extra='[health]\ntimeout = "3s"\n'))
    names.append("stuck")
    install(sandbox, spec)
    t0 = time.monotonic()
    done = sandbox.systemctl("start", "stuck.service")
    elapsed = time.monotonic() - t0
    assert done.returncode != 0
    assert 3.0 <= elapsed < 15.0, f"start took {elapsed:.1f} s for a 3 s deadline"
    # The server's unit failed; the proxy's start job failed with it ("dependency").
    assert prop(sandbox, "stuck-backend.service", "ActiveState") == "failed"
    assert prop(sandbox, "stuck.service", "ActiveState") in ("failed", "inactive")
    assert "dependency job for stuck.service failed" in done.stderr
    status_text = prop(sandbox, "stuck-backend.service", "StatusText")
    journal = sandbox.journal("stuck-backend.service")
    reason = "not ready after 3s (the [health] timeout); last answer: 503 Loading model"
    assert reason in status_text
    assert reason in journal
    # it does not loop: the unit stays failed instead of loading again and again
    time.sleep(3)
    assert prop(sandbox, "stuck-backend.service", "ActiveState") == "failed"
    assert prop(sandbox, "stuck-backend.service", "NRestarts") == "0"


BACKEND_LOADING = {
    "vllm": "refuse", "sglang": "503", "llama-server": "503", "llama-box": "404",
    "vox-box": "refuse",
}


@pytest.mark.parametrize("backend", sorted(BACKEND_LOADING))
def test_gpustack_2154_port_in_args_is_served_and_probed(sandbox, names, tmp_path, backend):
    """--port in args: the instance comes up on that one port, served and probed."""
    exe, port = standin_exe(tmp_path), free_port()
    name = f"g2154-{backend}"
    record = tmp_path / "record.json"
    spec = write_spec(tmp_path, name, (
        f'name = "{name}"\nbackend = "{backend}"\nmodel = "/models/m.gguf"\n'
        f'executable = "{exe}"\nargs = ["--port", "{port}"]\n'
        f'env = {{ STANDIN_LOADING = "{BACKEND_LOADING[backend]}", STANDIN_LOAD_SECONDS = "1", '
        f'STANDIN_RECORD = "{record}" }}\n'
    ))
    names.append(name)
    install(sandbox, spec)
    done = sandbox.systemctl("start", f"{name}.service", timeout=60)
    assert done.returncode == 0, done.stderr + sandbox.journal(f"{name}-backend.service")
    assert get(port)[0] == 200
    assert prop(sandbox, f"{name}.socket", "Listen") == f"127.0.0.1:{port} (Stream)"
    argv = __import__("json").loads(record.read_text())["argv"]
    assert str(port) not in argv, f"the server was told the public port: {argv}"


@pytest.mark.parametrize("backend", [*sorted(BACKEND_LOADING), "custom"])
def test_gpustack_2154_conflicting_port_is_refused_by_check(tmp_path, backend):
    extra = ('command = ["/bin/srv", "--port", "9000"]\n' if backend == "custom"
             else 'model = "m"\nargs = ["--port", "9000"]\n')
    spec = write_spec(tmp_path, "c", f'name = "c"\nbackend = "{backend}"\nport = 40001\n{extra}')
    done = subprocess.run([sys.executable, "-m", "unitgen", "check", str(spec)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "--port 9000" in done.stderr and str(spec) in done.stderr
    if backend != "custom":
        assert "conflicts with port = 40001" in done.stderr
    assert "Traceback" not in done.stderr


def test_api_key_instance_becomes_ready_and_key_is_in_no_unit(sandbox, names, tmp_path):
    exe, port = standin_exe(tmp_path), free_port()
    key = "sk-unitgen-test-$ecret%n\"quoted\""
    record = tmp_path / "record.json"
    key_toml = key.replace("\\", "\\\\").replace('"', '\\"')
    spec = write_spec(tmp_path, "keyed", (
        f'name = "keyed"\nbackend = "vllm"\nmodel = "m"\nexecutable = "{exe}"\nport = {port}\n'
        f'args = ["--api-key", "{key_toml}"]\n'
        f'env = {{ STANDIN_KEY_ENV = "VLLM_API_KEY", STANDIN_RECORD = "{record}" }}\n'
    ))
    names.append("keyed")
    install(sandbox, spec)
    done = sandbox.systemctl("start", "keyed.service", timeout=60)
    assert done.returncode == 0, sandbox.journal("keyed-backend.service")
    assert get(port, "/v1/models", key=key)[0] == 200
    assert get(port, "/v1/models")[0] == 401  # vLLM checks the key under /v1 only
    for unit in sandbox.unit_dir.glob("keyed*"):
        assert "sk-unitgen" not in unit.read_text()
    secret = sandbox.root / "home/.config/unitgen/secrets/keyed.env"
    assert secret.stat().st_mode & 0o777 == 0o600
    recorded = __import__("json").loads(record.read_text())
    assert recorded["env"]["VLLM_API_KEY"] == key
    assert not any("sk-unitgen" in a for a in recorded["argv"])
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        assert b"sk-unitgen" not in cmdline, f"key visible in argv of pid {proc.name}"


def test_concurrent_clients_during_load_all_succeed(sandbox, names, tmp_path):
    """Clients that connect while the model loads wait instead of failing."""
    port = free_port()
    spec = write_spec(tmp_path, "crowd", custom_spec(
        "crowd", port=port, env={"STANDIN_LOAD_SECONDS": "2", "STANDIN_LOADING": "refuse"},
        extra='activation = "on-demand"\n'))
    names.append("crowd")
    install(sandbox, spec)
    sandbox.systemctl("start", "crowd.socket", check=True)
    results: list[int] = []

    def client() -> None:
        try:
            results.append(get(port, "/v1/models", timeout=60)[0])
        except OSError:
            results.append(-1)

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 20
