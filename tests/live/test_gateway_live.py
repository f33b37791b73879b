"""The OpenAI gateway (issue 19) on a real systemd user manager with real
HAProxy, and the official OpenAI SDK as the client: one base URL for every
model, routed by the body's model; replicas, aliases, on-demand members; keys;
deploy and remove while clients stream."""

from __future__ import annotations

import http.client
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.helpers import STANDIN, free_port, keepalive_until, prop, stream_until, write_spec
from tests.live.test_operate_live import cli, cli_json

pytestmark = [pytest.mark.systemd,
              pytest.mark.skipif(shutil.which("haproxy") is None and not
                                 Path("/usr/sbin/haproxy").exists(),
                                 reason="HAProxy is not installed (./setup installs it)")]

KEY = "sk-gateway-test-4d1e"



def member(directory: Path, name: str, gateway: str, *, aliases: tuple[str, ...] = (),
           extra: str = "", **env: str) -> Path:
    env_toml = "".join(f', {k} = "{v}"' for k, v in env.items())
    return write_spec(directory, name, (
        f'name = "{name}"\nbackend = "custom"\nport = {free_port()}\n'
        f'command = ["{sys.executable}", "{STANDIN}", "--host", "{{host}}", "--port", "{{port}}"]\n'
        f'gateway = "{gateway}"\naliases = {json.dumps(list(aliases))}\n{extra}'
        f'env = {{ STANDIN_NAME = "{name}"{env_toml} }}\n[health]\ntimeout = "30s"\n'))


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


