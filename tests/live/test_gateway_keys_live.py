"""The client's gateway key stays at the gateway (issue 25, item 3), on a real
user manager with real HAProxy and the OpenAI SDK: a member with a key of its
own (checked under /v1 only, as vLLM does) answers clients that hold only a
gateway key, a member without one never receives that key, and the member
keys follow deploys by reloads (new workers, same master)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.gateway_cases import NEEDS_HAPROXY, answers_itself, client, gateway, keyed, member
from tests.helpers import STANDIN, free_port, prop, wait_for
from tests.live.test_operate_live import cli_json

pytestmark = [pytest.mark.systemd, NEEDS_HAPROXY]

GATEWAY_KEY = "sk-gateway-only-7c2a"


def test_members_never_see_the_gateway_key_and_answer_with_their_own(box, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"{GATEWAY_KEY}\n")
    keys.chmod(0o600)
    logs = {n: tmp_path / f"{n}.auth" for n in ("kk", "kp")}
    port, kk_port = free_port(), free_port()
    plain = member(tmp_path, "kp", "gwk", STANDIN_AUTH_LOG=str(logs["kp"]))
    rc, data = cli_json(box, "deploy", "--user", str(plain),
                        str(gateway(tmp_path, "gwk", port, f'api_keys_file = "{keys}"\n')))
    assert rc == 0, data
    master = prop(box, "gwk.service", "MainPID")
    # a member with a key of its own joins the running gateway: a reload, not a restart
    rc, data = cli_json(box, "deploy", "--user",
                        str(keyed(tmp_path, "kk", "gwk", "sk-member-1", logs["kk"], kk_port)))
    assert rc == 0, data
    sdk = client(port, key=GATEWAY_KEY)
    for model in ("kk", "kp"):  # (kk's route comes with the reload's new workers)
        assert wait_for(lambda m=model: answers_itself(sdk, m), 5.0), model
    seen = {n: log.read_text().split("\n") for n, log in logs.items()}
    assert "Bearer sk-member-1" in seen["kk"], seen
    assert not any(GATEWAY_KEY in line for lines in seen.values() for line in lines), seen
    # its key changes: deployed again, the gateway reloads and sends the new one
    rc, data = cli_json(box, "deploy", "--user",
                        str(keyed(tmp_path, "kk", "gwk", "sk-member-2", logs["kk"], kk_port)))
    assert rc == 0, data
    # at once, on the SDK's kept-alive connection too: the old worker that answers
    # its next request was handed the new key before the reload
    assert answers_itself(sdk, "kk"), logs["kk"].read_text()[-300:]
    assert prop(box, "gwk.service", "MainPID") == master
    # the member's own key reaches HAProxy through its runtime directory only
    runtime = Path(box.env["XDG_RUNTIME_DIR"]) / "unitgen-gwk" / "member-keys.map"
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o400
    secret = Path(box.env["HOME"]) / ".config" / "unitgen" / "secrets" / "gwk.env"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and "sk-member-2" in secret.read_text()
    shown = [prop(box, "gwk.service", p) for p in ("ExecStart", "ExecStartPre", "ExecReload")]
    units = "".join(p.read_text() for p in box.unit_dir.glob("*.s*"))
    configs = "".join(p.read_text() for p in
                      (Path(box.env["HOME"]) / ".config" / "unitgen" / "gateways" / "gwk").iterdir())
    _, status = cli_json(box, "status", "--user")
    journal = box.journal(lines=5000)
    for where, text in (("systemctl show", " ".join(shown)), ("units", units),
                        ("HAProxy's files", configs), ("status", json.dumps(status)),
                        ("journal", journal)):
        assert "sk-member-" not in text and GATEWAY_KEY not in text, where
    # a client with the member's key but no gateway key is refused at the door
    try:
        client(port, key="sk-member-2").chat.completions.create(model="kk", messages=[])
        raise AssertionError("the gateway let a client in without a gateway key")
    except openai.AuthenticationError:
        pass


def test_an_upstream_gets_its_own_key_never_the_gateways(box, tmp_path):
    # a member on another host (here: a server the test runs, at an address of
    # its own): the gateway key would cross the network to it
    keys, own, log = tmp_path / "keys", tmp_path / "upstream.key", tmp_path / "up.auth"
    keys.write_text(f"{GATEWAY_KEY}\n")
    own.write_text("sk-upstream-1\n")
    for f in (keys, own):
        f.chmod(0o600)
    up_port, plain_port, port = free_port(), free_port(), free_port()
    plain_log = tmp_path / "plain.auth"
    servers = [subprocess.Popen(
        [sys.executable, str(STANDIN), "--host", "127.0.0.1", "--port", str(p)], env=env,
        stderr=subprocess.DEVNULL) for p, env in (
        (up_port, {"UP_KEY": "sk-upstream-1", "STANDIN_KEY_ENV": "UP_KEY",
                   "STANDIN_KEY_SCOPE": "/v1", "STANDIN_NAME": "up", "STANDIN_AUTH_LOG": str(log)}),
        (plain_port, {"STANDIN_NAME": "upplain", "STANDIN_AUTH_LOG": str(plain_log)}))]
    try:
        spec = gateway(tmp_path, "gwu", port, f'api_keys_file = "{keys}"\n[[upstreams]]\n'
                       f'node = "h1"\nname = "up"\naddress = "127.0.0.1:{up_port}"\n'
                       f'api_key_file = "{own}"\n[[upstreams]]\nnode = "h2"\nname = "upplain"\n'
                       f'address = "127.0.0.1:{plain_port}"\n')
        rc, data = cli_json(box, "deploy", "--user", str(spec))
        assert rc == 0, data
        sdk = client(port, key=GATEWAY_KEY)
        for model in ("up", "upplain"):
            assert wait_for(lambda m=model: answers_itself(sdk, m), 5.0), model
        seen = log.read_text().split("\n") + plain_log.read_text().split("\n")
        assert "Bearer sk-upstream-1" in seen and not any(GATEWAY_KEY in s for s in seen), seen
        assert set(plain_log.read_text().split()) == {"None"}
        gw_json = Path(box.env["HOME"]) / ".config" / "unitgen" / "gateways" / "gwu" / "gateway.json"
        assert "sk-upstream-1" not in gw_json.read_text() and str(own) in gw_json.read_text()
    finally:
        for server in servers:
            server.terminate()
            server.wait(10)
