"""Servers in containers (issue 21) on a real systemd user manager, with real
podman and runc: the socket owns the port, the probe checks it, restarts keep it,
on-demand start and idle stop, CDI devices, and nothing left behind.

The image is built here, offline: a near-empty root whose /usr is the host's,
bound read-only at run time, so the host's python3 runs the stand-in server
(examples/demo_server.py, bound in too). Instance names start with ``pod-``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import LIVE_SKIP
from tests.golden_files import eight_fake_gpus
from tests.helpers import STANDIN, free_port, get, prop, wait_for, write_spec
from tests.live.test_operate_live import cli, cli_json
from tests.nvml import FAKE_DIR, eight_gpus, write_scenario
from unitgen.ops.files import write_files
from unitgen.ops.systemd.sandbox import Sandbox
from unitgen.ops.systemd.specs import render_spec
from unitgen.targets.systemd.render import RenderContext, find_proxyd

pytestmark = pytest.mark.systemd

PODMAN = shutil.which("podman")
# one tag per test session: concurrent sessions never remove each other's image
IMAGE = f"localhost/unitgen-test-standin:{os.getpid()}"


def podman(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    assert PODMAN is not None
    return subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def containers(name: str) -> list[str]:
    """States of every container of that name, running or not."""
    done = podman("ps", "-a", "--filter", f"name=^{name}$", "--format", "{{.ID}}")
    return [podman("inspect", "--format", "{{.State.Status}}", cid).stdout.strip()
            for cid in done.stdout.split()]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The stand-in image, imported from a tarball of an almost empty root."""
    if PODMAN is None or shutil.which("runc") is None:
        pytest.skip(f"{LIVE_SKIP}podman and runc are not installed (./setup installs them)")
    root = tmp_path_factory.mktemp("rootfs")
    for d in ("etc", "usr", "tmp", "run", "proc", "sys", "dev", "srv/standin"):
        (root / d).mkdir(parents=True)
    for link in ("bin", "lib", "lib64", "sbin"):
        (root / link).symlink_to(f"usr/{link}")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    tar = root.parent / "rootfs.tar"
    with tarfile.open(tar, "w") as t:
        t.add(root, arcname=".")
    done = podman("import", str(tar), IMAGE)
    assert done.returncode == 0, done.stderr
    yield IMAGE
    podman("rmi", IMAGE)  # not --force: that would remove containers that use it


@pytest.fixture
def box(sandbox: Sandbox, image: str) -> Iterator[Sandbox]:
    """The shared sandbox; this test's instances (and containers) removed after it."""
    before = {p.name for p in sandbox.unit_dir.glob("pod-*")}
    yield sandbox
    names = sorted({p.stem for p in sandbox.unit_dir.glob("pod-*.socket")
                    if p.name not in before})
    if names:
        cli(sandbox, "remove", "--user", *names)
    for name in names:
        podman("rm", "--force", "--ignore", "--time=0", f"unitgen-{name}")
    sandbox.systemctl("reset-failed")


def pod_spec(directory: Path, name: str, extra: str = "", *, unix: bool = True,
             volumes: tuple[str, ...] = ()) -> Path:
    """A custom spec that runs the stand-in server in the test image (``volumes``:
    more binds)."""
    server = directory / "standin"
    server.mkdir(exist_ok=True)
    shutil.copy(STANDIN, server / "demo_server.py")
    listen = '"--host", "{unix}"' if unix else ""
    command = f'["/usr/bin/python3", "/srv/standin/demo_server.py"{", " if listen else ""}{listen}]'
    text = (f'name = "{name}"\nbackend = "custom"\ncommand = {command}\n'
            f'image = "{IMAGE}"\npull = "never"\noffline = true\n'
            f'volumes = {json.dumps(["/usr:/usr:ro", f"{server}:/srv/standin:ro", *volumes])}\n'
            f'{extra}'
            '[health]\ntimeout = "30s"\n')
    return write_spec(directory, name, text)


def port_of(data: dict[str, Any]) -> int:
    [inst] = data["instances"]
    return int(str(inst["public"]).rsplit(":", 1)[1])


