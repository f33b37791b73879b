"""A fleet behind one gateway (issue 20), with the shipped playbook
(ansible/examples/gateway.yml), real ansible-playbook and real HAProxy: two
model hosts and one gateway host, each its own private systemd user manager
(local connections), the model hosts on distinct loopback addresses, their
instances vLLM with no gateway key, run by the stand-in as vLLM (404 for a
model it does not serve).

Through the gateway: a model on both hosts is served by both; with one
replica dead every request is still answered; a rolling update of both hosts
while clients stream fails no request; a second run changes nothing;
``--check --diff`` shows a new route and changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.ansible.test_ansible_live import ANSIBLE, BIN, Run, run_playbook
from tests.helpers import STANDIN, free_port, stream_until
from unitgen.ops.systemd.sandbox import Sandbox, sandbox_unavailable_reason

pytestmark = [pytest.mark.ansible, pytest.mark.systemd,
              # a playbook over three hosts: 10-20 s alone, minutes on a loaded machine
              pytest.mark.timeout(600),
              pytest.mark.skipif(shutil.which("haproxy") is None and not
                                 Path("/usr/sbin/haproxy").exists(),
                                 reason="HAProxy is not installed (./setup installs it)")]

PLAYBOOK = ANSIBLE / "examples" / "gateway.yml"
ADDRESS = {"a": "127.0.0.2", "b": "127.0.0.3"}
GATEWAY = "flt-gw"


def model(host: str, name: str, **env: str) -> dict[str, Any]:
    """A vLLM instance on ``host``'s address, with no ``gateway`` key (the
    gateway is on another host), run by the stand-in as vLLM: it answers 404
    to a model it does not serve, as vLLM does, and says which host answered."""
    return {"name": name, "backend": "vllm", "model": "org/flt-model",
            "executable": str(STANDIN), "host": ADDRESS[host], "aliases": [f"{name}-alias"],
            "env": {"STANDIN_LOAD_SECONDS": "0.3", "STANDIN_NAME": host,
                    "STANDIN_STREAM_SECONDS": "0.6", **env},
            "health": {"timeout": "1min"}}


BASE = {"a": [model("a", "flt-m"), model("a", "flt-x")], "b": [model("b", "flt-m")]}


@dataclass
class Fleet:
    boxes: dict[str, Sandbox]  # a, b: model servers; gw: the gateway
    work: Path
    port: int
    runs: int = 0
    asked: int = 0  # conversations started by who()

    def play(self, instances: dict[str, list[dict[str, Any]]], *args: str) -> Run:
        hosts = {h: {"ansible_host": ADDRESS[h], "unitgen_environment": dict(self.boxes[h].env),
                     "unitgen_instances": instances.get(h, [])} for h in ("a", "b")}
        inv = {"all": {
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                     "unitgen_scope": "user", "unitgen_executable": str(BIN / "unitgen"),
                     # a drain that cannot end fails with what is in flight, well
                     # before the playbook's own bound (no request here lasts 10 s)
                     "unitgen_drain_timeout": 120},
            "children": {
                "model_servers": {"hosts": hosts},
                "unitgen_gateways": {"hosts": {"gw": {
                    "unitgen_environment": dict(self.boxes["gw"].env),
                    "unitgen_gateway": {"name": GATEWAY, "host": "127.0.0.1", "port": self.port},
                }}},
            },
        }}
        self.runs += 1
        path = self.work / f"inventory-{self.runs}.yml"
        path.write_text(json.dumps(inv, indent=1))
        return run_playbook(PLAYBOOK, path, self.work, *args, timeout=400)

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none",
                             max_retries=0, timeout=60)

    def who(self, name: str) -> str:
        """Which host answered one request for ``name``: each call a conversation
        of its own (the gateway keeps a conversation to one replica)."""
        self.asked += 1
        r = self.sdk().chat.completions.create(
            model=name, messages=[{"role": "user", "content": f"conversation {self.asked}"}])
        return (r.choices[0].message.content or "").split()[0]

    def gateway_dir(self) -> Path:
        return self.boxes["gw"].root / "home" / ".config" / "unitgen" / "gateways" / GATEWAY

    def servers(self, route: str) -> dict[str, str]:
        """``unitgen status`` on the gateway host: the route's servers and their state,
        once no check is half-way (HAProxy's ``UP 1/2``: a server restarted by the
        run failed one check and is between states; the next, 2 s later, settles it)."""
        deadline = time.monotonic() + 20
        while True:
            done = subprocess.run([str(BIN / "unitgen"), "status", "--user", "--json"],
                                  env={**os.environ, **self.boxes["gw"].env}, capture_output=True,
                                  text=True, timeout=60, check=True)
            gw = next(g for g in json.loads(done.stdout)["gateways"] if g["name"] == GATEWAY)
            found = next(r for r in gw["routes"] if r["route"] == route)
            states = {i["name"]: i["state"] for i in found["instances"]}
            if not any("/" in s for s in states.values()) or time.monotonic() > deadline:
                return states
            time.sleep(0.5)

    def pid(self, host: str, unit: str) -> str:
        return self.boxes[host].systemctl("show", "-p", "MainPID", "--value", unit,
                                          check=True).stdout.strip()


def ok(run: Run, hosts: tuple[str, ...] = ("a", "b", "gw")) -> None:
    assert run.rc == 0, (run.doc.get("tasks", [])[-3:], run.stderr[-2000:])
    for h in hosts:
        assert run.failures(h) == 0, h


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    reason = sandbox_unavailable_reason()
    if reason:
        pytest.skip(f"no private systemd manager: {reason}")
    boxes: dict[str, Sandbox] = {}
    try:
        for host in ("a", "b", "gw"):
            boxes[host] = Sandbox.start(tie_to_parent=True)
        f = Fleet(boxes, tmp_path_factory.mktemp("fleet"), free_port())
        ok(f.play(BASE))
        yield f
    finally:  # stopping a manager stops everything it runs (HAProxy, the stand-ins)
        for box in boxes.values():
            box.stop()


def test_a_model_on_both_hosts_is_served_by_both(fleet):
    names = sorted(m.id for m in fleet.sdk().models.list())
    assert names == ["flt-m", "flt-m-alias", "flt-x", "flt-x-alias"]
    assert {fleet.who("flt-m") for _ in range(10)} == {"a", "b"}
    assert {fleet.who("flt-m-alias") for _ in range(10)} == {"a", "b"}
    assert {fleet.who("flt-x") for _ in range(4)} == {"a"}
    cfg = (fleet.gateway_dir() / "haproxy.cfg").read_text()
    assert "server a_flt-m 127.0.0.2:" in cfg and "server b_flt-m 127.0.0.3:" in cfg
    # unitgen status on the gateway host: each route, its servers and their HAProxy state
    assert fleet.servers("flt-m") == {"a_flt-m": "UP", "b_flt-m": "UP"}


def test_a_second_run_changes_nothing(fleet):
    master = fleet.pid("gw", f"{GATEWAY}.service")
    backends = {h: fleet.pid(h, "flt-m-backend.service") for h in ("a", "b")}
    run = fleet.play(BASE)
    ok(run)
    said = json.dumps(run.task("Deploy the gateway over the model servers", "gw"))[:3000]
    assert {h: run.changed(h) for h in ("a", "b", "gw")} == {"a": 0, "b": 0, "gw": 0}, said
    assert fleet.pid("gw", f"{GATEWAY}.service") == master
    assert {h: fleet.pid(h, "flt-m-backend.service") for h in ("a", "b")} == backends
    # nothing changed, so nothing was drained
    assert not [t for t in run.doc["tasks"] if "Drain this host in every gateway" in t["task"]
                and any(r.get("status") != "skipped" for r in t["hosts"].values())]


def test_with_one_replica_dead_every_request_is_answered(fleet):
    a = fleet.boxes["a"]
    a.systemctl("stop", "flt-m.socket", "flt-m.service", "flt-m-backend.service", check=True)
    try:
        t0 = time.monotonic()
        answered = [fleet.who("flt-m") for _ in range(30)]
        took = time.monotonic() - t0
        print(f"\n30 requests with a's replica dead: all answered by {set(answered)} in {took:.1f} s")
        assert set(answered) == {"b"}
    finally:
        a.systemctl("start", "flt-m.socket", check=True)
    time.sleep(4.5)  # rise 2 x inter 2 s: the check sees it again
    assert {fleet.who("flt-m") for _ in range(10)} == {"a", "b"}


def test_a_rolling_update_while_clients_stream_fails_nothing(fleet):
    backends = {h: fleet.pid(h, "flt-m-backend.service") for h in ("a", "b")}
    stop = threading.Event()
    outcomes: list[str] = []

    threads = [threading.Thread(target=stream_until, args=(fleet.sdk(), "flt-m", stop, outcomes))
               for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        new = {h: [dict(s, env={**s["env"], "MODEL_REVISION": "2"}) for s in specs]
               for h, specs in BASE.items()}
        run = fleet.play(new)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    ok(run)
    failed = [o for o in outcomes if o != "ok"]
    print(f"\n{len(outcomes)} streams through a rolling update of both hosts, {len(failed)} failed")
    assert len(outcomes) >= 10 and not failed, failed[:5]
    assert all(fleet.pid(h, "flt-m-backend.service") != backends[h] for h in ("a", "b"))
    drains = [t for t in run.doc["tasks"] if "Drain this host in every gateway" in t["task"]]
    assert {h for t in drains for h, r in t["hosts"].items() if r.get("status") == "changed"} \
        == {"a", "b"}
    # every server is enabled again: both replicas answer
    assert {fleet.who("flt-m") for _ in range(10)} == {"a", "b"}
    BASE.update(new)


def test_check_diff_shows_a_new_route_and_changes_nothing(fleet):
    files = {p.name: p.read_text() for p in fleet.gateway_dir().iterdir()}
    units = sorted(p.name for p in fleet.boxes["b"].unit_dir.iterdir())
    master = fleet.pid("gw", f"{GATEWAY}.service")
    more = {**BASE, "b": [*BASE["b"], model("b", "flt-n")]}
    run = fleet.play(more, "--check", "--diff")
    ok(run)
    result = run.task("Deploy the gateway over the model servers", "gw")
    assert result["changed"] is True
    assert "flt-n" in json.dumps(result.get("diff", "")), result.get("diff")
    assert {p.name: p.read_text() for p in fleet.gateway_dir().iterdir()} == files
    assert sorted(p.name for p in fleet.boxes["b"].unit_dir.iterdir()) == units
    assert fleet.pid("gw", f"{GATEWAY}.service") == master
    assert "flt-n" not in {m.id for m in fleet.sdk().models.list()}


def test_a_failed_deploy_leaves_the_host_enabled_in_the_gateway(fleet):
    broken = [dict(s, env={**s["env"], "STANDIN_NEVER_READY": "1"}, health={"timeout": "3s"})
              if s["name"] == "flt-x" else s for s in BASE["a"]]
    run = fleet.play({**BASE, "a": broken})
    assert run.rc != 0 and run.failures("a") == 1
    assert "b" not in run.doc["stats"]  # max_fail_percentage: 0 stopped the rollout at a
    drained = run.task("Drain this host in every gateway", "a")
    assert drained["status"] == "changed"
    enabled = run.task("Enable this host in every gateway", "a")  # the block's always:
    assert enabled["status"] in ("ok", "changed"), enabled
    # unitgen put the previous version back; the gateway sends a requests again
    assert fleet.servers("flt-m") == {"a_flt-m": "UP", "b_flt-m": "UP"}
    assert fleet.servers("flt-x") == {"a_flt-x": "UP"}
    assert fleet.who("flt-x") == "a"


def test_a_purge_drains_the_host_first_and_the_route_goes(fleet):
    only = {**BASE, "a": [s for s in BASE["a"] if s["name"] != "flt-x"]}
    run = fleet.play(only, "-e", "unitgen_purge=true")
    ok(run)
    assert run.task("Drain this host in every gateway", "a")["status"] == "changed"
    assert run.task("Drain this host in every gateway", "b")["status"] == "skipped"
    assert run.task("Remove instances that unitgen_instances does not list", "a")["changed"]
    assert "flt-x" not in {m.id for m in fleet.sdk().models.list()}
    assert {fleet.who("flt-m") for _ in range(10)} == {"a", "b"}
    BASE.update(only)
