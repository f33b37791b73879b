"""The OpenAI gateway under a real supervisord (run as root, as on the hosts it
is for), with real HAProxy and the official OpenAI SDK: the gateway tests
written once for every target (tests/gateway_cases.py: routing by name and
alias, keys, the exporter, status and doctor, a member deployed and removed
while clients stream), and what only this target has to show: supervisord's
holder keeps the port while HAProxy restarts, a gateway whose routes alone
changed is signalled, not restarted, and HAProxy runs as the haproxy user with
only that user's rights (a real process of that uid tries the rest)."""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from tests.gateway_cases import (  # noqa: F401 - collected here, with this tier's gw
    KEY,
    NEEDS_HAPROXY,
    answers_itself,
    chat,
    client,
    gateway,
    here,
    keyed,
    member,
    test_a_bound_on_concurrent_requests_queues_then_answers_429,
    test_a_gateway_and_its_files_are_removed,
    test_deploy_and_remove_while_clients_stream_fail_nothing,
    test_doctor_explains_a_route_that_points_nowhere,
    test_keys_with_a_policy_models_rate_and_revocation_by_reload,
    test_one_endpoint_for_every_model_with_the_openai_sdk,
    test_streams_pass_as_produced_and_a_client_that_leaves_is_seen,
)
from tests.helpers import free_port
from tests.supervisord import Supervisord, supervisord_unavailable_reason
from unitgen.ops.interface import Where
from unitgen.targets.supervisor.gateway import GATEWAY_USER

# the attacker runs as HAProxy's user: an interpreter that user may execute
# (the venv's is under /root here)
SYSTEM_PYTHON = "/usr/bin/python3"


def _why_not() -> str:
    if os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK):
        return ("needs root (supervisord runs the gateway's wrapper as root, HAProxy drops to "
                f"{GATEWAY_USER}) and {SYSTEM_PYTHON}")
    try:
        pwd.getpwnam(GATEWAY_USER)
    except KeyError:
        return f"no user {GATEWAY_USER} (Debian's haproxy package makes it)"
    return ""


pytestmark = [NEEDS_HAPROXY, pytest.mark.skipif(bool(_why_not()), reason=_why_not())]


@pytest.fixture(scope="module")
def sd() -> Iterator[Supervisord]:
    reason = supervisord_unavailable_reason()
    if reason:
        pytest.skip(f"no supervisord: {reason}")
    # HAProxy (the haproxy user) reads its files below this directory: not in
    # pytest's own, which only root may enter
    root = Path(tempfile.mkdtemp(prefix="unitgen-gw-sup-", dir="/tmp"))
    root.chmod(0o755)
    box = Supervisord.start(root)
    try:
        yield box
    finally:
        box.cleanup()


class SupervisorGateways:
    """The gateway tests' host (tests/gateway_cases.py) on a real supervisord."""

    on_demand = False  # supervisord cannot start a program on a connection
    target = "supervisor"
    where = Where()

    def __init__(self, sd: Supervisord) -> None:
        self.sd = sd
        self.env = {"UNITGEN_TARGET": "supervisor", "UNITGEN_SUPERVISOR_URL": sd.url,
                    "UNITGEN_SUPERVISOR_CONF_DIR": str(sd.conf_dir),
                    "UNITGEN_SUPERVISOR_RUN_DIR": str(sd.root / "run"),
                    "UNITGEN_SUPERVISOR_LOG_DIR": str(sd.root / "log"),
                    "UNITGEN_SUPERVISOR_SECRETS_DIR": str(sd.root / "secrets"),
                    "UNITGEN_SUPERVISOR_CONFIG_DIR": str(sd.root / "etc")}

    def cli(self, verb: str, *args: str) -> tuple[int, Any]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("UNITGEN_")}
        done = subprocess.run([sys.executable, "-m", "unitgen", verb, *args, "--json"],
                              env={**base, **self.env}, capture_output=True, text=True,
                              timeout=180)
        try:
            return done.returncode, json.loads(done.stdout)
        except ValueError:
            raise AssertionError(f"not JSON: {done.stdout!r} {done.stderr}") from None

    def info(self, program: str) -> dict[str, Any]:
        return dict(self.sd.rpc().call("getProcessInfo", program))

    def master(self, gateway: str) -> int:
        return int(self.info(f"{gateway}-backend")["pid"])

    def loaded(self, name: str) -> bool:
        return str(self.info(f"{name}-backend")["statename"]) == "RUNNING"

    def gateway_dir(self, gateway: str) -> Path:
        return self.sd.root / "etc" / "unitgen" / "gateways" / gateway

    def stop_socket(self, name: str) -> tuple[str, str]:
        self.sd.rpc().call("stopProcess", name, True)
        return f"program {name} is stopped", f"supervisorctl start {name}"

    def delete_by_hand(self, name: str) -> None:
        rpc = self.sd.rpc()
        for group in (name, f"{name}-backend"):
            rpc.remove_group(group)
        (self.sd.conf_dir / f"unitgen-{name}.conf").unlink()
        rpc.reload_config()

    def server_log(self, name: str) -> str:
        return self.sd.rpc().tail(f"{name}-backend", 0, 65536)[0][-4000:]

    def gateway_log(self, gateway: str) -> str:
        return self.sd.rpc().tail(f"{gateway}-backend", 0, 1 << 20)[0]

    def installed(self) -> list[str]:
        return sorted(p.name[len("unitgen-"):-len(".conf")]
                      for p in self.sd.conf_dir.glob("unitgen-*.conf"))


