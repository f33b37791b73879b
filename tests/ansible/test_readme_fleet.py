"""The README's "Many hosts", run as written: its commands (build and install
the collection, build the wheel, ``--check --diff``, then the play) in a copy
of the checkout, with a HOME of their own, and its inventory with the hosts
made local: two model servers and a gateway host, each a private systemd user
manager, the model servers' vLLM run by the stand-in as vLLM (404 for a model
it does not serve). Before, the README said to build the collection only, and
its play failed: "the role 'unitgen.unitgen.unitgen' was not found"."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml  # type: ignore[import-untyped]

from tests.ansible.test_ansible_live import ANSIBLE, BIN, Run
from tests.helpers import STANDIN, free_port
from unitgen.ops.systemd.sandbox import Sandbox, sandbox_unavailable_reason

pytestmark = [pytest.mark.ansible, pytest.mark.systemd,
              pytest.mark.skipif(shutil.which("haproxy") is None and not
                                 Path("/usr/sbin/haproxy").exists(),
                                 reason="HAProxy is not installed (./setup installs it)")]

ROOT = ANSIBLE.parent
ADDRESS = {"gpu1": "127.0.0.2", "gpu2": "127.0.0.3"}


def section() -> str:
    """The README's "Many hosts" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Many hosts\n")
    return text[start:text.index("\n## ", start + 1)]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", section(), re.S)


def commands() -> list[str]:
    """Every command of the section's shell blocks, in order, comments cut."""
    lines = [ln.split("  #")[0].strip() for b in blocks("sh") for ln in b.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def local_inventory(boxes: dict[str, Sandbox], tmp: Path, gw_port: int) -> dict[str, Any]:
    """The README's inventory, its hosts made local: each a private user
    manager at a loopback address, the instances on the host's address."""
    [text] = blocks("yaml")
    inv: dict[str, Any] = yaml.safe_load(text)
    top = inv["all"]
    top.setdefault("vars", {}).update({
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "unitgen_scope": "user", "unitgen_venv": str(tmp / "venv"), "unitgen_os_packages": []})
    servers = top["children"]["model_servers"]
    for host, hv in servers["hosts"].items():
        # a port of each host's own: unitgen refuses a port any process here holds
        hv.update(ansible_host=ADDRESS[host], unitgen_environment=dict(boxes[host].env),
                  unitgen_instances=[
                      {**spec, "host": ADDRESS[host], "port": free_port(),
                       "executable": str(STANDIN),
                       "env": {"STANDIN_NAME": host, "STANDIN_LOAD_SECONDS": "0.3"}}
                      for spec in servers["vars"]["unitgen_instances"]])
    gw = top["children"]["unitgen_gateways"]["hosts"]["gw1"]
    gw.update(ansible_host="127.0.0.1", unitgen_environment=dict(boxes["gw1"].env))
    gw["unitgen_gateway"].update(host="127.0.0.1", port=gw_port)
    return inv


@pytest.fixture
def boxes() -> Iterator[dict[str, Sandbox]]:
    reason = sandbox_unavailable_reason()
    if reason:
        pytest.skip(f"no private systemd manager: {reason}")
    started: dict[str, Sandbox] = {}
    try:
        for host in ("gpu1", "gpu2", "gw1"):
            started[host] = Sandbox.start(tie_to_parent=True)
        yield started
    finally:
        for box in started.values():
            box.stop()


def test_the_commands_are_the_ones_the_test_runs():
    assert commands() == [
        "ansible-galaxy collection build ansible/ --output-path dist/",
        "ansible-galaxy collection install dist/unitgen-unitgen-0.1.0.tar.gz",
        "python -m build --wheel",
        "ansible-playbook -i inventory.yml ansible/examples/gateway.yml --check --diff",
        "ansible-playbook -i inventory.yml ansible/examples/gateway.yml",
    ]


@pytest.mark.timeout(1200)
def test_the_readme_fleet_runs_as_written(tmp_path, boxes):
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", ".hypothesis", ".mypy_cache", ".ruff_cache", "dist",
        "build", ".pytest_cache", "*.egg-info", "*.tar.gz"))
    gw_port = free_port()
    (checkout / "inventory.yml").write_text(
        json.dumps(local_inventory(boxes, tmp_path, gw_port), indent=1))  # JSON is YAML
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update({"HOME": str(home), "PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
                # how the output is written (JSON, to read it here), not what runs
                "ANSIBLE_CALLBACK_PLUGINS": str(ANSIBLE / "tests" / "callback"),
                "ANSIBLE_STDOUT_CALLBACK": "unitgen_json", "ANSIBLE_NOCOLOR": "1"})
    runs: list[Run] = []
    for command in commands():
        # as a user types it: a shell runs the line
        done = subprocess.run(command, shell=True, cwd=checkout, env=env,  # noqa: S602
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0 and "Could not find a version" in done.stderr:
            pytest.skip("the build backend (hatchling) cannot be fetched here")
        if command.startswith("ansible-playbook"):
            last = [ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1:]
            runs.append(Run(done.returncode, json.loads(last[0]) if last else {}, done.stderr))
            failed = [(t["task"], h, r.get("msg") or r.get("stderr"),
                       [i.get("msg") for i in r.get("results", []) if i.get("failed")])
                      for t in runs[-1].doc.get("tasks", []) for h, r in t["hosts"].items()
                      if r.get("status") == "failed"]
            assert done.returncode == 0, (command, failed, done.stderr[-2000:])
            if "--check" in command:  # it said what would change, and changed nothing
                assert runs[-1].changed("gw1") >= 1
                assert not [p for b in boxes.values() for p in b.unit_dir.glob("*.socket")]
        assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])
    assert len(runs) == 2 and all(runs[-1].failures(h) == 0 for h in ("gpu1", "gpu2", "gw1"))
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{gw_port}/v1", api_key="none",
                        max_retries=0, timeout=60)
    assert sorted(m.id for m in sdk.models.list()) == ["qwen", "qwen2"]
    for name in ("qwen2", "qwen"):  # vLLM (the stand-in as strict) serves both names
        who = {(sdk.chat.completions.create(model=name, messages=[]).choices[0].message.content
                or "").split()[0] for _ in range(8)}
        assert who == {"gpu1", "gpu2"}, (name, who)
