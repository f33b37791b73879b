"""The second security review (issue 17), user scope: an unprivileged local user
(uid 65534, a real process holding only its own rights) against a real systemd
user manager. Each test failed on the code before the fix (see the comments)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import STANDIN, prop, wait_for, write_spec
from tests.live.test_operate_live import cli, cli_json
from unitgen.ops.systemd.sandbox import Sandbox

pytestmark = pytest.mark.systemd

NOBODY = 65534
KEY = "sk-attack-test-7f3a"


@pytest.fixture
def root(box: Sandbox) -> Sandbox:
    """The live tier's box, for tests that run an attacker as another uid."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the attacker as uid 65534")
    return box

def unprivileged_free_port() -> int:
    """A port in 20000-29999 (what a non-root user manager uses) nobody listens on."""
    import socket  # noqa: PLC0415

    for port in range(20000 + os.getpid() % 5000, 30000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no free port in 20000-29999")


def keyed_spec(directory: Path, name: str, private_port: int, health: str = "",
               **env: str) -> Path:
    env_toml = "".join(f', {k} = "{v}"' for k, v in env.items())
    return write_spec(directory, name, (
        f'name = "{name}"\nbackend = "custom"\n'
        f'command = ["{sys.executable}", "{STANDIN}", "--host", "{{host}}", "--port", "{{port}}"]\n'
        f'api_key_env = "SECRET_KEY"\nprivate_port = {private_port}\n'
        f'env = {{ SECRET_KEY = "{KEY}", STANDIN_KEY_ENV = "SECRET_KEY"{env_toml} }}\n'
        f'[health]\ntimeout = "60s"\n{health}'))


# The attacker: uid 65534 with no capability. ``burst`` listens for ~0.3 ms at a
# time (the race of the review: it got the key in about a second against the
# listener check that ran before connecting); otherwise it keeps listening and
# answers 200 to anything. Every connection and what it carried is printed.
SQUATTER = r"""
import os, socket, sys, time
os.setgroups([]); os.setgid(65534); os.setuid(65534)
port, seconds, burst = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "burst"
end = time.monotonic() + seconds
def serve(c):
    c.settimeout(1.0)
    try:
        data = c.recv(65536)
    except OSError:
        data = b""
    print("GOT", len(data), data.decode("latin-1").replace("\r\n", " | "), flush=True)
    try:
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    except OSError:
        pass
    c.close()
print("READY", flush=True)
held = None
while time.monotonic() < end:
    if held is None:
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port)); s.listen(16)
        except OSError:
            s.close(); time.sleep(0.002); continue
        if not burst:
            held = s; held.settimeout(0.2); print("BOUND", flush=True); continue
        time.sleep(0.0003)
        s.setblocking(False)
        conns = []
        while True:
            try:
                conns.append(s.accept()[0])
            except OSError:
                break
        s.close()
        for c in conns:
            c.setblocking(True); serve(c)
        time.sleep(0.003)
    else:
        try:
            c, _ = held.accept()
        except OSError:
            continue
        serve(c)
"""


def squatter(port: int, seconds: float, *, burst: bool) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-I", "-c", SQUATTER, str(port), str(seconds),
                             "burst" if burst else "hold"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    return proc


def received(out: str) -> list[str]:
    """The squatter's lines for connections that carried bytes."""
    return [ln for ln in out.splitlines() if ln.startswith("GOT ") and ln.split()[1] != "0"]


def test_probe_gives_no_key_to_a_squatter_that_listens_in_bursts(root, tmp_path):
    box = root
    # Before: the probe checked for a listener, found none, connected a moment
    # later into a burst and sent the key (seen within about a second).
    port = unprivileged_free_port()
    attacker = squatter(port, 14, burst=True)
    try:
        # the server "loads" for 10 s without listening: the probe polls all along
        spec = keyed_spec(tmp_path, "burst1", port, STANDIN_LOADING="refuse",
                          STANDIN_LOAD_SECONDS="10")
        cli(box, "deploy", "--user", "--no-wait", str(spec), timeout=60)
        out = attacker.communicate(timeout=60)[0]
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.communicate(timeout=10)
    assert "GOT" in out, f"the test did not race the probe at all: {out[-500:]}"
    assert not received(out), f"the squatter received: {received(out)[:3]}"
    assert KEY not in out


def test_a_squatter_neither_gets_the_key_nor_feeds_the_watchdog(root, tmp_path):
    box = root
    # Before: the liveness checker sent its key to whatever listened on the free
    # private port and fed the watchdog from the answer: the broken server was
    # never restarted (NRestarts=0) and the key was received every check.
    port = unprivileged_free_port()
    spec = keyed_spec(tmp_path, "wd1", port, 'watchdog = "3s"\n', STANDIN_UNLISTEN_AFTER="2")
    rc, data = cli_json(box, "deploy", "--user", str(spec))
    assert rc == 0, data
    # the server's HTTP layer dies at 2 s; the squatter takes the port at once
    attacker = squatter(port, 12, burst=False)
    try:
        restarted = wait_for(lambda: int(prop(box, "wd1-backend.service", "NRestarts") or 0) >= 1,
                             12)
    finally:
        out = attacker.communicate(timeout=30)[0]
    assert "BOUND" in out, out
    assert KEY not in out and not received(out), f"the squatter received: {received(out)[:3]}"
    assert restarted, "the watchdog never fired: something fed it from the squatter's answers"
