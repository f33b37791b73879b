"""The second security review (issue 17), system scope: a co-hosted model server
(a unitgen instance of its own, hardened, run as its dynamic user with the
CAP_NET_BIND_SERVICE it gets for its own private port) against another
instance, on a real system manager (tests/nspawn.py). Failed on the code
before the fix: the co-hosted server bound the other's private port."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import get, wait_for
from tests.system.test_system_live import WRAPPER, backend_spec, box, deploy, remove

pytestmark = pytest.mark.systemd

__all__ = ["box"]  # the module-scoped container fixture, shared with the system tier

ATTACKER = "/opt/unitgen-test/squat-then-serve"
# Tries to bind the victim's private port (argv[1]) every 50 ms for 2 s, printing
# what the kernel said and the capabilities it holds, then becomes the stand-in
# server (so it passes its own readiness probe like any server).
SQUAT_THEN_SERVE = f"""#!{sys.executable}
import os, socket, sys, time
port = int(sys.argv[1])
caps = [ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("CapEff:")][0]
print("SQUAT caps", caps, "uid", os.getuid(), flush=True)
end = time.monotonic() + 2
result = "never tried"
while time.monotonic() < end:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port)); s.listen(); result = "BOUND"; s.close(); break
    except OSError as exc:
        result = f"refused errno {{exc.errno}}"
    s.close(); time.sleep(0.05)
print("SQUAT", port, result, flush=True)
os.execv("{WRAPPER}", ["{WRAPPER}", *sys.argv[2:]])
"""


@pytest.fixture
def attacker(box) -> str:
    box.put(ATTACKER, SQUAT_THEN_SERVE, 0o755)
    return ATTACKER


def private_port(box, name: str) -> int:
    words = box.prop(f"{name}.service", "ExecStart").split()
    return int(next(w for w in words if w.startswith("127.0.0.1:")).rsplit(":", 1)[1].rstrip(";"))


def test_a_co_hosted_server_cannot_bind_another_instances_private_port(box, attacker):
    victim, other = "sys-victim", "sys-cohost"
    rc, data = deploy(box, victim, backend_spec("custom", victim))
    try:
        assert rc == 0, data
        port = private_port(box, victim)
        assert port < 1024
        # the victim restarts (or is idle-stopped): its private port is free
        box.run(["systemctl", "stop", f"{victim}.service", f"{victim}-backend.service"],
                check=True)
        text = (f'name = "{other}"\nbackend = "custom"\n'
                f'command = ["{attacker}", "{port}", "--host", "{{host}}", "--port", "{{port}}"]\n'
                '[health]\ntimeout = "60s"\n')
        rc, data = deploy(box, other, text)
        journal = box.journal(f"{other}-backend.service")
        assert rc == 0, (data, journal)
        squat = [ln for ln in journal.splitlines() if "SQUAT" in ln]
        # it really is a sandboxed server holding the capability (else this proves nothing)
        caps = next(ln for ln in squat if "caps" in ln)
        assert int(caps.split("caps ")[1].split()[0], 16) & (1 << 10), caps
        assert "uid 0" not in caps, caps
        assert any(f"SQUAT {port} refused errno 13" in ln for ln in squat), journal
        assert "confine: warning" not in journal, journal
        # and the victim comes back on its own port
        box.run(["systemctl", "start", f"{victim}.service"], check=True)
        assert wait_for(lambda: box.prop(f"{victim}.service", "ActiveState") == "active", 60)
        assert get(_public(box, victim), "/v1/models")[0] == 200
    finally:
        remove(box, other)
        remove(box, victim)


def _public(box, name: str) -> int:
    listen = box.prop(f"{name}.socket", "Listen")
    return int(listen.split()[0].rsplit(":", 1)[1])


def test_hardened_swap_proxies_take_turns_at_system_scope(box):
    # the proxy units are sandboxed now (root without capabilities, read-only
    # system, no kernel access): the swap proxy must still take turns through
    # the manager, hold the group's lock and reach its server (Unix and TCP)
    names = {"sys-swap-u": "vllm", "sys-swap-t": "custom"}
    try:
        ports = {}
        for name, backend in names.items():
            text = backend_spec(backend, name).replace(
                "[health]", 'activation = "on-demand"\nswap_group = "sysg"\n'
                            'swap_drain = "10s"\n[health]')
            rc, data = deploy(box, name, text)
            assert rc == 0, data
            ports[name] = int(data["instances"][0]["public"].rsplit(":", 1)[1])
            assert "CapabilityBoundingSet" in box.run(
                ["cat", f"/etc/systemd/system/{name}.service"]).stdout
        for _ in range(2):
            for name in names:
                code, body = get(ports[name], "/v1/models", timeout=60)
                assert code == 200, (body, box.journal(f"{name}.service"))
                others = [n for n in names if n != name]
                assert all(box.prop(f"{o}-backend.service", "ActiveState") != "active"
                           for o in others), "two members loaded at once"
    finally:
        for name in names:
            remove(box, name)


def test_a_sandboxed_gateway_routes_at_system_scope(box):
    # issue 19: the gateway unit runs hardened (a dynamic user, no capabilities,
    # the API keys as a credential) and routes to a sandboxed member; issue 25,
    # item 3: the member has a key of its own (checked under /v1, as vLLM does),
    # gets it from the gateway, and never the client's gateway key
    keys = "/etc/unitgen/gw.keys"
    box.put(keys, "sk-sys-gw\n", 0o600)
    member = backend_spec("custom", "sys-gm", env='MEMBER_KEY = "sk-sys-member", '
                          'STANDIN_KEY_ENV = "MEMBER_KEY", STANDIN_KEY_SCOPE = "/v1"').replace(
        "[health]", 'gateway = "sys-gw"\napi_key_env = "MEMBER_KEY"\n[health]')
    gw = 'kind = "gateway"\nname = "sys-gw"\nport = 18990\n' f'api_keys_file = "{keys}"\n'
    try:
        rc, data = deploy(box, "sys-gm", member)
        assert rc == 0, data
        rc, data = deploy(box, "sys-gw", gw)
        assert rc == 0, box.journal("sys-gw.service")[-3000:]
        assert box.prop("sys-gw.service", "DynamicUser") == "yes"
        done = box.run(["curl", "-s", "-H", "Authorization: Bearer sk-sys-gw", "-d",
                        '{"model": "sys-gm", "messages": []}',
                        "http://127.0.0.1:18990/v1/chat/completions"])
        assert '"server": "standin"' in done.stdout, (done.stdout, box.journal("sys-gw.service"))
        done = box.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                        "http://127.0.0.1:18990/v1/models"])
        assert done.stdout == "401"
        # HAProxy's user reads the member keys from its runtime directory; nobody else can
        copy = "/run/unitgen-sys-gw/member-keys.map"
        owner = box.run(["stat", "-c", "%u", "/run/unitgen-sys-gw"]).stdout.strip()  # the dynamic user
        assert owner != "0" and box.run(["stat", "-c", "%u %a", copy]).stdout.split() == [owner, "400"]
        assert box.run(["stat", "-c", "%U %a", "/etc/unitgen/secrets/sys-gw.env"]
                       ).stdout.split() == ["root", "600"]
        other = box.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                         "cat", copy])
        assert other.returncode != 0 and "sk-sys-member" not in other.stdout
    finally:
        remove(box, "sys-gw")
        remove(box, "sys-gm")
