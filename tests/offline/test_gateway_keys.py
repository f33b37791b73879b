"""Keys with a policy (issue 28): the keys file's format and what a real HAProxy
running the rendered configuration does with it (routes ``m1``, ``alias`` and
``m2``, members that record what they get): a key's models, its rate, its
requests in flight, and a key revoked by a reload. No service manager: the
live tiers deploy the same files (tests/gateway_cases.py)."""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import pytest

from tests.offline.test_gateway_door import HAPROXY, Door, _chat, _scrape, door
from unitgen.features.gateway.files import SETTINGS
from unitgen.features.gateway.live import wait_served
from unitgen.features.gateway.plan import GatewaySettings
from unitgen.features.gateway.render import FILES, member_keys_map
from unitgen.features.gateway.usage import usage_lines
from unitgen.inunit import gwkeys, keycopy
from unitgen.inunit.gwkeys import (
    MEMBER_KEYS,
    SALT,
    default_name,
    parse_keys,
    push,
    write_maps,
)
from unitgen.inunit.hareload import reload, runtime_api

pytestmark = pytest.mark.skipif(not Path(HAPROXY).exists(),
                                reason="HAProxy is not installed (./setup installs it)")

KEYS = """\
# comments and blank lines are skipped
sk-plain-1f3a
sk-two-9c2e   name=two models=m1,alias
sk-slow-77d0  name=slow rpm=10
sk-one-4b1c   name=one in_flight=1
"""


def _keys(tmp: Path, text: str = KEYS) -> Path:
    path = tmp / "gw.keys"
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_a_line_is_a_key_and_its_policy_and_every_problem_names_its_line():
    keys, problems = parse_keys(KEYS)
    assert problems == []
    assert [(k.name, k.models, k.rpm, k.in_flight) for k in keys] == [
        (default_name("sk-plain-1f3a"), None, None, None), ("two", ("m1", "alias"), None, None),
        ("slow", None, 10, None), ("one", None, None, 1)]
    assert default_name("sk-plain-1f3a").startswith("key-") and "1f3a" not in default_name(
        "sk-plain-1f3a")
    _, problems = parse_keys("sk-a\nsk-\"bad\nsk-b rpm=0 colour=red\nsk-a\n"
                             "sk-c name=x models=m1\nsk-d name=x models=m2\nsk-e models=a,,b\n")
    assert problems == [
        "line 2: the key (its first word) holds characters a Bearer token cannot (letters, "
        "digits and -._~+/ then = at the end), or is over 1024 long",
        "line 3: word 3 is not one of name=, models=, rpm=, in_flight=",
        "line 3: rpm= is not a whole number from 1 to 1000000000",
        "line 4: the same key as line 1",
        "line 6: name=x is on line 5 with other models, rpm or in_flight: keys that share a "
        "name share its rules",
        "line 7: models= must be route names separated by commas, each once"]
    assert not any("sk-" in p for p in problems)  # a problem never quotes a key
    # nor a key written where a field belongs: after "Bearer", after its policy, a second
    # key on one line, a key pasted into a field
    _, problems = parse_keys("Bearer sk-live-9c1f\nsk-x name=alice sk-live-77aa\n"
                             "sk-live-0b2e sk-live-5d6c\nsk-y name=sk-live-31ee/x rpm=sk-live-3\n"
                             "sk-z models=sk-live-42,,\n")
    assert len(problems) == 6 and not any("live" in p for p in problems), problems


def _get(d: Door, path: str, key: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}"), dict(resp.getheaders())
    finally:
        conn.close()


def test_a_key_uses_its_models_only_and_lists_only_them(tmp_path):
    gw = GatewaySettings("pol", api_keys_file=str(_keys(tmp_path)))
    with door(tmp_path, gw) as d:
        status, listed, _ = _get(d, "/v1/models", "sk-two-9c2e")
        assert status == 200 and [m["id"] for m in listed["data"]] == ["alias", "m1"], listed
        status, listed, _ = _get(d, "/v1/models", "sk-plain-1f3a")  # every route
        assert [m["id"] for m in listed["data"]] == ["alias", "m1", "m2"], listed
        for model in ("m1", "alias"):
            assert d.request("POST", "/v1/chat/completions", _chat(model), key="sk-two-9c2e")[0] \
                == 200
        before = len(d.seen.requests)
        for model in ("m2", "nope"):  # another route, or none: its own 404, naming its models
            status, said = d.request("POST", "/v1/chat/completions", _chat(model),
                                     key="sk-two-9c2e")
            assert status == 404, said
            message = said["error"]["message"]
            assert "its models are: m1, alias" in message and "m2" not in message, said
        assert len(d.seen.requests) == before  # no member saw them
        assert d.request("POST", "/v1/chat/completions", _chat("m2"), key="sk-plain-1f3a")[0] \
            == 200