def test_one_endpoint_for_every_model_with_the_openai_sdk(box, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"sk-other\n{KEY}\n")
    keys.chmod(0o600)
    port = free_port()
    specs = [member(tmp_path, "ga", "gw1", aliases=("qwen",)),
             member(tmp_path, "gb", "gw1", aliases=("qwen",)),
             member(tmp_path, "gl", "gw1", aliases=("meta-llama/Llama-3-8B",),
                    extra='activation = "on-demand"\n', STANDIN_LOAD_SECONDS="1.5",
                    STANDIN_LOADING="refuse"),
             gateway(tmp_path, "gw1", port, f'api_keys_file = "{keys}"\n')]
    rc, data = cli_json(box, "deploy", "--user", *map(str, specs))
    assert rc == 0, data
    sdk = client(port)
    names = sorted(m.id for m in sdk.models.list())
    assert names == ["ga", "gb", "gl", "meta-llama/Llama-3-8B", "qwen"]
    # listing woke nobody: the on-demand member is still stopped
    assert prop(box, "gl-backend.service", "ActiveState") == "inactive"
    answer = sdk.chat.completions.create(model="ga", messages=[{"role": "user", "content": "x"}])
    assert answer.choices[0].message.content == "ga answers ga"
    servers = set()
    for _ in range(8):
        r = sdk.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "x"}])
        servers.add((r.choices[0].message.content or "").split()[0])
    assert servers == {"ga", "gb"}  # replicas, balanced
    # an on-demand model by its alias, streamed: it waits while the model loads
    t0 = time.monotonic()
    stream = sdk.chat.completions.create(model="meta-llama/Llama-3-8B", stream=True,
                                         messages=[{"role": "user", "content": "x"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "gl:9" in text and time.monotonic() - t0 >= 1.0, text
    with pytest.raises(openai.NotFoundError) as nf:
        sdk.chat.completions.create(model="nope", messages=[])
    assert "qwen" in str(nf.value)  # it names the models there are
    with pytest.raises(openai.AuthenticationError):
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
    rc, data = cli_json(box, "status", "--user")
    gw = next(g for g in data["gateways"] if g["name"] == "gw1")
    route = next(r for r in gw["routes"] if r["route"] == "qwen")
    assert sorted(i["name"] for i in route["instances"]) == ["ga", "gb"]


def test_deploy_and_remove_while_clients_stream_fail_nothing(box, tmp_path):
    port = free_port()
    rc, data = cli_json(box, "deploy", "--user",
                        str(member(tmp_path, "sa", "gw2", STANDIN_STREAM_SECONDS="1")),
                        str(gateway(tmp_path, "gw2", port)))
    assert rc == 0, data
    master = prop(box, "gw2.service", "MainPID")
    stop = threading.Event()
    outcomes: list[str] = []

    threads = [threading.Thread(target=stream_until, args=(client(port), "sa", stop, outcomes,
                                                           "sa:9")) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        for _ in range(2):  # each deploy and remove rewrites the config and reloads HAProxy
            rc, data = cli_json(box, "deploy", "--user", str(member(tmp_path, "sb", "gw2")))
            assert rc == 0, data
            time.sleep(0.5)
            assert cli(box, "remove", "--user", "sb").returncode == 0
            time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failed = [o for o in outcomes if o != "ok"]
    print(f"\n{len(outcomes)} streams through 4 gateway reloads, {len(failed)} failed")
    assert len(outcomes) >= 8 and not failed, failed[:5]
    assert prop(box, "gw2.service", "MainPID") == master  # reloaded, never restarted


def test_a_hundred_reloads_under_sixteen_streaming_clients_fail_no_request(box, tmp_path):
    """Reloads while 16 clients stream one request after the other on kept-alive
    connections, never retrying: each request is answered in full. Before, the
    old worker closed the idle connections it held at the reload, and the next
    request a client sent on one got no answer."""
    port = free_port()
    rc, data = cli_json(box, "deploy", "--user",
                        str(member(tmp_path, "hl", "gw6", STANDIN_STREAM_SECONDS="0.3")),
                        str(gateway(tmp_path, "gw6", port)))
    assert rc == 0, data
    master = prop(box, "gw6.service", "MainPID")
    stop = threading.Event()
    outcomes: list[tuple[float, str]] = []
    # half the clients think 50 ms between requests: their connections sit idle
    threads = [threading.Thread(target=keepalive_until, args=(port, "hl", stop, outcomes,
                                                              0.05 * (i % 2)))
               for i in range(16)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    try:
        time.sleep(1.0)
        for _ in range(100):
            box.systemctl("reload", "gw6.service", check=True, timeout=60)
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failed = [o for _, o in outcomes if o != "ok"]
    print(f"\n{len(outcomes)} streams through 100 reloads in {time.monotonic() - t0:.0f} s, "
          f"{len(failed)} failed")
    assert len(outcomes) >= 300 and not failed, failed[:5]
    assert prop(box, "gw6.service", "MainPID") == master  # reloaded, never restarted


def test_deploy_returns_once_the_new_route_serves_and_remove_once_it_is_gone(box, tmp_path):
    """Under streaming load, with a client asking for the new model in a loop:
    every request that starts after ``deploy`` returned is answered by the new
    member, the first one on a new connection too; after ``remove`` returned,
    the gateway's own 404. Before, deploy returned at the reload's signal and
    the previous HAProxy worker answered 404 for ~0.1 s more."""
    port = free_port()
    rc, data = cli_json(box, "deploy", "--user",
                        str(member(tmp_path, "lv", "gw7", STANDIN_STREAM_SECONDS="0.5")),
                        str(gateway(tmp_path, "gw7", port)))
    assert rc == 0, data
    stop = threading.Event()
    load: list[tuple[float, str]] = []
    threads = [threading.Thread(target=keepalive_until, args=(port, "lv", stop, load))
               for _ in range(4)]
    for t in threads:
        t.start()
    body = json.dumps({"model": "lw", "messages": []}).encode()
    try:
        for _ in range(3):
            asked: list[tuple[float, str]] = []
            asking = threading.Event()
            prober = threading.Thread(target=keepalive_until, args=(port, "lw", asking, asked))
            prober.start()
            try:
                time.sleep(0.3)
                rc, data = cli_json(box, "deploy", "--user",
                                    str(member(tmp_path, "lw", "gw7", STANDIN_STREAM_SECONDS="0.1")))
                returned = time.monotonic()
                assert rc == 0, data
                status, answer = raw_post(port, body)
                time.sleep(0.5)
            finally:
                asking.set()
                prober.join(60)
            assert status == 200 and "lw answers lw" in json.dumps(answer), (status, answer)
            after = [o for t, o in asked if t >= returned]
            assert after and all(o == "ok" for o in after), [o for o in after if o != "ok"][:3]
            assert any(o.startswith("404") for t, o in asked if t < returned)  # it was new
            assert cli(box, "remove", "--user", "lw").returncode == 0
            status, answer = raw_post(port, body)
            assert status == 404 and "no such model here" in json.dumps(answer), (status, answer)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failed = [o for _, o in load if o != "ok"]
    assert len(load) >= 8 and not failed, failed[:5]


def test_a_bound_on_concurrent_requests_queues_then_answers_429(box, tmp_path):
    port = free_port()
    rc, data = cli_json(box, "deploy", "--user",
                        str(member(tmp_path, "qc", "gw3", extra='max_concurrent = 1\n'
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


def test_a_gateway_and_its_files_are_removed(box, tmp_path):
    port = free_port()
    rc, data = cli_json(box, "deploy", "--user", str(gateway(tmp_path, "gw4", port)))
    assert rc == 0, data
    directory = Path(box.env["HOME"]) / ".config" / "unitgen" / "gateways" / "gw4"
    assert (directory / "haproxy.cfg").exists()
    assert cli(box, "remove", "--user", "gw4").returncode == 0
    assert not directory.exists()
