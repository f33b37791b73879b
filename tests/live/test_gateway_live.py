"""The OpenAI gateway (issue 19) on a real systemd user manager with real
HAProxy, and the official OpenAI SDK as the client: one base URL for every
model, routed by the body's model; replicas, aliases, on-demand members; keys;
deploy and remove while clients stream. The tests are written once for every
target (tests/gateway_cases.py); ``gw`` is this manager (tests/live/conftest.py)."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.gateway_cases import (  # noqa: F401 - collected here, with this tier's gw
    NEEDS_HAPROXY,
    gateway,
    member,
    raw_post,
    test_a_bound_on_concurrent_requests_queues_then_answers_429,
    test_a_gateway_and_its_files_are_removed,
    test_deploy_and_remove_while_clients_stream_fail_nothing,
    test_keys_with_a_policy_models_rate_and_revocation_by_reload,
    test_one_endpoint_for_every_model_with_the_openai_sdk,
)
from tests.helpers import free_port, keepalive_until, prop
from tests.live.test_operate_live import cli, cli_json

pytestmark = [pytest.mark.systemd, NEEDS_HAPROXY]


# systemd only: `systemctl reload` by hand, and the CLI's deploy against a user manager
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