def test_a_key_with_a_rate_gets_its_share_of_a_minute_then_429_with_retry_after(tmp_path):
    gw = GatewaySettings("rate", api_keys_file=str(_keys(tmp_path)))
    with door(tmp_path, gw) as d:
        answers = []
        for _ in range(30):
            conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
            conn.request("POST", "/v1/chat/completions", body=_chat(),
                         headers={"Authorization": "Bearer sk-slow-77d0",
                                  "Content-Type": "application/json"})
            resp = conn.getresponse()
            answers.append((resp.status, resp.getheader("Retry-After"), json.loads(resp.read())))
            conn.close()
        ok = [a for a in answers if a[0] == 200]
        assert 9 <= len(ok) <= 11 and answers[:len(ok)] == ok, [a[0] for a in answers]
        refused = answers[len(ok):]
        assert all(s == 429 and after == "60" for s, after, _ in refused), refused[:2]
        assert refused[0][2]["error"]["type"] == "rate_limit_error"
        assert "rpm" in refused[0][2]["error"]["message"]
        # another key is not held back by it
        assert d.request("POST", "/v1/chat/completions", _chat(), key="sk-plain-1f3a")[0] == 200


def test_a_key_with_a_bound_in_flight_gets_429_beyond_it(tmp_path):
    gw = GatewaySettings("flight", api_keys_file=str(_keys(tmp_path)))
    with door(tmp_path, gw) as d:
        slow = json.dumps({"model": "m1", "sleep": 1.5}).encode()
        held: list[int] = []
        holder = threading.Thread(target=lambda: held.append(
            d.request("POST", "/v1/chat/completions", slow, key="sk-one-4b1c")[0]))
        holder.start()
        time.sleep(0.5)
        conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
        conn.request("POST", "/v1/chat/completions", body=_chat(),
                     headers={"Authorization": "Bearer sk-one-4b1c"})
        resp = conn.getresponse()
        said = json.loads(resp.read())
        assert resp.status == 429 and resp.getheader("Retry-After") == "1", said
        assert "in_flight" in said["error"]["message"]
        conn.close()
        # other keys are not bound by it
        assert d.request("POST", "/v1/chat/completions", _chat(), key="sk-plain-1f3a")[0] == 200
        holder.join(10)
        assert held == [200]
        assert d.request("POST", "/v1/chat/completions", _chat(), key="sk-one-4b1c")[0] == 200


def _reload(d: Door, keys: Path, metrics_keys: Path | None = None) -> None:
    """What the unit's ExecReload= does: the maps again, handed to the running
    worker, then the signal; returns once a new worker serves."""
    files = write_maps(str(keys), str(d.directory / FILES["models"]), str(d.directory),
                       str(metrics_keys) if metrics_keys else None)
    push(str(d.directory / "admin.sock"), str(d.directory), files)
    assert reload(d.master, str(d.directory / "admin.sock"), 10.0) is None


def test_a_revoked_key_fails_right_after_the_reload_on_a_kept_alive_connection(tmp_path):
    keys = _keys(tmp_path)
    gw = GatewaySettings("revoke", api_keys_file=str(keys))
    with door(tmp_path, gw) as d:
        headers = {"Authorization": "Bearer sk-two-9c2e", "Content-Type": "application/json"}
        kept = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
        kept.request("POST", "/v1/chat/completions", body=_chat(), headers=headers)
        first = kept.getresponse()
        assert first.status == 200 and first.read()
        # a slow answer under the key, across the reload
        slow = json.dumps({"model": "m1", "sleep": 2}).encode()
        during: list[int] = []
        stream = threading.Thread(target=lambda: during.append(
            d.request("POST", "/v1/chat/completions", slow, key="sk-two-9c2e")[0]))
        stream.start()
        time.sleep(0.3)
        _reload(d, _keys(tmp_path, KEYS.replace("sk-two-9c2e", "# revoked")))
        # the connection opened before the reload is the old worker's: its next
        # request is answered by the new keys
        kept.request("POST", "/v1/chat/completions", body=_chat(), headers=headers)
        again = kept.getresponse()
        assert again.status == 401, again.read()
        again.read()
        kept.close()
        assert d.request("POST", "/v1/chat/completions", _chat(), key="sk-two-9c2e")[0] == 401
        assert d.request("POST", "/v1/chat/completions", _chat(), key="sk-plain-1f3a")[0] == 200
        stream.join(10)
        assert during == [200]  # what it started before the reload went on to its end


