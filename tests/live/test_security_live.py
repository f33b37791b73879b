"""Security holes found by review (issue 14, high) and the start that must fail
at once when the server dies while loading (issue 11), on a real systemd user
manager with the stand-in server. Each test here failed on the code before
the fix."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import STANDIN, free_port, get, prop, wait_for, write_spec
from tests.live.test_operate_live import cli, cli_json
from unitgen.ops.systemd.sandbox import Sandbox

pytestmark = pytest.mark.systemd

NOBODY = 65534



def keyed_tcp_spec(directory: Path, name: str, *, private_port: int | None = None,
                   activation: str = "eager") -> Path:
    """A custom backend on private loopback TCP that wants an API key."""
    return write_spec(directory, name, (
        f'name = "{name}"\nbackend = "custom"\nactivation = "{activation}"\n'
        f'command = ["{sys.executable}", "{STANDIN}", "--host", "{{host}}", "--port", "{{port}}"]\n'
        'api_key_env = "SECRET_KEY"\n'
        + (f"private_port = {private_port}\n" if private_port else "")
        + 'env = { SECRET_KEY = "sk-squat-test", STANDIN_KEY_ENV = "SECRET_KEY" }\n'
        '[health]\ntimeout = "60s"\n'
    ))


def private_port_of(box: Sandbox, name: str) -> int:
    line = next(w for w in prop(box, f"{name}.service", "ExecStart").split()
                if w.startswith("127.0.0.1:"))
    return int(line.rsplit(":", 1)[1].rstrip(";"))


def squat_as_nobody(port: int, seconds: float) -> subprocess.Popen[str]:
    """A listener on 127.0.0.1:port run as uid 65534 that records what it receives
    and answers 200 to anything (the attacker of the review)."""
    code = (
        "import os, socket, sys, time\n"
        f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"try:\n    s.bind(('127.0.0.1', {port}))\n"
        "except OSError as e:\n    print('BINDFAIL', e.errno, flush=True); sys.exit(0)\n"
        "s.listen(); s.settimeout(0.2); print('BOUND', flush=True)\n"
        f"end = time.monotonic() + {seconds}\n"
        "while time.monotonic() < end:\n"
        "    try:\n        c, _ = s.accept()\n    except OSError:\n        continue\n"
        "    c.settimeout(1)\n"
        "    try:\n        data = c.recv(65536)\n    except OSError:\n        data = b''\n"
        "    print('GOT', data.decode('latin-1').replace(chr(13)+chr(10), ' | '), flush=True)\n"
        "    c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\n{}'); c.close()\n"
    )
    return subprocess.Popen([sys.executable, "-I", "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_unprivileged_user_cannot_squat_a_stopped_private_port(box, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to run the squatter as uid 65534")
    spec = keyed_tcp_spec(tmp_path, "squat1")
    rc, data = cli_json(box, "deploy", "--user", str(spec))
    assert rc == 0, data
    port = private_port_of(box, "squat1")
    assert port < 1024, f"private port {port} is not privileged"
    box.systemctl("stop", "squat1.service", "squat1-backend.service", check=True)
    assert wait_for(lambda: prop(box, "squat1-backend.service", "ActiveState") == "inactive", 30)
    squatter = squat_as_nobody(port, 3)
    out, _ = squatter.communicate(timeout=30)
    assert out.startswith("BINDFAIL 13"), out  # EACCES: only root (the manager) may serve it
    # and the instance comes back on its own port, answering with the key
    assert get(int(data["instances"][0]["public"].rsplit(":", 1)[1]), key="sk-squat-test")[0] == 200


def test_probe_sends_nothing_to_a_squatter_on_an_unprivileged_private_port(box, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to run the squatter as uid 65534")
    port = free_port()
    while port < 1024:
        port = free_port()
    squatter = squat_as_nobody(port, 25)
    try:
        assert squatter.stdout is not None
        assert squatter.stdout.readline().strip() == "BOUND"
        spec = keyed_tcp_spec(tmp_path, "squat2", private_port=port)
        t0 = time.monotonic()
        done = cli(box, "deploy", "--user", "--json", str(spec), timeout=90)
        took = time.monotonic() - t0
    finally:
        squatter.kill()
        out = squatter.communicate(timeout=10)[0]
    assert done.returncode == 1, done.stdout + done.stderr
    # the probe may connect (that is how it sees who is there), but sends nothing
    got = [ln for ln in out.splitlines() if ln.startswith("GOT") and ln.strip() != "GOT"]
    assert not got, f"the squatter received: {out}"
    assert "sk-squat-test" not in out
    # the server could not bind and died: the start failed long before the 60 s deadline
    assert took < 45, took


def test_host_with_a_scope_id_cannot_add_lines_to_units(tmp_path):
    marker = tmp_path / "pwned"
    hostile = f'::1%x\\n[Service]\\nExecStartPre=/bin/touch {marker}'
    spec = write_spec(tmp_path, "inj", (
        'name = "inj"\nbackend = "vllm"\nmodel = "m"\nport = 8123\n'
        f'host = "{hostile}"\n'
    ))
    for verb in ("check", "render"):
        done = subprocess.run([sys.executable, "-m", "unitgen", verb, str(spec)],
                              capture_output=True, text=True)
        assert done.returncode == 2, done.stdout
        assert "inj.toml: host:" in done.stderr and "scope ID" in done.stderr
        assert "ExecStartPre=/bin/touch" not in done.stdout
        assert "Traceback" not in done.stderr


def test_server_dying_while_loading_fails_the_start_at_once(box, tmp_path):
    # exits after 1 s of "loading": any bad flag, missing model or CUDA OOM looks like this
    spec = write_spec(tmp_path, "dies", (
        'name = "dies"\nbackend = "custom"\n'
        'command = ["/bin/sh", "-c", "echo loading the model on {port} >&2; sleep 1; '
        'echo CUDA out of memory >&2; exit 3"]\n'
        '[health]\ntimeout = "10min"\n'
    ))
    t0 = time.monotonic()
    done = cli(box, "deploy", "--user", str(spec), timeout=300)
    took = time.monotonic() - t0
    assert done.returncode == 1, done.stdout + done.stderr
    assert took < 30, f"deploy waited {took:.0f} s for a server that died after 1 s"
    assert "exited while loading" in done.stdout + done.stderr
    assert "CUDA out of memory" in done.stdout + done.stderr  # the server's own last lines
    assert not (box.unit_dir / "dies.socket").exists()  # a new instance is rolled back


def test_on_demand_client_gets_an_error_in_seconds_when_the_server_dies(box, tmp_path):
    spec = write_spec(tmp_path, "dies2", (
        'name = "dies2"\nbackend = "custom"\nactivation = "on-demand"\n'
        'command = ["/bin/sh", "-c", "sleep 0.5; exit 3; echo {port}"]\n'
        '[health]\ntimeout = "10min"\n'
    ))
    rc, data = cli_json(box, "deploy", "--user", str(spec))
    assert rc == 0, data
    port = int(data["instances"][0]["public"].rsplit(":", 1)[1])
    outcome: list[str] = []

    def client() -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                outcome.append("answer:" + s.recv(100).decode("latin-1"))
        except OSError as exc:
            outcome.append(f"error:{type(exc).__name__}")

    t0 = time.monotonic()
    thread = threading.Thread(target=client)
    thread.start()
    thread.join(150)
    took = time.monotonic() - t0
    assert outcome, "the client still hangs"
    assert not outcome[0].startswith("answer:HTTP/1.1 200"), outcome
    assert took < 60, f"the client waited {took:.0f} s"
    # the restart policy decided, and the server ended failed, not in a loop
    assert wait_for(lambda: prop(box, "dies2-backend.service", "ActiveState") == "failed", 60)


def demo(directory: Path, name: str, extra: str = "", **env: str) -> Path:
    env_toml = ", ".join(f'{k} = "{v}"' for k, v in env.items())
    return write_spec(directory, name, (
        f'name = "{name}"\nbackend = "custom"\n'
        f'command = ["{sys.executable}", "{STANDIN}", "--host", "{{host}}", "--port", "{{port}}"]\n'
        f"env = {{ {env_toml} }}\n{extra}"
        '[health]\ntimeout = "60s"\n'))


def test_redeploy_keeps_the_public_port_owned_while_the_server_restarts(box, tmp_path):
    rc, data = cli_json(box, "deploy", "--user", str(demo(tmp_path, "keep")))
    assert rc == 0, data
    port = int(data["instances"][0]["public"].rsplit(":", 1)[1])
    listen_since = prop(box, "keep.socket", "ActiveEnterTimestampMonotonic")
    # a changed server (slow to stop and to load): the socket file does not change
    rc, data = cli_json(box, "deploy", "--user",
                        str(demo(tmp_path, "keep", STANDIN_LOAD_SECONDS="1")))
    assert rc == 0 and data["instances"][0]["action"] == "updated", data
    assert prop(box, "keep.socket", "ActiveEnterTimestampMonotonic") == listen_since
    # nobody could bind the port in between: the socket never let go of it
    with socket.socket() as squatter, pytest.raises(OSError):
        squatter.bind(("127.0.0.1", port))
    assert get(port)[0] == 200


def test_remove_leaves_a_users_copy_of_a_unit_alone(box, tmp_path):
    assert cli(box, "deploy", "--user", str(demo(tmp_path, "orig"))).returncode == 0
    copy = box.unit_dir / "orig-copy.service"
    copy.write_text((box.unit_dir / "orig.service").read_text())
    done = cli(box, "deploy", "--user", "--dry-run", str(demo(tmp_path, "orig", X="1")))
    assert "orig-copy" not in done.stdout
    assert cli(box, "remove", "--user", "orig").returncode == 0
    assert copy.exists()
    copy.unlink()


def test_a_start_systemd_refuses_is_rolled_back_and_remove_works_after(box, tmp_path):
    # socket-activated: the server unit is the one deploy starts, and systemd refuses it
    spec = write_spec(tmp_path, "refused", (
        f'name = "refused"\nbackend = "custom"\nsocket_activation = true\n'
        f'command = ["{sys.executable}", "{STANDIN}"]\n'
        '[systemd.unit]\nRefuseManualStart = "yes"\n'))
    done = cli(box, "deploy", "--user", str(spec))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "refused" in (done.stdout + done.stderr).lower()
    assert not (box.unit_dir / "refused.service").exists()  # rolled back
    assert prop(box, "refused.socket", "UnitFileState") in ("", "not-found")
    # remove of what is not there is fine, and so is a second one
    assert cli(box, "remove", "--user", "refused").returncode == 0
