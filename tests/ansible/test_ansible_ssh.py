"""The role over real SSH: an sshd started by the test on a spare loopback port
(generated host and client keys) is the transport to 127.0.0.1; the role copies
a wheel built from this checkout, installs it into a venv on the "remote" and
deploys an instance into a private systemd user manager there. A second run
changes nothing, install included."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ansible.test_ansible_live import PLAYBOOK, run_playbook
from tests.helpers import STANDIN, free_port, get
from unitgen.ops.systemd.sandbox import Sandbox, sandbox_unavailable_reason

pytestmark = [pytest.mark.ansible, pytest.mark.systemd]

ROOT = Path(__file__).resolve().parents[2]
SSHD = Path("/usr/sbin/sshd")


@dataclass
class Sshd:
    port: int
    client_key: Path
    log: Path


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"sshd did not listen on {port} within {timeout} s")


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """sshd on a free loopback port, root by key only; stopped by its pid."""
    if os.geteuid() != 0:
        pytest.skip("needs root (sshd, and a login as root)")
    if not SSHD.exists() or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("needs openssh-server and openssh-client (./setup installs them)")
    d = tmp_path / "sshd"
    d.mkdir()
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(d / key)],
                       check=True, capture_output=True, timeout=30)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    config = d / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\n"
        f"PidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "StrictModes no\nSubsystem sftp internal-sftp\n")
    # sshd's privilege-separation directory (the Debian service creates it at boot)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    log = d / "sshd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    try:
        _wait_port(port, proc)
        yield Sshd(port, d / "client_key", log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    """A wheel of this checkout, built on the controller."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", ".hypothesis", ".mypy_cache", ".ruff_cache", "dist",
        "build", ".pytest_cache", "*.egg-info"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
         str(src)], capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and "Could not find a version" in built.stderr:
        pytest.skip("the build backend (hatchling) cannot be fetched here")
    assert built.returncode == 0, built.stderr
    return next((tmp_path / "dist").glob("unitgen_units-*.whl"))


@pytest.fixture
def box() -> Iterator[Sandbox]:
    reason = sandbox_unavailable_reason()
    if reason:
        pytest.skip(f"no private systemd manager: {reason}")
    sandbox = Sandbox.start(tie_to_parent=True)
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.mark.timeout(900)
def test_role_installs_from_a_wheel_and_deploys_over_ssh(tmp_path, sshd, wheel, box):
    venv = tmp_path / "remote" / "venv"
    spec = {"name": "remote1", "backend": "custom",
            # the remote's own interpreter runs the stand-in (standard library only)
            "command": ["/usr/bin/python3", str(STANDIN), "--host", "{host}", "--port", "{port}"],
            "env": {"STANDIN_LOAD_SECONDS": "0.5", "STANDIN_LOADING": "503"},
            "health": {"timeout": "1min"}}
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"model_servers": {"hosts": {"remote": {
        "ansible_connection": "ssh",
        "ansible_host": "127.0.0.1",
        "ansible_port": sshd.port,
        "ansible_user": "root",
        "ansible_ssh_private_key_file": str(sshd.client_key),
        "ansible_ssh_common_args": "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no "
                                   "-o IdentitiesOnly=yes -o ConnectTimeout=10",
        "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_remote_tmp": str(tmp_path / "remote" / "tmp"),
        "unitgen_package": str(wheel),
        "unitgen_venv": str(venv),
        "unitgen_os_packages": [],  # the test machine has python3-venv; leave its packages alone
        "unitgen_scope": "user",
        "unitgen_environment": dict(box.env),
        "unitgen_instances": [spec],
    }}}}))
    playbook = tmp_path / "play.yml"
    playbook.write_text(PLAYBOOK)
    # One connection per task, none left behind (no ControlPersist master process).
    env = {"ANSIBLE_SSH_ARGS": "-o ControlMaster=no", "ANSIBLE_PIPELINING": "True",
           "ANSIBLE_TIMEOUT": "20"}

    # --check on a fresh host: says what it would do, installs and deploys nothing
    check = run_playbook(playbook, inventory, tmp_path, "--check", "--diff", env=env, timeout=600)
    assert check.rc == 0, (check.doc["tasks"][-3:], check.stderr[-3000:])
    assert check.items("remote")["remote1"]["action"] == "would-create"
    assert not venv.exists() and not list(box.unit_dir.glob("remote1*"))

    t0 = time.monotonic()
    first = run_playbook(playbook, inventory, tmp_path, env=env, timeout=600)
    first_s = time.monotonic() - t0
    assert first.rc == 0, (first.doc["tasks"][-3:], first.stderr[-3000:])
    assert first.task("Install unitgen into the venv", "remote")["status"] == "changed"
    assert first.items("remote")["remote1"]["action"] == "created"
    port = first.status("remote")["remote1"]["port"]
    code, body = get(port)
    assert code == 200, body
    # the units run the probe from the venv the role installed from the wheel
    service = (box.unit_dir / "remote1.service").read_text()
    assert f"{venv}/bin/python -I -m unitgen.inunit.probe" in service
    assert "Accepted publickey for root" in sshd.log.read_text()

    t0 = time.monotonic()
    second = run_playbook(playbook, inventory, tmp_path, env=env, timeout=600)
    second_s = time.monotonic() - t0
    assert second.rc == 0, second.stderr[-3000:]
    assert second.changed("remote") == 0, [
        (t["task"], t["hosts"]["remote"].get("status")) for t in second.doc["tasks"]]
    slowest = sorted(((r["elapsed_s"], t["task"]) for t in second.doc["tasks"]
                      for r in t["hosts"].values()), reverse=True)[:4]
    print(f"slowest tasks of the second run: {slowest}")
    print(f"over ssh: first run {first_s:.1f} s (venv, pip install, deploy), "
          f"second run {second_s:.1f} s (nothing to do)")
