"""The gateway's live tests, written once for every target: each takes a ``gw``
fixture (a :class:`GatewayHost`: a real manager and the ``unitgen`` command
for it) and is collected by the tier of each target that binds the gateway:
``tests/live/test_gateway_live.py`` (a real systemd user manager) and
``tests/supervisor/test_gateway_supervisor_live.py`` (a real supervisord).
Real HAProxy, the stand-in server, and the official OpenAI SDK as the client.

What differs between the targets is the host's to say (where files go, what
holds a member's port, how to stop one by hand); a test here asserts what a
user gets on both. Tests that only one target can run stay in its tier."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import openai
import pytest

from tests.helpers import STANDIN, free_port, stream_until, write_spec
from unitgen.ops import registry
from unitgen.ops.interface import DeployOptions, Where
from unitgen.result import Result

KEY = "sk-gateway-test-4d1e"
NEEDS_HAPROXY = pytest.mark.skipif(
    shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists(),
    reason="HAProxy is not installed (./setup installs it)")


class GatewayHost(Protocol):
    """A manager with gateways on it, as the tests drive it."""

    on_demand: bool  # the target runs on-demand instances (systemd: yes)
    target: str  # its name in the registry
    where: Where  # its manager, as the CLI's options say
    env: dict[str, str]  # the environment variables that select it

    def cli(self, *args: str) -> tuple[int, Any]:
        """``unitgen ARGS --json`` for this target: (exit code, JSON)."""
        ...

    def master(self, gateway: str) -> int:
        """The pid of the gateway's HAProxy master."""
        ...

    def loaded(self, name: str) -> bool:
        """The instance's server process runs."""
        ...

    def gateway_dir(self, gateway: str) -> Path:
        """Where the gateway's HAProxy files are installed."""
        ...

    def stop_socket(self, name: str) -> tuple[str, str]:
        """Stop what holds the instance's port, by hand; what doctor then calls
        it ("drb.socket is inactive") and the command that starts it again."""
        ...

    def delete_by_hand(self, name: str) -> None:
        """Stop an instance and delete its files the way a person would."""
        ...

    def server_log(self, name: str) -> str:
        """The last lines the instance's server wrote."""
        ...

    def gateway_log(self, gateway: str) -> str:
        """What the gateway's HAProxy wrote (its request log lines among them)."""
        ...


def member(directory: Path, name: str, gateway: str, *, aliases: tuple[str, ...] = (),
           extra: str = "", **env: str) -> Path:
    env_toml = "".join(f', {k} = "{v}"' for k, v in env.items())
    return write_spec(directory, name, (
        f'name = "{name}"\nbackend = "custom"\nport = {free_port()}\n'
        f'command = ["{sys.executable}", "{STANDIN}", "--host", "{{host}}", "--port", "{{port}}"]\n'
        f'gateway = "{gateway}"\naliases = {json.dumps(list(aliases))}\n{extra}'
        f'env = {{ STANDIN_NAME = "{name}"{env_toml} }}\n[health]\ntimeout = "30s"\n'))


def keyed(directory: Path, name: str, gateway: str, key: str, log: Path, port: int) -> Path:
    """A member with an API key of its own: it wants ``key`` under /v1 only (as
    vLLM does) and logs every Authorization it gets to ``log``."""
    return write_spec(directory, name, (
        f'name = "{name}"\nbackend = "custom"\nport = {port}\ngateway = "{gateway}"\n'
        f'command = ["{sys.executable}", "{STANDIN}", "--host", "{{host}}", "--port", "{{port}}"]\n'
        'api_key_env = "MEMBER_KEY"\n'
        f'env = {{ MEMBER_KEY = "{key}", STANDIN_KEY_ENV = "MEMBER_KEY", STANDIN_KEY_SCOPE = "/v1", '
        f'STANDIN_NAME = "{name}", STANDIN_AUTH_LOG = "{log}" }}\n[health]\ntimeout = "30s"\n'))


def answers_itself(sdk: openai.OpenAI, model: str) -> bool:
    """``model`` answers a chat through the gateway as itself (False: 401, 404)."""
    try:
        answer = sdk.chat.completions.create(model=model, messages=[])
    except (openai.AuthenticationError, openai.NotFoundError):
        return False
    return answer.choices[0].message.content == f"{model} answers {model}"


def gateway(directory: Path, name: str, port: int, extra: str = "") -> Path:
    return write_spec(directory, name, (f'kind = "gateway"\nname = "{name}"\nport = {port}\n'
                                        + extra))


def client(port: int, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0,
                         timeout=60)