@pytest.fixture
def gw(sd: Supervisord) -> Iterator[SupervisorGateways]:
    """This supervisord; what a test deployed is removed afterwards, whatever its outcome."""
    host = SupervisorGateways(sd)
    yield host
    if names := host.installed():
        host.cli("remove", *names)


def test_a_request_during_a_gateway_restart_waits_and_is_answered(gw, tmp_path):
    port = free_port()
    rc, data = gw.cli("deploy", str(member(tmp_path, "rsa", "gwr")),
                      str(gateway(tmp_path, "gwr", port)))
    assert rc == 0, data
    holder = gw.info("gwr")["pid"]
    gw.sd.rpc().call("stopProcess", "gwr-backend", True)  # HAProxy is gone
    got: list[tuple[str, float]] = []

    def ask() -> None:
        t0 = time.monotonic()
        got.append((chat(port, "rsa"), time.monotonic() - t0))

    asking = threading.Thread(target=ask)
    asking.start()
    time.sleep(1.0)
    assert asking.is_alive() and not got  # it waits in the socket supervisord holds
    gw.sd.rpc().call("startProcess", "gwr-backend", True)
    asking.join(30)
    [(answer, waited)] = got
    assert answer == "rsa answers rsa" and waited >= 1.0
    assert gw.info("gwr")["pid"] == holder  # the port's holder never stopped


def test_a_gateway_whose_routes_alone_changed_is_reloaded_not_restarted(gw, tmp_path):
    port = free_port()
    spec = str(gateway(tmp_path, "gwo", port))
    rc, data = gw.cli("deploy", str(member(tmp_path, "roa", "gwo")), spec)
    assert rc == 0, data
    master = gw.master("gwo")
    # the same again changes nothing (its 429.http ends its lines with CRLF)
    rc, data = gw.cli("deploy", str(tmp_path / "roa.toml"), spec)
    assert rc == 0 and [i["action"] for i in data["instances"]] == ["unchanged"] * 2, data
    # the gateway and a new member in one run: only its HAProxy files change
    done = here(gw, "deploy", str(member(tmp_path, "rob", "gwo")), spec)
    assert done.exit_code == 0, done.lines
    outcome = next(i for i in done.data["instances"] if i["name"] == "gwo")
    assert outcome["action"] == "updated" and outcome["ready"], outcome
    assert chat(port, "rob") == "rob answers rob"  # the first request after deploy
    assert gw.master("gwo") == master  # signalled (SIGUSR2), never restarted


_ATTEMPTS = r"""
import json, os, socket, sys
out = {"uid": os.getuid()}
for key, path in json.loads(sys.argv[1]).items():
    try:
        if path.endswith(".sock"):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
        elif key.startswith("write"):
            open(path, "a").close()
        else:
            open(path).read()
        out[key] = "done"
    except OSError as exc:
        out[key] = type(exc).__name__
print(json.dumps(out))
"""