def test_a_members_new_key_is_sent_right_after_the_reload_on_a_kept_alive_connection(tmp_path):
    # the old worker answered a connection it held with the member's old key (the
    # member, wanting its new one, refused it): the keys it sends are handed over too
    keys = _keys(tmp_path)
    gw = GatewaySettings("rotate", api_keys_file=str(keys))
    with door(tmp_path, gw, keys={"m1": "sk-member-old"}) as d:
        headers = {"Authorization": "Bearer sk-plain-1f3a", "Content-Type": "application/json"}
        kept = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
        kept.request("POST", "/v1/chat/completions", body=_chat(), headers=headers)
        assert kept.getresponse().read()
        secret = tmp_path / "rotate.env"  # root's secret file, as deploy writes it
        secret.write_text(member_keys_map("rotate", {"r1": "sk-member-new"}))
        secret.chmod(0o600)
        # what the unit's ExecReload= lines run: the copy HAProxy reads at start,
        # the maps handed to the running worker, then the reload
        assert keycopy.main([str(secret), str(d.directory / MEMBER_KEYS)]) == 0
        assert gwkeys.main(["--keys", str(keys), "--models", str(d.directory / FILES["models"]),
                            "--out", str(d.directory), "--admin", str(d.directory / "admin.sock"),
                            "--member-keys", str(secret)]) == 0
        assert reload(d.master, str(d.directory / "admin.sock"), 10.0) is None
        kept.request("POST", "/v1/chat/completions", body=_chat(), headers=headers)
        assert kept.getresponse().read()
        kept.close()
        assert d.request("POST", "/v1/chat/completions", _chat(), key="sk-plain-1f3a")[0] == 200
        sent = [h.get("authorization") for name, _, _, h, _ in d.seen.requests if name == "m1"]
        assert sent == ["Bearer sk-member-old", "Bearer sk-member-new", "Bearer sk-member-new"]


def test_tokens_are_counted_when_the_body_comes_after_the_head(tmp_path):
    # a small answer comes whole with its head and is read at once; one whose body
    # comes later (a large answer, a slow server, chunks) is waited for, up to 1 s
    gw = GatewaySettings("late", api_keys_file=str(_keys(tmp_path)))
    with door(tmp_path, gw) as d:
        for extra in ({}, {"body_after": 0.3}, {"body_after": 0.2, "chunked": True}):
            body = json.dumps({"model": "m1", "messages": [], **extra}).encode()
            status, answer = d.request("POST", "/v1/chat/completions", body, key="sk-two-9c2e")
            assert status == 200 and answer["usage"]["prompt_tokens"] == 7, answer
        two = {k["name"]: k for k in _usage(d)["keys"]}["two"]
        assert (two["forwarded"], two["prompt_tokens"], two["completion_tokens"]) == (3, 21, 15)


def test_the_exporters_keys_change_with_a_reload_too(tmp_path):
    # HAProxy 2.6 takes a payload for "add map" only: the exporter's keys (an ACL)
    # sent as one made every reload of a gateway with metrics_keys_file fail
    scrapers = tmp_path / "metrics.keys"
    scrapers.write_text("sk-prometheus-old\n")
    scrapers.chmod(0o600)
    keys = _keys(tmp_path)
    gw = GatewaySettings("promr", api_keys_file=str(keys), metrics="127.0.0.1:9101",
                         metrics_keys_file=str(scrapers))
    with door(tmp_path, gw) as d:
        assert _scrape(d.metrics_port, "sk-prometheus-old")[0] == 200
        scrapers.write_text("sk-prometheus-new\nsk-prometheus-two\n")
        _reload(d, keys, scrapers)
        assert _scrape(d.metrics_port, "sk-prometheus-old")[0] == 401
        assert _scrape(d.metrics_port, "sk-prometheus-new")[0] == 200
        assert _scrape(d.metrics_port, "sk-prometheus-two")[0] == 200


def test_deploy_waits_for_the_new_routes_with_a_key_that_has_a_policy(tmp_path):
    # the wait after a reload asks GET /v1/models with a key of the file: a line
    # with a policy is a key too, and a key with models= sees its own list
    keys = _keys(tmp_path, "sk-two-9c2e name=two models=m1,m2\n")
    gw = GatewaySettings("wait", api_keys_file=str(keys))
    with door(tmp_path, gw) as d:
        (d.directory / SETTINGS).write_text(json.dumps({"settings": asdict(gw)}))
        assert wait_served("wait", d.directory, f"127.0.0.1:{d.port}", timeout=5) is None


def _usage(d: Door) -> dict[str, Any]:
    said = runtime_api(d.directory / "admin.sock", "unitgen usage")
    return cast("dict[str, Any]", json.loads(said))