def raw_post(port: int, body: bytes, key: str = KEY) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {key}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def chat(port: int, model: str) -> str:
    r = client(port).chat.completions.create(model=model, messages=[])
    return r.choices[0].message.content or ""


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def here(gw: GatewayHost, verb: str, *args: str) -> Result:
    """``deploy`` or ``remove`` in this process, through the registry as the CLI
    calls it: the test's next request goes out the moment it returned (a CLI
    process takes ~0.1 s more to exit, longer than HAProxy takes to reload)."""
    with _environment(gw.env):
        ops = registry.target(gw.target, gw.where)
        if verb == "deploy":
            return ops.deploy([Path(a) for a in args], DeployOptions(say=lambda line: None))
        return ops.remove(list(args))


def findings(gw: GatewayHost, name: str) -> tuple[int, list[str]]:
    rc, data = gw.cli("doctor", name)
    return rc, [("ok   " if f["ok"] else "FAIL ") + f["text"] for f in data["findings"]]


def test_one_endpoint_for_every_model_with_the_openai_sdk(gw, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"sk-other\n{KEY}\n")
    keys.chmod(0o600)
    port = free_port()
    # gl starts on its first request where the target can do that (systemd)
    lazy = 'activation = "on-demand"\n' if gw.on_demand else ""
    specs = [member(tmp_path, "ga", "gw1", aliases=("qwen",)),
             member(tmp_path, "gb", "gw1", aliases=("qwen",)),
             member(tmp_path, "gl", "gw1", aliases=("meta-llama/Llama-3-8B",),
                    extra=lazy, STANDIN_LOAD_SECONDS="1.5", STANDIN_LOADING="refuse"),
             gateway(tmp_path, "gw1", port, f'api_keys_file = "{keys}"\n')]
    rc, data = gw.cli("deploy", *map(str, specs))
    assert rc == 0, data
    sdk = client(port)
    names = sorted(m.id for m in sdk.models.list())
    assert names == ["ga", "gb", "gl", "meta-llama/Llama-3-8B", "qwen"]
    if gw.on_demand:  # listing woke nobody: the on-demand member is still stopped
        assert not gw.loaded("gl")
    answer = sdk.chat.completions.create(model="ga", messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content == "ga answers ga"
    servers = set()
    for i in range(8):  # replicas: a conversation keeps to one, conversations spread
        seen = {(sdk.chat.completions.create(
            model="qwen", messages=[{"role": "user", "content": f"conversation {i}"}])
            .choices[0].message.content or "").split()[0] for _ in range(2)}
        assert len(seen) == 1, seen
        servers |= seen
    assert servers == {"ga", "gb"}
    # a model by its alias, streamed (on-demand: it waits while the model loads)
    t0 = time.monotonic()
    stream = sdk.chat.completions.create(model="meta-llama/Llama-3-8B", stream=True,
                                         messages=[{"role": "user", "content": "x"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "gl:9" in text, text
    assert time.monotonic() - t0 >= 1.0 or not gw.on_demand
    with pytest.raises(openai.NotFoundError) as nf:
        sdk.chat.completions.create(model="nope", messages=[])
    assert "qwen" in str(nf.value)  # it names the models there are
    with pytest.raises(openai.AuthenticationError):  # the keys file is enforced
        client(port, key="sk-wrong").models.list()
    # bodies: 600 KB with "model" last routes; above max_body: 413 naming the key
    big = {"messages": [{"role": "user", "content": "x" * 600_000}], "model": "ga"}
    assert raw_post(port, json.dumps(big).encode())[0] == 200
    huge = {"messages": [{"role": "user", "content": "x" * 1_300_000}], "model": "ga"}
    status, body = raw_post(port, json.dumps(huge).encode())
    assert status == 413 and "max_body" in json.dumps(body), body
    status, body = raw_post(port, b'{"messages": []}')
    assert status == 400 and "model" in json.dumps(body)
    # status shows the gateway and its routes
    rc, data = gw.cli("status")
    gw1 = next(g for g in data["gateways"] if g["name"] == "gw1")
    assert gw1["state"] == "ready"
    route = next(r for r in gw1["routes"] if r["route"] == "qwen")
    assert sorted(i["name"] for i in route["instances"]) == ["ga", "gb"]


def test_deploy_and_remove_while_clients_stream_fail_nothing(gw, tmp_path):
    port = free_port()
    rc, data = gw.cli("deploy", str(member(tmp_path, "sa", "gw2", STANDIN_STREAM_SECONDS="1")),
                      str(gateway(tmp_path, "gw2", port)))
    assert rc == 0, data
    master = gw.master("gw2")
    stop = threading.Event()
    outcomes: list[str] = []
    first: list[str] = []

    threads = [threading.Thread(target=stream_until, args=(client(port), "sa", stop, outcomes,
                                                           "sa:9")) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        for _ in range(2):  # each deploy and remove rewrites the config and reloads HAProxy
            done = here(gw, "deploy", str(member(tmp_path, "sb", "gw2")))
            assert done.exit_code == 0, done.lines
            # deploy returned once the new route answers: the first request gets sb
            first.append(chat(port, "sb"))
            time.sleep(0.5)
            assert here(gw, "remove", "sb").exit_code == 0
            with pytest.raises(openai.NotFoundError):  # and remove once it is gone
                chat(port, "sb")
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failed = [o for o in outcomes if o != "ok"]
    print(f"\n{len(outcomes)} streams through 4 gateway reloads, {len(failed)} failed")
    assert len(outcomes) >= 8 and not failed, failed[:5]
    assert first == ["sb answers sb"] * 2
    assert gw.master("gw2") == master  # reloaded, never restarted


def test_a_bound_on_concurrent_requests_queues_then_answers_429(gw, tmp_path):
    port = free_port()
    rc, data = gw.cli("deploy", str(member(tmp_path, "qc", "gw3", extra='max_concurrent = 1\n'
                                           'queue_timeout = "1s"\n', STANDIN_STREAM_SECONDS="4")),
                      str(gateway(tmp_path, "gw3", port)))
    assert rc == 0, data
    holder = threading.Thread(target=lambda: list(client(port).chat.completions.create(
        model="qc", stream=True, messages=[])))
    holder.start()
    time.sleep(0.5)  # the one slot is taken for 4 s
    t0 = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        client(port).chat.completions.create(model="qc", messages=[])
    waited = time.monotonic() - t0
    holder.join(30)
    assert 0.8 <= waited < 3.5, waited  # it waited its queue timeout, then 429
    # and once the slot is free, requests go through again
    assert client(port).chat.completions.create(model="qc", messages=[]).choices


def test_a_gateway_and_its_files_are_removed(gw, tmp_path):
    port = free_port()
    rc, data = gw.cli("deploy", str(gateway(tmp_path, "gw4", port)))
    assert rc == 0, data
    directory = gw.gateway_dir("gw4")
    assert (directory / "haproxy.cfg").exists()
    assert gw.cli("remove", "gw4")[0] == 0
    assert not directory.exists()


def test_doctor_explains_a_route_that_points_nowhere(gw, tmp_path):
    port, metrics = free_port(), free_port()
    rc, data = gw.cli("deploy", str(member(tmp_path, "dra", "gw6")),
                      str(member(tmp_path, "drb", "gw6", aliases=("shared",))),
                      str(member(tmp_path, "drc", "gw6", aliases=("shared",))),
                      str(gateway(tmp_path, "gw6", port, f'metrics = "127.0.0.1:{metrics}"\n')))
    assert rc == 0, data
    # the exporter answers on its own port
    conn = http.client.HTTPConnection("127.0.0.1", metrics, timeout=10)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    assert resp.status == 200 and b"haproxy_process_" in resp.read()
    conn.close()
    rc, said = findings(gw, "gw6")
    assert rc == 0, "\n".join(said)  # the exporter's port is the gateway's own, not a stray
    assert "ok   route dra -> dra" in said and "ok   route shared -> drb, drc" in said
    rc, said = findings(gw, "drb")
    assert rc == 0 and any(s.startswith(f"ok   drb joins gateway gw6 (127.0.0.1:{port}) as "
                                        "drb, shared") for s in said), "\n".join(said)
    # a member's socket stopped: its route points nowhere, the shared one half-way
    down, start = gw.stop_socket("drb")
    rc, said = findings(gw, "gw6")
    assert rc == 1
    nowhere = next(s for s in said if s.startswith("FAIL route drb points nowhere"))
    assert down in nowhere and start in nowhere, nowhere
    assert any(s.startswith(f"FAIL route shared -> drc; and {down}") for s in said), \
        "\n".join(said)
    # a member deleted by hand: the configuration still names it
    gw.delete_by_hand("dra")
    rc, said = findings(gw, "gw6")
    assert any(s.startswith("FAIL route dra points nowhere: dra is not installed")
               and "unitgen deploy" in s for s in said), "\n".join(said)
    # an instance joining a gateway that is not deployed
    rc, data = gw.cli("deploy", str(member(tmp_path, "drz", "nogw")))
    assert rc == 0, data
    rc, said = findings(gw, "drz")
    assert rc == 1
    assert any("drz joins gateway nogw, which is not deployed here" in s for s in said), \
        "\n".join(said)


def test_streams_pass_as_produced_and_a_client_that_leaves_is_seen(gw, tmp_path):
    port = free_port()
    rc, data = gw.cli("deploy", str(member(tmp_path, "sse", "gw7", STANDIN_STREAM_SECONDS="6")),
                      str(gateway(tmp_path, "gw7", port)))
    assert rc == 0, data
    body = json.dumps({"messages": [], "model": "sse", "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        t0 = time.monotonic()
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while b"sse:1 " not in got:
            chunk = conn.recv(4096)
            assert chunk, got
            got += chunk
        # the second token of a 6 s stream: passed on as written, not buffered to the end
        assert time.monotonic() - t0 < 3.0, got
    # the client left after two tokens: the server's write fails, it stops generating
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if "client went away" in gw.server_log("sse"):
            break
        time.sleep(0.3)
    else:
        raise AssertionError(gw.server_log("sse"))


def _status_of(call: Any) -> int:
    try:
        call()
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def test_keys_with_a_policy_models_rate_and_revocation_by_reload(gw, tmp_path):
    # issue 28: every key opened every route, without bounds, until a restart
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\nsk-two-9c2e name=two models=pa,pb\nsk-ten-51aa name=ten rpm=10\n")
    keys.chmod(0o600)
    port = free_port()
    specs = [member(tmp_path, "pa", "gwp"),
             member(tmp_path, "pb", "gwp", STANDIN_STREAM_SECONDS="4"), member(tmp_path, "pc", "gwp"),
             gateway(tmp_path, "gwp", port, f'api_keys_file = "{keys}"\n')]
    rc, data = gw.cli("deploy", *map(str, specs))
    assert rc == 0, data
    # a key limited to two models: it lists those two, and a third is 404
    two = client(port, key="sk-two-9c2e")
    assert sorted(m.id for m in two.models.list()) == ["pa", "pb"]
    assert chat_with(two, "pb") == "pb answers pb"
    with pytest.raises(openai.NotFoundError) as nf:
        chat_with(two, "pc")
    assert "pa, pb" in str(nf.value) and "pc" not in str(nf.value).split("models are:")[1]
    # a key limited to 10 requests a minute: 10 (+-1) of 30 answered, then 429
    ten = client(port, key="sk-ten-51aa")
    got = [_status_of(lambda: chat_with(ten, "pa")) for _ in range(30)]
    answered = got.count(200)
    assert 9 <= answered <= 11 and set(got[answered:]) == {429}, got
    raw = ten.chat.completions.with_raw_response
    with pytest.raises(openai.RateLimitError) as limited:
        raw.create(model="pa", messages=[])
    assert limited.value.response.headers["retry-after"] == "60"
    # usage: what the clients sent, by key name (never the key), in status and the log
    rc, data = gw.cli("status", "gwp", "--keys")  # the gateway named, as docs/gateway.md shows
    assert rc == 0, data
    usage = {k["name"]: k for g in data["gateways"] if g["name"] == "gwp" for k in g["keys"]}
    assert (usage["two"]["requests"], usage["two"]["forwarded"], usage["two"]["refused"]) == (
        3, 1, 1), usage["two"]
    assert usage["two"]["prompt_tokens"] == 1 and usage["two"]["completion_tokens"] == 1
    assert (usage["ten"]["requests"], usage["ten"]["forwarded"], usage["ten"]["refused"]) == (
        31, answered, 31 - answered), usage["ten"]
    assert usage["ten"]["prompt_tokens"] == answered  # the stand-in's usage: 1 a request
    logged = [json.loads(line[line.index("{"):]) for line in gw.gateway_log("gwp").splitlines()
              if '{"gateway":"gwp"' in line]
    by_key = [(x["key"], x["route"], x["status"]) for x in logged if x["key"] == "ten"]
    assert by_key == [("ten", "pa", 200)] * answered + [("ten", "pa", 429)] * (31 - answered), \
        by_key
    assert "sk-" not in gw.gateway_log("gwp") and "sk-" not in json.dumps(data)
    # a stream under the key, then the key revoked: the gateway reloads (a changed
    # keys file changes its settings), the stream goes on to its end
    stream = two.chat.completions.create(model="pb", stream=True, messages=[])
    pieces = [next(iter(stream))]
    keys.write_text(f"{KEY}\nsk-ten-51aa name=ten rpm=10\n")
    done = here(gw, "deploy", str(specs[-1]))
    assert done.exit_code == 0, done.lines
    # right after the reload, on the SDK's kept-alive connection too
    with pytest.raises(openai.AuthenticationError):
        two.models.list()
    with pytest.raises(openai.AuthenticationError):
        client(port, key="sk-two-9c2e").chat.completions.create(model="pa", messages=[])
    pieces += list(stream)
    assert "pb:9" in "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert chat_with(client(port), "pc") == "pc answers pc"  # other keys as before


def chat_with(sdk: openai.OpenAI, model: str) -> str:
    r = sdk.chat.completions.create(model=model, messages=[])
    return r.choices[0].message.content or ""