def container_id(name: str) -> str:
    return podman("inspect", "--format", "{{.Id}}", f"unitgen-{name}").stdout.strip()


def test_deploy_answers_through_the_socket_and_a_restart_keeps_the_port(box, tmp_path):
    t0 = time.monotonic()
    rc, data = cli_json(box, "deploy", "--user", str(pod_spec(tmp_path, "pod-eager")))
    assert rc == 0, data
    print(f"\ndeploy of a container instance: {time.monotonic() - t0:.2f} s")
    port = port_of(data)
    status, body = get(port)
    assert status == 200 and body["pid"] == 1  # the container's first process answered
    assert containers("unitgen-pod-eager") == ["running"]
    # the server was told the socket's path inside the container, the probe the host's
    assert "standin: pid 1 argv ['--host', '/run/unitgen/http.sock']" in box.journal(
        "pod-eager-backend.service", lines=200)
    first = container_id("pod-eager")

    # a request sent while the server restarts waits in the socket and is answered
    answers: list[int] = []
    restart = threading.Thread(target=lambda: box.systemctl(
        "restart", "pod-eager-backend.service", timeout=60))
    restart.start()
    time.sleep(0.05)
    answers.append(get(port, timeout=60)[0])
    restart.join(60)
    assert answers == [200]
    assert wait_for(lambda: container_id("pod-eager") not in ("", first), 20)
    assert get(port)[0] == 200  # same port, new container
    assert containers("unitgen-pod-eager") == ["running"]

    done = cli(box, "doctor", "--user", "pod-eager")
    assert done.returncode == 0, done.stdout
    assert "container unitgen-pod-eager is running" in done.stdout
    rc, status_data = cli_json(box, "status", "--user", "pod-eager")
    row = status_data["instances"][0]
    assert row["state"] == "ready"
    # the container's memory counts, not only podman run's process tree
    cgroup = prop(box, "pod-eager-backend.service", "ControlGroup")
    [server] = servers_in(cgroup)
    podman_tree = sum(p.memory_info().rss for p in [psutil.Process(row["pid"]),
                                                     *psutil.Process(row["pid"]).children(True)])
    assert row["memory_bytes"] >= podman_tree + psutil.Process(server).memory_info().rss // 2
    assert "standin: listening" in cli(box, "logs", "--user", "pod-eager").stdout


def servers_in(cgroup: str) -> list[int]:
    """The stand-in servers whose cgroup is under ``cgroup`` (a unit's)."""
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or [])[:2] == ["/usr/bin/python3", "/srv/standin/demo_server.py"]
            and cgroup + "/" in _cgroup(p.pid)]


def test_kill_9_of_conmon_restarts_without_an_orphan_and_remove_leaves_nothing(box, tmp_path):
    rc, data = cli_json(box, "deploy", "--user", str(pod_spec(tmp_path, "pod-orphan")))
    assert rc == 0, data
    conmon = [p for p in psutil.process_iter(["cmdline"])
              if "conmon" in (p.info["cmdline"] or [""])[0]
              and "unitgen-pod-orphan" in (p.info["cmdline"] or [])]
    assert len(conmon) == 1
    # the server runs in the unit's own cgroup (--cgroups=split): the unit's to stop
    cgroup = prop(box, "pod-orphan-backend.service", "ControlGroup")
    [server] = servers_in(cgroup)
    os.kill(conmon[0].pid, signal.SIGKILL)
    # podman run ends with its conmon; systemd stops what is left of the unit (the
    # server too), removes the container and starts it again: same port
    assert wait_for(lambda: not psutil.pid_exists(server), 10)
    assert get(port_of(data), timeout=60)[0] == 200
    assert wait_for(lambda: len(servers_in(cgroup)) == 1, 10)
    assert int(prop(box, "pod-orphan-backend.service", "NRestarts")) == 1
    assert containers("unitgen-pod-orphan") == ["running"]
    [again] = servers_in(cgroup)

    done = cli(box, "remove", "--user", "pod-orphan")
    assert done.returncode == 0, done.stderr
    assert containers("unitgen-pod-orphan") == []
    assert wait_for(lambda: not psutil.pid_exists(again), 10)