def _http(port: int, path: str, **headers: str) -> tuple[int, str, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def test_usage_per_key_and_route_in_the_log_the_counters_and_the_page(tmp_path):
    gw = GatewaySettings("use", api_keys_file=str(_keys(tmp_path)), metrics="127.0.0.1:9101")
    with door(tmp_path, gw) as d:
        sent = [("sk-two-9c2e", "m1")] * 3 + [("sk-two-9c2e", "m2")] + [("sk-plain-1f3a", "m2")] * 2
        for key, model in sent:
            d.request("POST", "/v1/chat/completions", _chat(model), key=key)
        # an unnamed key's name: an HMAC with the gateway's own secret (root's 0600),
        # not a hash anyone could match guesses of a short key against
        secret = d.directory / SALT
        assert secret.stat().st_mode & 0o777 == 0o600
        plain = default_name("sk-plain-1f3a", secret.read_bytes().strip())
        assert plain != default_name("sk-plain-1f3a")
        # the runtime API's "unitgen usage" (what status --keys reads)
        keys = {k["name"]: k for k in _usage(d)["keys"]}
        two = keys["two"]
        assert (two["requests"], two["forwarded"], two["refused"], two["in_flight"]) == (4, 3, 1, 0)
        assert (two["prompt_tokens"], two["completion_tokens"]) == (21, 15)
        assert (keys[plain]["forwarded"], keys[plain]["prompt_tokens"]) == (2, 14)
        assert two["bytes_in"] > 0 and two["bytes_out"] > 0
        # one JSON line a request, by name; the keys themselves never
        deadline = time.monotonic() + 5
        while True:
            text = (d.directory / "haproxy.log").read_text()
            lines = [json.loads(line) for line in text.splitlines() if line.startswith('{"gateway"')]
            if len(lines) >= len(sent) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert "sk-" not in text
        seen = sorted((x["key"], x["route"], x["status"], x["replica"], x["prompt_tokens"])
                      for x in lines)
        assert seen == sorted([("two", "m1", 200, "m1", 7)] * 3 + [("two", "m2", 404, "<NOSRV>", None)]
                              + [(plain, "m2", 200, "m2", 7)] * 2), seen
        assert all(x["bytes_in"] > 0 and x["total_ms"] >= 0 for x in lines)
        # the counters for Prometheus, beside HAProxy's own exporter
        status, body, _ = _http(d.metrics_port, "/metrics/keys")
        assert status == 200, body
        assert 'unitgen_gateway_key_forwarded_total{gateway="use",key="two"} 3' in body
        assert 'unitgen_gateway_key_prompt_tokens_total{gateway="use",key="two"} 21' in body
        assert 'unitgen_gateway_key_completion_tokens_total{gateway="use",key="two"} 15' in body
        # the page: behind a gateway key (a browser's password), routes and keys on it
        status, body, headers = _http(d.metrics_port, "/status")
        assert status == 401 and headers["www-authenticate"].startswith("Basic"), headers
        basic = "Basic " + base64.b64encode(b"me:sk-plain-1f3a").decode()
        status, body, _ = _http(d.metrics_port, "/status", Authorization=basic)
        assert status == 200 and ">alias, m1</td>" in body, body[:500]
        assert "<td class=\"key\">two</td>" in body and "sk-" not in body


def test_check_names_the_keys_file_and_its_line(tmp_path):
    keys = _keys(tmp_path, "sk-ok\nsk-bad rpm=ten\n")
    spec = tmp_path / "gw.toml"
    spec.write_text(f'kind = "gateway"\nname = "gw"\nport = 8080\napi_keys_file = "{keys}"\n')
    done = subprocess.run([sys.executable, "-m", "unitgen", "check", "--no-verify", str(spec)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2, done
    assert done.stderr.strip() == (f"error: {spec}: api_keys_file: {keys}: line 2: rpm= is "
                                   "not a whole number from 1 to 1000000000"), done.stderr
    assert "Traceback" not in done.stderr and "sk-bad" not in done.stderr


def test_status_keys_is_a_table_by_key_name():
    lines = usage_lines("gw", [{"name": "alice", "requests": 12, "forwarded": 10, "refused": 2,
                                "in_flight": 1, "bytes_in": 2048, "bytes_out": 90000,
                                "prompt_tokens": 300, "completion_tokens": 40}])
    assert lines[1] == "gateway gw: per key, since its last reload (tokens: whole JSON answers only)"
    assert lines[2].split() == ["KEY", "REQUESTS", "FORWARDED", "REFUSED", "IN", "FLIGHT", "BYTES",
                                "IN", "BYTES", "OUT", "PROMPT", "TOK", "COMPL", "TOK"]
    assert lines[3].split() == ["alice", "12", "10", "2", "1", "2048", "90000", "300", "40"]
    assert "not shown" in usage_lines("gw", None)[1]
