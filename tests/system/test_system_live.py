"""The system-scope tier: unitgen at system scope on a real system manager (this
machine's OS booted as a throwaway container, tests/nspawn.py), with every
hardening default on. For each built-in backend's rendered unit: deploy,
the stand-in answering through the public port as a sandboxed dynamic user,
status, remove; and a liveness restart where the journal has the manager's
own verdict."""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import STANDIN, get, wait_for
from tests.live.test_faults_live import REQUEST_BOUND, load_and_kill
from tests.nspawn import Container, nspawn_unavailable_reason
from unitgen.spec.backends import BACKENDS

pytestmark = pytest.mark.systemd

WRAPPER = "/opt/unitgen-test/standin"  # not in /tmp: the units have PrivateTmp=yes
SANDBOX_KEYS = {
    "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
    "PrivateTmp": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "ProtectClock": "yes",
    "ProtectHostname": "yes", "RestrictNamespaces": "no", "DevicePolicy": "closed",
    "UMask": "0077", "RestrictRealtime": "yes", "LockPersonality": "yes",
}


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """A booted container, with the stand-in wrapper installed inside."""
    reason = nspawn_unavailable_reason()
    if reason:
        pytest.skip(f"no system manager to test on: {reason}")
    log = tmp_path_factory.mktemp("nspawn") / "nspawn.log"
    try:
        container = Container.boot(f"unitgen-t{int(time.time() * 1000) % 10**8}", log)
    except RuntimeError as exc:
        pytest.skip(f"systemd-nspawn cannot boot this machine's OS here: {exc}")
    try:
        container.put(WRAPPER, f'#!/bin/sh\nexec {sys.executable} {STANDIN} "$@"\n', 0o755)
        yield container
    finally:
        container.stop()


def deploy(box: Container, name: str, text: str) -> tuple[int, dict[str, Any]]:
    path = f"/srv/specs/{name}.toml"
    box.put(path, text)
    done = box.unitgen("deploy", path, "--json")
    try:
        return done.returncode, json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"{done.stdout}\n{done.stderr}") from None


def remove(box: Container, name: str) -> None:
    done = box.unitgen("remove", name)
    assert done.returncode == 0, done.stdout + done.stderr


def backend_spec(backend: str, name: str, *, health: str = "", env: str = "") -> str:
    """A spec of ``backend`` whose executable is the stand-in; ``health`` adds
    [health] keys, ``env`` is the inside of an inline env table."""
    if backend == "custom":
        head = (f'name = "{name}"\nbackend = "custom"\n'
                f'command = ["{WRAPPER}", "--host", "{{host}}", "--port", "{{port}}"]\n')
    else:
        head = (f'name = "{name}"\nbackend = "{backend}"\nmodel = "org/model"\n'
                f'executable = "{WRAPPER}"\n')
    return head + f"env = {{ {env} }}\n" + '[health]\ntimeout = "60s"\n' + health