def _cgroup(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return ""


def test_on_demand_start_and_idle_stop_remove_the_container(box, tmp_path):
    spec = pod_spec(tmp_path, "pod-lazy", 'activation = "on-demand"\nidle_stop = "2s"\n')
    rc, data = cli_json(box, "deploy", "--user", str(spec))
    assert rc == 0, data
    assert containers("unitgen-pod-lazy") == []  # only the socket listens
    t0 = time.monotonic()
    assert get(port_of(data), timeout=60)[0] == 200
    print(f"\non-demand first answer from a container: {time.monotonic() - t0:.2f} s")
    assert containers("unitgen-pod-lazy") == ["running"]
    # idle: the proxy exits, the server is unneeded and stops, its container goes
    assert wait_for(lambda: prop(box, "pod-lazy-backend.service", "ActiveState") == "inactive",
                    30)
    assert wait_for(lambda: containers("unitgen-pod-lazy") == [], 15)
    assert prop(box, "pod-lazy.socket", "ActiveState") == "active"
    assert get(port_of(data), timeout=60)[0] == 200  # and it comes back on demand


def test_a_socket_passed_by_systemd_reaches_the_server_in_its_container(box, tmp_path):
    spec = pod_spec(tmp_path, "pod-direct", "socket_activation = true\n", unix=False)
    rc, data = cli_json(box, "deploy", "--user", str(spec))
    assert rc == 0, data
    assert not (box.unit_dir / "pod-direct-backend.service").exists()
    assert get(port_of(data))[0] == 200
    assert podman("inspect", "--format", "{{.HostConfig.NetworkMode}}",
                  "unitgen-pod-direct").stdout.strip() == "none"


CDI_TEMPLATE = """cdiVersion: "0.5.0"
kind: nvidia.com/gpu
devices:
{devices}
"""


def stand_in_cdi() -> Path:
    """A CDI spec in /etc/cdi (podman reads it there), under a name of its own:
    each fake GPU (tests/nvml.py) a device node backed by /dev/null."""
    devices = "\n".join(f"  - name: GPU-{i:08x}-1111-2222-3333-{i:012x}\n"
                        "    containerEdits:\n      deviceNodes:\n"
                        f"        - path: /dev/nvidia{i}\n          hostPath: /dev/null"
                        for i in range(8))
    cdi = Path("/etc/cdi") / f"unitgen-test-{uuidlib.uuid4().hex[:8]}.yaml"
    if not cdi.parent.exists():
        cdi.parent.mkdir()
        (cdi.parent / ".unitgen-test-made-this").touch()
    cdi.write_text(CDI_TEMPLATE.format(devices=devices))
    return cdi


def drop_cdi(cdi: Path) -> None:
    """Remove the stand-in (and /etc/cdi if a test made it and nothing else is there)."""
    cdi.unlink()
    marker = cdi.parent / ".unitgen-test-made-this"
    if marker.exists() and [p.name for p in cdi.parent.iterdir()] == [marker.name]:
        marker.unlink()
        cdi.parent.rmdir()


def test_a_cdi_device_reaches_the_container_and_a_missing_one_is_refused(box, tmp_path):
    scenario = write_scenario(tmp_path / "nvml.json", eight_gpus())
    gpu_env = (f'env = {{ PYTHONPATH = "{FAKE_DIR}", FAKE_NVML_SCENARIO = "{scenario}" }}\n'
               "gpus = 1\n")
    spec = pod_spec(tmp_path, "pod-gpu", gpu_env)
    env = {"PYTHONPATH": str(FAKE_DIR), "FAKE_NVML_SCENARIO": str(scenario),
           "UNITGEN_CDI_DIRS": str(tmp_path / "no-cdi")}
    refused = _cli_env(box, env, "deploy", "--user", str(spec))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "gpus: no CDI spec on this host names GPU-00000000" in refused.stderr
    assert "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml" in refused.stderr

    cdi = stand_in_cdi()
    try:
        env["UNITGEN_CDI_DIRS"] = str(cdi.parent)
        done = _cli_env(box, env, "deploy", "--user", str(spec))
        assert done.returncode == 0, done.stdout + done.stderr
        seen = podman("exec", "unitgen-pod-gpu", "/usr/bin/ls", "/dev")
        assert "nvidia0" in seen.stdout.split(), seen.stdout + seen.stderr
        assert "nvidia1" not in seen.stdout.split()  # only the GPU it was placed on
    finally:
        _cli_env(box, env, "remove", "--user", "pod-gpu")
        drop_cdi(cdi)


def _cli_env(box: Sandbox, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "unitgen", *args],
                          env={**os.environ, **box.env, **env}, capture_output=True, text=True,
                          timeout=120, check=False)


