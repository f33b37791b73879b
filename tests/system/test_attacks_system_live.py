"""The second security review (issue 17), system scope: a co-hosted model server
(a unitgen instance of its own, hardened, run as its dynamic user with the
CAP_NET_BIND_SERVICE it gets for its own private port) against another
instance, on a real system manager (tests/nspawn.py). Failed on the code
before the fix: the co-hosted server bound the other's private port."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import get, raw_get, wait_for
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
        # and the client keys, as maps root made from the root-only keys file
        keymap = "/run/unitgen-sys-gw/keys.map"
        assert box.run(["stat", "-c", "%u %a", keymap]).stdout.split() == [owner, "400"]
        assert box.run(["stat", "-c", "%U %a", "/etc/unitgen/secrets/sys-gw.env"]
                       ).stdout.split() == ["root", "600"]
        other = box.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                         "cat", copy])
        assert other.returncode != 0 and "sk-sys-member" not in other.stdout
        # a member joining reloads the sandboxed gateway: the reload (its own
        # ExecReload, as the dynamic user) ends once the new route serves
        rc, data = deploy(box, "sys-gm2", member.replace('"sys-gm"', '"sys-gm2"'))
        assert rc == 0, (data, box.journal("sys-gw.service")[-3000:])
        done = box.run(["curl", "-s", "-H", "Authorization: Bearer sk-sys-gw", "-d",
                        '{"model": "sys-gm2", "messages": []}', "http://127.0.0.1:18990/v1/chat/completions"])
        assert '"model": "sys-gm2"' in done.stdout, (done.stdout, box.journal("sys-gw.service"))
        assert "new worker" in box.journal("sys-gw.service")
        # in its sandbox the reload sees how the master takes signals (it waits
        # until it takes SIGUSR2, which it drops while it starts)
        assert "cannot read how pid" not in box.journal("sys-gw.service")
    finally:
        remove(box, "sys-gm2")
        remove(box, "sys-gw")
        remove(box, "sys-gm")


# Issue 25, High 1: a server replaces its private socket with a link to a socket
# only root may use; whatever connects there for it must not have root's rights.
ROOT_SOCKET = "/run/unitgen-test-root.sock"
ROOT_LOG = "/run/unitgen-test-root.log"
# A root-only (0600) listener: it logs what it receives and answers ROOT-ONLY.
ROOT_LISTENER = f"""
import os, socket
if os.path.exists("{ROOT_SOCKET}"):
    os.unlink("{ROOT_SOCKET}")
s = socket.socket(socket.AF_UNIX)
s.bind("{ROOT_SOCKET}"); os.chmod("{ROOT_SOCKET}", 0o600); s.listen()
while True:
    c, _ = s.accept()
    c.settimeout(2)
    try:
        data = c.recv(65536)
    except OSError:
        data = b""
    with open("{ROOT_LOG}", "ab") as fh:
        fh.write(b"CONNECTION " + data + b"\\n")
    try:
        c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 9\\r\\nConnection: close\\r\\n\\r\\nROOT-ONLY")
    except OSError:
        pass
    c.close()
"""
RELINK = "/opt/unitgen-test/relink"
# The attacking server: the stand-in, run as a child; once it has answered for a
# second (ready, the proxy running), its socket becomes a link to ROOT_SOCKET.
RELINK_SERVER = f"""#!{sys.executable}
import os, subprocess, sys, time
args = sys.argv[1:]
path = args[args.index("--uds") + 1]
child = subprocess.Popen(["{WRAPPER}", *args])
while not os.path.exists(path):
    time.sleep(0.05)
time.sleep(float(os.environ.get("RELINK_AFTER", "1")))
os.symlink("{ROOT_SOCKET}", path + ".new")
os.rename(path + ".new", path)
print("RELINKED", path, "uid", os.getuid(), flush=True)
sys.exit(child.wait())
"""


@pytest.fixture
def root_socket(box):
    box.put(RELINK, RELINK_SERVER, 0o755)
    box.run(["rm", "-f", ROOT_LOG])
    box.run(["systemd-run", "--unit=unitgen-test-rootsock", sys.executable, "-c", ROOT_LISTENER],
            check=True)
    assert wait_for(lambda: box.run(["test", "-S", ROOT_SOCKET]).returncode == 0, 10)
    try:
        yield ROOT_SOCKET
    finally:
        box.run(["systemctl", "stop", "unitgen-test-rootsock.service"])


def _relinked(box, name: str) -> bool:
    link: str = box.run(["readlink", f"/run/unitgen-{name}/http.sock"]).stdout
    return link.strip() == ROOT_SOCKET


def _relink_attack(box, name: str, port: int) -> tuple[bytes, str]:
    """Wait for the server to put its link in place, then be a client of the public port."""
    assert wait_for(lambda: _relinked(box, name), 30), box.journal(f"{name}-backend.service")
    got = raw_get(port)
    return got, box.run(["cat", ROOT_LOG]).stdout


def test_a_server_cannot_point_its_proxy_at_a_root_only_socket(box, root_socket):
    name = "sys-relink"
    text = backend_spec("vllm", name, env='RELINK_AFTER = "4"').replace(WRAPPER, RELINK)
    rc, data = deploy(box, name, text)
    try:
        assert rc == 0, (data, box.journal(f"{name}-backend.service"))
        port = int(data["instances"][0]["public"].rsplit(":", 1)[1])
        assert get(port, "/v1/models")[0] == 200  # the proxy runs, forwarding to the server
        got, received = _relink_attack(box, name, port)
        journal = box.journal(f"{name}-backend.service")
        assert "RELINKED" in journal and "uid 0" not in journal, journal
        # the client of the public port reached nothing of root's, and root's socket
        # was never connected to
        assert b"ROOT-ONLY" not in got, got
        assert received == "", received
        # the proxy runs as the server's own (dynamic) user, without capabilities
        server_pid = box.prop(f"{name}-backend.service", "MainPID")
        proxy_pid = box.prop(f"{name}.service", "MainPID")
        uids = [box.run(["stat", "-c", "%u", f"/proc/{p}"]).stdout.strip()
                for p in (server_pid, proxy_pid)]
        assert uids[0] == uids[1] and uids[0] not in ("0", ""), uids
        assert box.prop(f"{name}.service", "CapabilityBoundingSet") == ""
    finally:
        remove(box, name)


def test_a_server_cannot_point_the_swap_proxy_at_a_root_only_socket(box, root_socket):
    # the swap proxy stays root (it starts and stops units): it must check who
    # created the socket it reached before a client's byte goes there
    name = "sys-swaplink"
    text = backend_spec("vllm", name, env='RELINK_AFTER = "4"').replace(WRAPPER, RELINK).replace(
        "[health]", 'activation = "on-demand"\nswap_group = "sysl"\nswap_drain = "5s"\n[health]')
    rc, data = deploy(box, name, text)
    try:
        assert rc == 0, data
        port = int(data["instances"][0]["public"].rsplit(":", 1)[1])
        assert get(port, "/v1/models", timeout=60)[0] == 200
        got, received = _relink_attack(box, name, port)
        assert b"ROOT-ONLY" not in got, got
        # it does not follow the link: root's socket sees no connection at all
        assert received == "", received
        assert "is a link" in box.journal(f"{name}.service")
    finally:
        remove(box, name)