def status_row(box: Container, name: str) -> dict[str, Any]:
    done = box.unitgen("status", name, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    row: dict[str, Any] = json.loads(done.stdout)["instances"][0]
    return row


def public_port(data: dict[str, Any]) -> int:
    return int(data["instances"][0]["public"].rsplit(":", 1)[1])


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_each_backend_runs_sandboxed_at_system_scope(box, backend):
    name = f"sys-{backend}"
    rc, data = deploy(box, name, backend_spec(backend, name))
    try:
        assert rc == 0, (data, box.journal(f"{name}-backend.service"))
        port = public_port(data)
        code, body = get(port, "/v1/models")
        assert code == 200, body
        server = f"{name}-backend.service"
        shown = {k: box.prop(server, k) for k in SANDBOX_KEYS}
        expected = dict(SANDBOX_KEYS, RestrictNamespaces=shown["RestrictNamespaces"])
        assert shown == expected
        assert box.prop(server, "CapabilityBoundingSet") in ("", "cap_net_bind_service")
        # the server really runs as its own unprivileged user, under the sandbox
        pid = box.prop(server, "MainPID")
        uid = box.run(["stat", "-c", "%u", f"/proc/{pid}"]).stdout.strip()
        assert uid.isdigit() and int(uid) != 0, uid
        assert body["pid"] == int(pid)
        row = status_row(box, name)
        assert row["state"] == "ready", row
        doctor = box.unitgen("doctor", name)
        assert doctor.returncode == 0, doctor.stdout
        assert "the liveness checker runs" in doctor.stdout
    finally:
        remove(box, name)
    assert box.run(["test", "-e", f"/etc/systemd/system/{name}.socket"]).returncode != 0
    with pytest.raises(OSError):
        get(port, timeout=2)


def test_offline_unix_socket_server_has_no_network_and_answers(box):
    name = "sys-offline"
    rc, data = deploy(box, name, (f'name = "{name}"\nbackend = "vllm"\n'
                                  f'model = "/srv/models/qwen"\nexecutable = "{WRAPPER}"\n'))
    try:
        assert rc == 0, data
        assert box.prop(f"{name}-backend.service", "PrivateNetwork") == "yes"
        assert get(public_port(data))[0] == 200
    finally:
        remove(box, name)


def test_hang_is_restarted_by_the_watchdog_at_system_scope(box):
    name = "sys-hang"
    state = f"/var/lib/unitgen-{name}"  # the dynamic user's own state directory
    rc, data = deploy(box, name, backend_spec(
        "custom", name, health='watchdog = "6s"\n',
        env=f'STANDIN_HANG_AFTER = "4", STANDIN_HANG_ONCE = "{state}/hung"'))
    server = f"{name}-backend.service"
    try:
        assert rc == 0, data
        port = public_port(data)
        first = int(box.prop(server, "MainPID"))
        assert wait_for(lambda: box.prop(server, "NRestarts") == "1", 40), \
            box.journal(server)
        assert wait_for(lambda: status_row(box, name)["state"] == "ready", 30)
        row = status_row(box, name)
        assert row["pid"] != first
        # here the journal has the manager's own verdict
        assert "restarted 1 time; last: watchdog (" in row["detail"], row
        assert "did not answer" in row["detail"], row
        code, body = get(port, "/v1/models")
        assert code == 200 and body["pid"] != first
    finally:
        remove(box, name)


def test_an_api_key_appears_nowhere_but_its_secret_file(box):
    key = "sk-unitgen-" + secrets.token_hex(12)
    name = "sys-secret"
    text = (f'name = "{name}"\nbackend = "vllm"\nmodel = "org/model"\nexecutable = "{WRAPPER}"\n'
            f'args = ["--api-key", "{key}"]\nenv = {{ STANDIN_KEY_ENV = "VLLM_API_KEY" }}\n'
            '[health]\ntimeout = "60s"\nwatchdog = "3s"\n')
    path = f"/srv/specs/{name}.toml"
    box.put(path, text, 0o600)
    outputs = []
    try:
        done = box.unitgen("deploy", path, "--json")
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stdout + done.stderr
        port = public_port(json.loads(done.stdout))
        assert get(port, "/v1/models", key=key)[0] == 200
        assert get(port, "/v1/models")[0] == 401  # the server really wants the key
        time.sleep(4)  # the liveness checker has sent the key a few times by now
        for args in (["status"], ["status", "--json"], ["doctor", name], ["doctor", name, "--json"],
                     ["ls"], ["logs", name]):
            done = box.unitgen(*args)
            outputs.append(done.stdout + done.stderr)
        places = {
            "unitgen output": "\n".join(outputs),
            "unit files": box.run(["sh", "-c", f"cat /etc/systemd/system/{name}*"]).stdout,
            "systemctl show": box.run(["systemctl", "show", f"{name}.service",
                                       f"{name}-backend.service"]).stdout,
            "argv in the container": box.run(
                ["sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '"]).stdout,
            "argv on the host": "".join(_host_cmdlines()),
            "the journal": box.run(["journalctl", "--no-pager", "-o", "export"]).stdout,
        }
        assert all(places.values()), [k for k, v in places.items() if not v]
        leaked = [where for where, content in places.items() if key in content]
        assert not leaked, f"the key leaked into: {leaked}"
        # where it is: the secret file, readable by root only
        secret = f"/etc/unitgen/secrets/{name}.env"
        assert key in box.run(["cat", secret]).stdout
        assert box.run(["stat", "-c", "%a %U", secret]).stdout.split() == ["600", "root"]
    finally:
        remove(box, name)


def _host_cmdlines() -> list[str]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                out.append((entry / "cmdline").read_bytes().decode("utf-8", "replace"))
    return out


def test_kill_9_under_load_at_system_scope(box):
    name = "sys-load"
    rc, data = deploy(box, name, backend_spec("custom", name, env='STANDIN_LOAD_SECONDS = "1", '
                                                                  'STANDIN_LOADING = "refuse"'))
    server = f"{name}-backend.service"
    try:
        assert rc == 0, data
        port = public_port(data)
        tally = load_and_kill(port, lambda: box.run(
            ["kill", "-9", box.prop(server, "MainPID")], check=True))
        print(f"\nkill -9 under load (system scope): {tally.line()}")
        total = tally.ok + tally.reset + tally.refused + tally.hung + tally.other
        if tally.reset > 50:
            print(box.journal(server, 60), box.journal(f"{name}.service", 60))
        assert tally.hung == 0 and tally.slowest < REQUEST_BOUND
        assert tally.refused == 0 and tally.ok > 0
        assert tally.reset + tally.other <= max(6, total // 4), tally
        assert wait_for(lambda: box.prop(server, "NRestarts") == "1", 30)
        assert get(port)[0] == 200
    finally:
        remove(box, name)


def test_on_demand_and_idle_stop_with_the_proxy_as_the_servers_user(box):
    # issue 25: the proxy runs as the server's dynamic user (one uid, named in
    # both units); starting on demand, stopping when idle and the server's own
    # state directory work as before
    name = "sys-idle"
    text = backend_spec("vllm", name).replace(
        "[health]", 'activation = "on-demand"\nidle_stop = "3s"\n[health]')
    rc, data = deploy(box, name, text)
    server = f"{name}-backend.service"
    try:
        assert rc == 0, data
        port = public_port(data)
        for _ in range(2):
            assert box.prop(server, "ActiveState") != "active"
            assert get(port, "/v1/models", timeout=60)[0] == 200
            uids = {box.run(["stat", "-c", "%u", f"/proc/{box.prop(unit, 'MainPID')}"]).stdout
                    for unit in (server, f"{name}.service")}
            state = box.run(["stat", "-L", "-c", "%u", f"/var/lib/unitgen-{name}"]).stdout
            assert len(uids) == 1 and uids == {state} and state.strip() != "0", (uids, state)
            assert wait_for(lambda: box.prop(server, "ActiveState") == "inactive", 30), \
                box.journal(f"{name}.service")
    finally:
        remove(box, name)


GPU_STANDIN = "/opt/unitgen-test/gpu-standin"
HELD = "/srv/gpu-held"  # where the GPU stand-ins say what they hold (the fake driver's view)


def _pool_member(name: str, gib: int) -> str:
    """An on-demand vLLM stand-in that holds ``gib`` GiB of the fake 80 GiB GPU."""
    return (f'name = "{name}"\nbackend = "vllm"\nmodel = "m-{name}"\n'
            f'executable = "{GPU_STANDIN}"\nactivation = "on-demand"\ngpus = [0]\n'
            f'args = ["--gpu-memory-utilization", "{gib / 80:g}"]\nswap_drain = "10s"\n'
            f'env = {{ STANDIN_LOAD_SECONDS = "0.3" }}\n'
            f'systemd = {{ service = {{ ReadWritePaths = "{HELD}" }} }}\n'
            '[health]\ntimeout = "60s"\n')


def test_pool_members_share_a_gpu_by_memory_at_system_scope(box):
    # GPU pools were tested at user scope only: here the members' proxies stay
    # root with CAP_DAC_OVERRIDE alone (they start, stop and signal other members'
    # units), the servers are sandboxed dynamic users, and NVML (faked at the
    # pynvml boundary, through the manager's environment) shows what each holds
    from tests.nvml import FAKE_DIR, GIB, uuid  # noqa: PLC0415

    box.run(["install", "-d", "-m", "1777", HELD], check=True)
    scenario = {"gpus": [{"uuid": uuid(0), "name": "NVIDIA H100 80GB HBM3", "total": 80 * GIB,
                          "minor": 0, "reserved": GIB // 2, "processes": []}], "held_dir": HELD}
    box.put("/srv/nvml.json", json.dumps(scenario))
    box.put(GPU_STANDIN, f'#!/bin/sh\nexec {sys.executable} '
            f'{Path(__file__).resolve().parents[1] / "gpu_standin.py"} "$@"\n', 0o755)
    env = {"PYTHONPATH": str(FAKE_DIR), "FAKE_NVML_SCENARIO": "/srv/nvml.json",
           "UNITGEN_POOL_SLEEP_RAM": "400GiB"}
    box.run(["systemctl", "set-environment", *(f"{k}={v}" for k, v in env.items())], check=True)
    names = {"sys-pa": 30, "sys-pb": 30, "sys-pc": 40}
    try:
        for name, gib in names.items():
            box.put(f"/srv/specs/{name}.toml", _pool_member(name, gib))
        done = box.run([sys.executable, "-m", "unitgen", "deploy", "--json",
                        *(f"/srv/specs/{n}.toml" for n in names)], env=env, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        ports = {i["name"]: int(i["public"].rsplit(":", 1)[1])
                 for i in json.loads(done.stdout)["instances"]}

        def loaded() -> set[str]:
            return {n for n in names
                    if box.prop(f"{n}-backend.service", "ActiveState") == "active"
                    and box.prop(f"{n}-backend.service", "SubState") == "running"}

        def held() -> dict[str, int]:
            out = json.loads(box.run([sys.executable, "-m", "unitgen", "gpus", "--json"],
                                     env=env).stdout)
            return {p["instance"]: p["used_bytes"] for g in out["gpus"] for p in g["processes"]
                    if p["instance"]}

        for name in names:  # the servers sandboxed dynamic users; the proxies root with
            # no capability but the one that reaches the server's socket (another user's)
            assert box.prop(f"{name}-backend.service", "DynamicUser") == "yes"
            assert box.prop(f"{name}.service", "CapabilityBoundingSet") == "cap_dac_override"
            assert box.prop(f"{name}.service", "User") == ""
        for name in ("sys-pa", "sys-pb"):  # 30 + 30 GiB fit side by side
            code, body = get(ports[name], "/v1/models", timeout=90)
            assert code == 200, (body, box.journal(f"{name}-backend.service"))
        assert loaded() == {"sys-pa", "sys-pb"}, box.journal("sys-pb.service")
        assert set(held()) == {"sys-pa", "sys-pb"}
        # 40 GiB more do not fit: the least recently used (sys-pa) makes room
        code, body = get(ports["sys-pc"], "/v1/models", timeout=90)
        assert code == 200, (body, box.journal("sys-pc.service"))
        assert wait_for(lambda: set(held()) == {"sys-pb", "sys-pc"}, 30), (
            held(), box.journal("sys-pa.service"), box.journal("sys-pc.service"))
        # the evicted vLLM slept (its process kept) or was stopped; it answers again
        code, body = get(ports["sys-pa"], "/v1/models", timeout=90)
        assert code == 200, (body, box.journal("sys-pa.service"))
        assert "sys-pa" in held() and sum(held().values()) <= 80 * GIB
        status = box.run([sys.executable, "-m", "unitgen", "status", "--json"], env=env)
        assert status.returncode == 0, status.stdout + status.stderr
    finally:
        box.unitgen("remove", *names)
        box.run(["systemctl", "unset-environment", *env])