def test_swap_group_members_in_containers_take_turns(box, tmp_path):
    group = 'activation = "on-demand"\nswap_group = "pod-g"\nswap_drain = "5s"\n'
    a = pod_spec(tmp_path, "pod-swa", group)
    b = pod_spec(tmp_path, "pod-swb", group)
    rc, data = cli_json(box, "deploy", "--user", str(a), str(b))
    assert rc == 0, data
    ports = {i["name"]: int(i["public"].rsplit(":", 1)[1]) for i in data["instances"]}
    for name in ("pod-swa", "pod-swb", "pod-swa"):
        assert get(ports[name], timeout=60)[0] == 200
        other = "pod-swb" if name == "pod-swa" else "pod-swa"
        # the member that answered runs in its container; the other's is gone
        assert containers(f"unitgen-{name}") == ["running"]
        assert wait_for(lambda o=other: containers(f"unitgen-{o}") == [], 15)


def test_a_missing_image_that_cannot_be_pulled_changes_nothing(box, tmp_path):
    spec = pod_spec(tmp_path, "pod-nopull", 'pull_timeout = "30s"\n')
    text = spec.read_text().replace('pull = "never"\n', "").replace(
        IMAGE, "localhost:1/unitgen-test-absent:1")
    spec.write_text(text)
    t0 = time.monotonic()
    done = cli(box, "deploy", "--user", str(spec))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "image: podman pull localhost:1/unitgen-test-absent:1 failed" in done.stderr
    assert "pulling localhost:1/unitgen-test-absent:1" in done.stderr
    assert time.monotonic() - t0 < 30
    assert not list(box.unit_dir.glob("pod-nopull*"))
    never = text.replace("[health]", 'pull = "never"\n[health]')
    spec.write_text(never)
    done = cli(box, "deploy", "--user", str(spec))
    assert done.returncode == 2
    assert 'is not on this host and pull = "never": podman pull' in done.stderr


def test_the_system_scope_sandbox_of_the_podman_unit_lets_the_container_run(box, tmp_path):
    """The units rendered for system scope (hardening = true, a GPU with its
    device nodes known), run by this root-run manager: podman, conmon, runc and
    the server all work under their sandbox, and the GPU reaches the container."""
    scenario = write_scenario(tmp_path / "nvml.json", eight_gpus())
    spec = pod_spec(tmp_path, "pod-hard", f'env = {{ PYTHONPATH = "{FAKE_DIR}", '
                                          f'FAKE_NVML_SCENARIO = "{scenario}" }}\ngpus = 1\n')
    ctx = RenderContext(python=sys.executable, proxyd=find_proxyd(), scope="system",
                        podman=str(PODMAN))
    port = free_port()
    with eight_fake_gpus():
        done = render_spec(spec, ctx, port=port)
    units = tuple(f for f in done.files if not f.secret)
    backend = next(f.text for f in units if f.name == "pod-hard-backend.service")
    assert "SystemCallFilter=~@clock" in backend and "CapabilityBoundingSet=~CAP_SYS_MODULE" \
        in backend and "--cap-drop=all" in backend
    assert "--device=nvidia.com/gpu=GPU-" in backend
    # runc writes the container's device rules below the unit: no policy above it
    assert "DevicePolicy=" not in backend
    write_files(box.unit_dir, "pod-hard", units)
    box.systemctl("daemon-reload", check=True)
    cdi = stand_in_cdi()
    try:
        started = box.systemctl("start", "pod-hard.service", timeout=60)
        assert started.returncode == 0, box.journal("pod-hard-backend.service")
        assert get(port)[0] == 200
        assert prop(box, "pod-hard-backend.service", "SystemCallFilter") != ""
        assert containers("unitgen-pod-hard") == ["running"]
        seen = podman("exec", "unitgen-pod-hard", "/usr/bin/ls", "/dev").stdout.split()
        assert "nvidia0" in seen or "nvidia1" in seen
    finally:
        box.systemctl("stop", "pod-hard.socket", "pod-hard.service", "pod-hard-backend.service")
        for f in units:
            (box.unit_dir / f.name).unlink()
        box.systemctl("daemon-reload")
        drop_cdi(cdi)
    assert containers("unitgen-pod-hard") == []


