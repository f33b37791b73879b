"""The collection (ansible/galaxy.yml): ``ansible-galaxy collection build`` and
``install`` work, its modules run by their full names outside the role (an
ad-hoc call), and its filters build a gateway's upstreams from hostvars."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tarfile
from pathlib import Path
from types import ModuleType

import pytest

from tests.ansible.test_ansible_live import ANSIBLE, BIN

pytestmark = pytest.mark.ansible


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update({"ANSIBLE_HOME": str(home), "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
                "ANSIBLE_COLLECTIONS_PATH": str(home / "collections"), "NO_COLOR": "1"})
    return env


def test_the_collection_builds_installs_and_its_modules_run_ad_hoc(tmp_path):
    if not (BIN / "ansible-galaxy").exists():
        pytest.skip("ansible-core is not installed (pip install -e '.[dev]')")
    env = _env(tmp_path)
    built = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", str(ANSIBLE),
                            "--output-path", str(tmp_path / "dist")], env=env,
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    [tarball] = (tmp_path / "dist").glob("unitgen-unitgen-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"plugins/modules/unitgen_gateway_server.py", "plugins/module_utils/unitgen_cli.py",
            "plugins/filter/unitgen_fleet.py", "roles/unitgen/tasks/main.yml",
            "MANIFEST.json"} <= names
    assert not any(n.startswith("tests/") for n in names)
    installed = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "install",
                                str(tarball), "-p", str(tmp_path / "collections")], env=env,
                               capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0, installed.stderr
    # outside any role: module_utils are found by their full name (they were not before)
    done = subprocess.run(
        [str(BIN / "ansible"), "localhost", "-c", "local", "-m", "unitgen.unitgen.unitgen_status",
         "-a", f"live=false scope=user executable={BIN / 'unitgen'}",
         "-e", f"ansible_python_interpreter={BIN / 'python'}"],
        env={**env, "XDG_CONFIG_HOME": str(tmp_path / "config")}, capture_output=True,
        text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"instances": []' in done.stdout
    gone = subprocess.run(
        [str(BIN / "ansible"), "localhost", "-c", "local", "-m",
         "unitgen.unitgen.unitgen_gateway_server", "-a", "gateway=nowhere node=h1 scope=user",
         "-e", f"ansible_python_interpreter={BIN / 'python'}"],
        env={**env, "XDG_RUNTIME_DIR": str(tmp_path)}, capture_output=True, text=True,
        timeout=120)
    assert gone.returncode == 0 and "is not running here" in gone.stdout, gone.stdout


def _filters() -> ModuleType:
    path = ANSIBLE / "plugins" / "filter" / "unitgen_fleet.py"
    spec = importlib.util.spec_from_file_location("_unitgen_fleet", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_upstreams_come_from_the_status_and_specs_of_the_model_servers():
    f = _filters()
    hostvars = {
        "gpu_1.example": {
            "ansible_host": "10.0.0.11",
            "unitgen_instances": [{"name": "qwen", "aliases": ["q"], "max_concurrent": 4,
                                   "health": {"timeout": "20min"}},
                                  {"name": "emb", "activation": "on-demand"}],
            "unitgen_status": {"instances": [
                {"name": "qwen", "port": 8000, "backend": "vllm"},
                {"name": "emb", "port": 31001, "backend": "llama-server"},
                {"name": "gw", "port": 8080, "backend": "gateway"}]},
        },
        "gpu2": {"ansible_host": "::1", "unitgen_address": "fd00::2",
                 # not listed in its unitgen_instances (deployed otherwise): its
                 # status says how it starts; "old" says nothing, so no check wakes it
                 "unitgen_status": {"instances": [
                     {"name": "qwen", "port": 8000, "activation": "eager"},
                     {"name": "old", "port": 8001}]},
                 # check mode: an instance the deploy would create
                 "unitgen_deployed": {"results": [
                     {"item": "new", "port": 31002, "action": "would-create"},
                     {"item": "qwen", "port": 8000, "action": "unchanged"}]}},
    }
    ups = f.gateway_upstreams(["gpu_1.example", "gpu2"], hostvars)
    assert ups == [
        {"node": "gpu-1.example", "name": "qwen", "address": "10.0.0.11:8000", "aliases": ["q"],
         "on_demand": False, "max_concurrent": 4, "wait": "20min"},
        {"node": "gpu-1.example", "name": "emb", "address": "10.0.0.11:31001", "aliases": [],
         "on_demand": True},
        {"node": "gpu2", "name": "qwen", "address": "[fd00::2]:8000", "aliases": [],
         "on_demand": False},
        {"node": "gpu2", "name": "old", "address": "[fd00::2]:8001", "aliases": [],
         "on_demand": True},
        {"node": "gpu2", "name": "new", "address": "[fd00::2]:31002", "aliases": [],
         "on_demand": True},
    ]
    assert f.gateway_node("gpu_1.example") == "gpu-1.example"
    with pytest.raises(Exception, match=r"listens on 127\.0\.0\.1, which the gateways cannot reach"):
        f.gateway_upstreams(["gpu9"], {"gpu9": {"ansible_host": "10.0.0.9", "unitgen_status": {
            "instances": [{"name": "x", "port": 8000, "address": "127.0.0.1:8000"}]}}})
    with pytest.raises(Exception, match="one node name"):
        f.gateway_upstreams(["gpu_1", "gpu-1"], {**hostvars, "gpu_1": hostvars["gpu2"],
                                                 "gpu-1": hostvars["gpu2"]})
    with pytest.raises(Exception, match="has no unitgen_status"):
        f.gateway_upstreams(["gpu3"], {"gpu3": {}})
    # what the filter writes is what the gateway spec accepts
    from unitgen.features.gateway.spec import parse_gateway  # noqa: PLC0415

    g = parse_gateway({"kind": "gateway", "name": "gw", "port": 8080, "upstreams": ups}, "x")
    assert [u.server for u in g.upstreams] == ["gpu-1.example_qwen", "gpu-1.example_emb",
                                               "gpu2_qwen", "gpu2_old", "gpu2_new"]
    assert json.dumps(ups)  # plain data, as Ansible passes it to the module


def _module(name: str) -> ModuleType:
    path = ANSIBLE / "plugins" / "modules" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{name}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_drain_module_reads_haproxys_tables():
    m = _module("unitgen_gateway_server")
    state = m.table("1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state\n"
                    "3 r1 1 gpu1_qwen 10.0.0.11 2 8\n3 r1 2 gpu10_qwen 10.0.0.20 2 0\n\n")
    assert [r["srv_name"] for r in state] == ["gpu1_qwen", "gpu10_qwen"]
    assert int(state[0]["srv_admin_state"]) & m.FORCED_DRAIN
    stat = m.table("# pxname,svname,qcur,qmax,scur,smax,status,\n"
                   "r1,gpu1_qwen,1,0,2,5,DRAIN,\nr1,BACKEND,0,0,2,5,UP,\n")
    assert m.in_flight({"r1/gpu1_qwen": stat[0]}) == 3
    assert stat[1]["svname"] == "BACKEND"


def test_a_drained_server_is_at_weight_zero_too():
    """Drained means the drain state and weight 0 (rows of HAProxy 2.6's ``show
    servers state``): a route that keeps conversations to a replica reads the
    weight, and a server left at weight 1 would still take them."""
    m = _module("unitgen_gateway_server")
    head = ("1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state "
            "srv_uweight srv_iweight srv_time_since_last_change\n")
    rows = m.table(head + "3 r1 1 gpu1_a 127.0.0.1 2 8 0 1 0\n3 r1 2 gpu1_b 127.0.0.1 2 8 1 1 0\n"
                   "3 r1 3 gpu2_a 127.0.0.1 2 0 1 1 713\n3 r1 4 gpu2_b 127.0.0.1 2 0 0 1 9\n")
    assert [m.is_drained(r) for r in rows] == [True, False, False, False]
    # enabled again: every one of them but the one that is as configured (a drain
    # state with its weight left, or a weight of 0 alone, keeps requests away)
    assert [m.is_enabled(r) for r in rows] == [False, False, True, False]