def test_haproxy_runs_without_root_and_cannot_read_what_it_should_not(gw, tmp_path):
    keys = gw.sd.root / "gws.keys"  # where HAProxy's user could reach it, but for its mode
    keys.write_text(f"{KEY}\n")
    keys.chmod(0o600)
    port = free_port()
    # a member with a secret in its env file
    secret = member(tmp_path, "sma", "gws", SMA_SECRET="sk-member-secret")  # noqa: S106 - a test value
    rc, data = gw.cli("deploy", str(secret), str(gateway(
        tmp_path, "gws", port, f'api_keys_file = "{keys}"\nmetrics = "127.0.0.1:{free_port()}"\n')))
    assert rc == 0, data
    user = pwd.getpwnam(GATEWAY_USER)
    master = psutil.Process(gw.master("gws"))
    for proc in [master, *master.children()]:  # the master and its workers
        status = Path(f"/proc/{proc.pid}/status").read_text()
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert fields["Uid"].split() == [str(user.pw_uid)] * 4, (proc.pid, fields["Uid"])
        assert fields["Gid"].split() == [str(user.pw_gid)] * 4
        assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
    run = gw.sd.root / "run" / "unitgen-gws"
    tries = {"its own keys map": str(run / "keys.map"),
             "the keys file": str(keys),
             "the member's secrets": str(gw.sd.root / "secrets" / "sma.env"),
             "supervisord's socket": str(gw.sd.socket),
             "write its configuration": str(gw.gateway_dir("gws") / "haproxy.cfg"),
             "write its route map": str(gw.gateway_dir("gws") / "routes.map")}
    done = subprocess.run([SYSTEM_PYTHON, "-I", "-c", _ATTEMPTS, json.dumps(tries)],
                          user=user.pw_uid, group=user.pw_gid,
                          extra_groups=os.getgrouplist(GATEWAY_USER, user.pw_gid),
                          capture_output=True, text=True, timeout=30, check=True)
    said = json.loads(done.stdout)
    assert said.pop("uid") == user.pw_uid
    assert said == {"its own keys map": "done", "the keys file": "PermissionError",
                    "the member's secrets": "PermissionError",
                    "supervisord's socket": "PermissionError",
                    "write its configuration": "PermissionError",
                    "write its route map": "PermissionError"}, said
    # and with those maps it enforces the keys
    assert client(port).models.list().data
    assert gw.cli("remove", "gws")[0] == 0
    assert not run.exists()  # the maps go with the gateway



def test_a_member_with_a_key_of_its_own_answers_clients_of_the_gateway(gw, tmp_path):
    # it was refused under supervisord ("cannot send a member its own key yet"):
    # the gateway sends the member its own key, never the client's gateway key,
    # from a copy root makes for HAProxy's user at start and before each reload
    keys = gw.sd.root / "gwm.keys"
    keys.write_text("sk-gateway-only-5e0d\n")
    keys.chmod(0o600)
    logs = {n: tmp_path / f"{n}.auth" for n in ("mk", "mp")}
    port, mk_port = free_port(), free_port()
    plain = member(tmp_path, "mp", "gwm", STANDIN_AUTH_LOG=str(logs["mp"]))
    rc, data = gw.cli("deploy", str(plain), str(gateway(tmp_path, "gwm", port,
                                                        f'api_keys_file = "{keys}"\n')))
    assert rc == 0, data
    master = gw.master("gwm")
    # a member with a key of its own joins the running gateway: a reload
    rc, data = gw.cli("deploy", str(keyed(tmp_path, "mk", "gwm", "sk-member-1", logs["mk"],
                                          mk_port)))
    assert rc == 0, data
    sdk = client(port, key="sk-gateway-only-5e0d")
    for model in ("mk", "mp"):
        assert answers_itself(sdk, model), (model, gw.gateway_log("gwm")[-2000:])
    seen = {n: log.read_text().split("\n") for n, log in logs.items()}
    assert "Bearer sk-member-1" in seen["mk"], seen
    assert not any("sk-gateway-only" in line for lines in seen.values() for line in lines), seen
    # its key changes: deployed again, the gateway is signalled and sends the new one
    rc, data = gw.cli("deploy", str(keyed(tmp_path, "mk", "gwm", "sk-member-2", logs["mk"],
                                          mk_port)))
    assert rc == 0, data
    before = len(logs["mk"].read_text().split("\n"))
    assert answers_itself(sdk, "mk"), logs["mk"].read_text()[-300:]
    after = logs["mk"].read_text().split("\n")[before - 1:]
    assert "Bearer sk-member-2" in after and "Bearer sk-member-1" not in after, after
    assert gw.master("gwm") == master  # signalled, never restarted
    # the key reaches HAProxy's user through its runtime directory only
    user = pwd.getpwnam(GATEWAY_USER)
    copy = (gw.sd.root / "run" / "unitgen-gwm" / "member-keys.map").stat()
    assert (copy.st_uid, stat.S_IMODE(copy.st_mode)) == (user.pw_uid, 0o400)
    secret = gw.sd.root / "secrets" / "gwm.env"
    st = secret.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert "sk-member-2" in secret.read_text()
    shown = "".join(p.read_text() for p in [*gw.sd.conf_dir.glob("*.conf"),
                                            *gw.gateway_dir("gwm").iterdir()])
    _, status = gw.cli("status")
    for where, text in (("supervisord's conf files and HAProxy's", shown),
                        ("status", json.dumps(status)), ("HAProxy's log", gw.gateway_log("gwm"))):
        assert "sk-member-" not in text and "sk-gateway-only" not in text, where
    # a client with the member's key but no gateway key is refused at the door
    with pytest.raises(openai.AuthenticationError):
        client(port, key="sk-member-2").chat.completions.create(model="mk", messages=[])
    assert gw.cli("remove", "mk", "mp", "gwm")[0] == 0
    assert not secret.exists()