def test_an_api_key_reaches_the_container_by_name_only(box, tmp_path):
    key = f"sk-pod-{uuidlib.uuid4().hex}"
    spec = pod_spec(tmp_path, "pod-key", f'env = {{ KEY = "{key}", STANDIN_KEY_ENV = "KEY" }}\n'
                                         'api_key_env = "KEY"\n')
    rc, data = cli_json(box, "deploy", "--user", str(spec))
    assert rc == 0, data  # the probe authenticated through the proxy and the container
    port = port_of(data)
    assert get(port)[0] == 401
    assert get(port, key=key)[0] == 200
    assert not [p.name for p in box.unit_dir.glob("pod-key*") if key in p.read_text()]
    argvs = [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])]
    assert not [a for a in argvs if key in a]
    assert "--env=KEY" in (box.unit_dir / "pod-key-backend.service").read_text()
    assert podman("inspect", "--format", "{{.HostConfig.NetworkMode}}",
                  "unitgen-pod-key").stdout.strip() == "none"


def test_a_tcp_only_server_in_a_container_listens_on_its_private_loopback_port(box, tmp_path):
    spec = pod_spec(tmp_path, "pod-tcp", unix=False)
    text = spec.read_text().replace('"/srv/standin/demo_server.py"]',
                                    '"/srv/standin/demo_server.py", "--host", "{host}", '
                                    '"--port", "{port}"]').replace("offline = true\n", "")
    spec.write_text(text)
    rc, data = cli_json(box, "deploy", "--user", str(spec))
    assert rc == 0, data
    backend = (box.unit_dir / "pod-tcp-backend.service").read_text()
    assert "--network=host" in backend
    private = int(backend.split("--port ", 1)[1].split()[0])
    if private < 1024:  # a root manager's private ports are privileged: the one capability
        assert "--cap-add=NET_BIND_SERVICE" in backend
    assert get(port_of(data))[0] == 200
    assert get(private)[0] == 200  # the same loopback as the host's
    print(f"\nprivate port {private}")


def test_a_redeploy_replaces_the_container_and_a_failed_one_rolls_back(box, tmp_path):
    spec = pod_spec(tmp_path, "pod-redo")
    rc, data = cli_json(box, "deploy", "--user", str(spec))
    assert rc == 0, data
    port, first = port_of(data), container_id("pod-redo")
    changed = spec.read_text().replace("[health]", 'description = "v2"\n[health]')
    spec.write_text(changed)
    rc, data = cli_json(box, "deploy", "--user", str(spec))
    assert rc == 0 and data["instances"][0]["action"] == "updated", data
    assert port_of(data) == port and container_id("pod-redo") not in ("", first)
    assert containers("unitgen-pod-redo") == ["running"]
    # a program the image does not have: the start fails, the previous version
    # comes back, and no container of the failed one is left
    spec.write_text(changed.replace("[health]", 'executable = "/no/such/server"\n[health]'))
    rc, data = cli_json(box, "deploy", "--user", str(spec))
    assert rc == 1 and data["instances"][0]["action"] == "failed", data
    assert "restored" in data["instances"][0]["error"]
    assert get(port)[0] == 200
    assert containers("unitgen-pod-redo") == ["running"]
    assert "/no/such/server" not in (box.unit_dir / "pod-redo-backend.service").read_text()
