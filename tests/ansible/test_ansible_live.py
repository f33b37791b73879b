"""The Ansible role and modules (ansible/roles/unitgen) with real ansible-playbook:
two inventory hosts with ``ansible_connection: local``, each pointed at its own
private systemd user manager through ``unitgen_environment``, at user scope.
Changes and failures are counted from the JSON that a stdout callback prints
(ansible/tests/callback), never from Ansible's text output."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import STANDIN, get
from unitgen.ops.systemd.sandbox import Sandbox, sandbox_unavailable_reason

pytestmark = [pytest.mark.ansible, pytest.mark.systemd]

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE = ROOT / "ansible"
BIN = Path(sys.executable).parent
PLAYBOOK = """\
- name: Converge
  hosts: model_servers
  gather_facts: false
  roles:
    - role: unitgen
"""


def collections_path(home: Path, source: Path = ANSIBLE) -> Path:
    """A collections directory under ``home`` in which ``unitgen.unitgen`` is
    ``source`` (this checkout's ``ansible/``: what ``ansible-galaxy collection
    install`` would unpack), so the modules' full names resolve."""
    root = home / "collections"
    link = root / "ansible_collections" / "unitgen" / "unitgen"
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source, target_is_directory=True)
    return root


def ansible_env(home: Path) -> dict[str, str]:
    """Environment for ansible-playbook: the collection and its role, the JSON
    callback, state kept under ``home`` (never in the user's ~/.ansible)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update({
        "PATH": f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        "ANSIBLE_COLLECTIONS_PATH": str(collections_path(home)),
        "ANSIBLE_ROLES_PATH": str(ANSIBLE / "roles"),
        "ANSIBLE_CALLBACK_PLUGINS": str(ANSIBLE / "tests" / "callback"),
        "ANSIBLE_STDOUT_CALLBACK": "unitgen_json",
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_HOST_KEY_CHECKING": "False",
    })
    return env


@dataclass
class Run:
    """One ansible-playbook run, read from the callback's JSON."""

    rc: int
    doc: dict[str, Any]
    stderr: str
    stdout: str = ""

    def stats(self, host: str) -> dict[str, int]:
        """The play recap of one host (ok, changed, failures, ...)."""
        return dict(self.doc["stats"][host])

    def changed(self, host: str) -> int:
        return self.stats(host)["changed"]

    def failures(self, host: str) -> int:
        return self.stats(host)["failures"]

    def task(self, name: str, host: str) -> dict[str, Any]:
        """The result of the (last) task whose name contains ``name`` on ``host``."""
        found = [t["hosts"][host] for t in self.doc["tasks"] if name in t["task"] and host in t["hosts"]]
        assert found, f"no task {name!r} ran on {host}: {[t['task'] for t in self.doc['tasks']]}"
        return dict(found[-1])

    def items(self, host: str) -> dict[str, dict[str, Any]]:
        """The role's deploy task, one result per instance name (the loop item)."""
        result = self.task("Deploy and remove instances", host)
        return {r["item"]: r for r in result.get("results", [])}

    def status(self, host: str) -> dict[str, dict[str, Any]]:
        """The role's closing unitgen_status result, by instance name."""
        return dict(self.task("Read the state and address", host)["by_name"])


def ansible_playbook(playbook: Path, inventory: Path, home: Path, *args: str,
                     timeout: float = 300,
                     env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One ansible-playbook run, its output as text."""
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory), str(playbook), *args],
        env={**ansible_env(home), **(env or {})}, cwd=home, capture_output=True, text=True,
        timeout=timeout)


def run_playbook(playbook: Path, inventory: Path, home: Path, *args: str,
                 timeout: float = 300, env: dict[str, str] | None = None) -> Run:
    done = ansible_playbook(playbook, inventory, home, *args, timeout=timeout, env=env)
    # with -v, ansible-playbook says which config file it uses before the document
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    try:
        doc = json.loads(lines[-1] if lines else done.stdout)
    except ValueError:
        raise AssertionError(f"ansible-playbook printed no JSON (rc {done.returncode}):\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}") from None
    return Run(done.returncode, doc, done.stderr, done.stdout)


def standin(name: str, **extra: Any) -> dict[str, Any]:
    """A spec mapping (as an inventory holds it) for the stand-in server."""
    spec: dict[str, Any] = {
        "name": name,
        "backend": "custom",
        "command": [sys.executable, str(STANDIN), "--host", "{host}", "--port", "{port}"],
        "env": {"STANDIN_LOAD_SECONDS": "0.3", "STANDIN_LOADING": "503"},
        "health": {"timeout": "1min"},
    }
    spec.update(extra)
    return spec


@dataclass
class Fleet:
    """Two 'hosts', a and b, each a private systemd user manager."""

    boxes: dict[str, Sandbox]
    work: Path
    runs: int = 0
    last: dict[str, Any] = field(default_factory=dict)

    def inventory(self, instances: dict[str, list[dict[str, Any]]],
                  **group_vars: Any) -> Path:
        hosts = {host: {"unitgen_environment": dict(box.env),
                        "unitgen_instances": instances.get(host, [])}
                 for host, box in self.boxes.items()}
        inv = {"all": {
            "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
            "children": {
                "model_servers": {"hosts": hosts, "vars": {
                    "unitgen_scope": "user",
                    "unitgen_executable": str(BIN / "unitgen"),
                    **group_vars,
                }},
                "load_balancers": {"hosts": {"lb": {"upstreams_path": str(self.upstreams)}}},
            },
        }}
        self.runs += 1
        path = self.work / f"inventory-{self.runs}.yml"
        path.write_text(json.dumps(inv, indent=1))  # JSON is YAML
        return path

    def play(self, instances: dict[str, list[dict[str, Any]]], *args: str,
             playbook: Path | None = None, env: dict[str, str] | None = None,
             **group_vars: Any) -> Run:
        return run_playbook(self.playbook(playbook), self.inventory(instances, **group_vars),
                            self.work, *args, env=env)

    def playbook(self, playbook: Path | None = None) -> Path:
        """``playbook``, or the converge play that runs the role."""
        if playbook is None:
            playbook = self.work / "converge.yml"
            playbook.write_text(PLAYBOOK)
        return playbook

    def converge(self, instances: dict[str, list[dict[str, Any]]], **group_vars: Any) -> Run:
        """Bring the fleet to exactly ``instances`` (purging the rest); must not fail."""
        run = self.play(instances, unitgen_purge=True, **group_vars)
        for host in self.boxes:
            assert run.failures(host) == 0, (host, run.doc["tasks"][-3:], run.stderr[-2000:])
        return run

    @property
    def upstreams(self) -> Path:
        """Where the rolling example's load-balancer play writes its config."""
        return self.work / "upstreams.conf"

    def spec_file(self, host: str, name: str) -> Path:
        return self.boxes[host].root / "home" / ".config" / "unitgen" / "specs" / f"{name}.toml"


def unit_state(box: Sandbox, names: list[str]) -> dict[str, tuple[str, str]]:
    """MainPID and ActiveEnterTimestamp of every unit of ``names``: a restart changes them."""
    units = [f"{n}{suffix}" for n in names for suffix in (".socket", ".service", "-backend.service")]
    out = box.systemctl("show", "-p", "Id", "-p", "MainPID", "-p", "ActiveEnterTimestamp",
                        *units, check=True).stdout
    state: dict[str, tuple[str, str]] = {}
    for block in out.strip().split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        state[fields["Id"]] = (fields.get("MainPID", ""), fields.get("ActiveEnterTimestamp", ""))
    for unit, (_, entered) in state.items():
        assert entered, f"{unit} is not running: {state}"
    return state


def unit_files(box: Sandbox) -> dict[str, tuple[str, int]]:
    """Every file in the sandbox's unit directory with its text and mtime."""
    return {p.name: (p.read_text(), p.stat().st_mtime_ns) for p in sorted(box.unit_dir.iterdir())
            if p.is_file()}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    reason = sandbox_unavailable_reason()
    if reason:
        pytest.skip(f"no private systemd manager: {reason}")
    if not (BIN / "ansible-playbook").exists():
        pytest.skip("ansible-core is not installed (pip install -e '.[dev]')")
    boxes: dict[str, Sandbox] = {}
    try:
        for host in ("a", "b"):
            boxes[host] = Sandbox.start(tie_to_parent=True)
        yield Fleet(boxes, tmp_path_factory.mktemp("ansible"))
    finally:
        for box in boxes.values():
            box.stop()


BASE = {"a": [standin("a1"), standin("a2")], "b": [standin("b1")]}


def test_first_run_deploys_and_second_run_changes_nothing(fleet):
    fleet.converge({})  # nothing installed
    first = fleet.play(BASE)
    assert first.rc == 0, first.stderr[-2000:]
    assert first.changed("a") >= 1 and first.changed("b") >= 1
    assert {n: r["action"] for n, r in first.items("a").items()} == {"a1": "created", "a2": "created"}
    assert first.items("b")["b1"]["action"] == "created"
    # unitgen_status returns the ports unitgen chose; each answers there
    for host, names in (("a", ["a1", "a2"]), ("b", ["b1"])):
        status = first.status(host)
        assert sorted(status) == names
        for name in names:
            assert status[name]["state"] == "ready"
            assert status[name]["port"] == first.items(host)[name]["port"]
            code, body = get(status[name]["port"])
            assert code == 200, body
        assert fleet.spec_file(host, names[0]).exists()
    before = {h: unit_state(fleet.boxes[h], [n["name"] for n in BASE[h]]) for h in ("a", "b")}

    second = fleet.play(BASE)
    assert second.rc == 0
    assert second.changed("a") == 0 and second.changed("b") == 0, second.doc["tasks"]
    assert {r["action"] for r in second.items("a").values()} == {"unchanged"}
    after = {h: unit_state(fleet.boxes[h], [n["name"] for n in BASE[h]]) for h in ("a", "b")}
    assert after == before  # nothing restarted


def test_editing_one_instance_changes_only_it(fleet):
    fleet.converge(BASE)
    before = unit_state(fleet.boxes["a"], ["a1", "a2"])
    b_before = unit_state(fleet.boxes["b"], ["b1"])
    edited = standin("a2", env={"STANDIN_LOAD_SECONDS": "0.3", "MODEL_REVISION": "2"})
    run = fleet.play({"a": [standin("a1"), edited], "b": BASE["b"]})
    assert run.rc == 0, run.stderr[-2000:]
    assert run.changed("a") == 1 and run.changed("b") == 0
    items = run.items("a")
    assert items["a1"]["changed"] is False and items["a2"]["changed"] is True
    assert items["a2"]["action"] == "updated"
    after = unit_state(fleet.boxes["a"], ["a1", "a2"])
    assert {u: s for u, s in after.items() if u.startswith("a1")} == \
        {u: s for u, s in before.items() if u.startswith("a1")}
    assert after["a2-backend.service"] != before["a2-backend.service"]  # restarted with the edit
    assert unit_state(fleet.boxes["b"], ["b1"]) == b_before
    env = fleet.boxes["a"].systemctl("show", "-p", "Environment", "a2-backend.service").stdout
    assert "MODEL_REVISION=2" in env
    assert 'MODEL_REVISION = "2"' in fleet.spec_file("a", "a2").read_text()


def test_absent_removes_the_instance(fleet):
    port = fleet.converge(BASE).status("a")["a2"]["port"]
    run = fleet.play({"a": [standin("a1"), {"name": "a2", "state": "absent"}], "b": BASE["b"]})
    assert run.rc == 0, run.stderr[-2000:]
    assert run.changed("a") == 1 and run.changed("b") == 0
    assert run.items("a")["a2"]["action"] == "removed"
    box = fleet.boxes["a"]
    assert not list(box.unit_dir.glob("a2*"))
    assert not fleet.spec_file("a", "a2").exists()
    assert sorted(run.status("a")) == ["a1"]
    with pytest.raises(OSError):
        get(port, timeout=2)
    again = fleet.play({"a": [standin("a1"), {"name": "a2", "state": "absent"}], "b": BASE["b"]})
    assert again.changed("a") == 0 and again.items("a")["a2"]["action"] == "absent"


def test_bad_spec_fails_that_host_with_unitgens_message(fleet):
    fleet.converge(BASE)
    b_before = unit_state(fleet.boxes["b"], ["b1"])
    spec_before = fleet.spec_file("b", "b1").read_text()
    bad = standin("b1", prot=8000)
    run = fleet.play({"a": BASE["a"], "b": [bad]})
    assert run.rc != 0
    assert run.failures("b") == 1 and run.failures("a") == 0
    assert run.changed("a") == 0
    result = run.items("b")["b1"]
    assert result["failed"] is True
    msg = result["msg"]
    assert msg == (f"{fleet.spec_file('b', 'b1')}: prot: unknown key (did you mean 'port'?); "
                   + msg.split("; ", 1)[1])
    assert "Traceback" not in json.dumps(result)
    assert fleet.spec_file("b", "b1").read_text() == spec_before  # the host keeps the good spec
    assert unit_state(fleet.boxes["b"], ["b1"]) == b_before


def test_a_start_that_fails_reports_why_and_keeps_the_previous_version(fleet):
    fleet.converge(BASE)
    spec_before = fleet.spec_file("a", "a2").read_text()
    broken = standin("a2", env={"STANDIN_NEVER_READY": "1"}, health={"timeout": "3s"})
    run = fleet.play({"a": [standin("a1"), broken], "b": BASE["b"]})
    assert run.failures("a") == 1 and run.failures("b") == 0
    result = run.items("a")["a2"]
    assert result["failed"] is True
    assert "a2.service start job ended" in result["msg"]
    assert "the previous version of a2 was restored and is running again" in result["msg"]
    assert "Traceback" not in json.dumps(result)
    assert fleet.spec_file("a", "a2").read_text() == spec_before  # the host's spec matches its units
    again = fleet.play(BASE)  # the previous version is exactly what runs: nothing to do
    assert again.changed("a") == 0
    assert get(again.items("a")["a2"]["port"])[0] == 200


def test_check_diff_shows_the_diff_and_changes_nothing(fleet):
    fleet.converge(BASE)
    files = {h: unit_files(b) for h, b in fleet.boxes.items()}
    specs = {n: fleet.spec_file("a", n).read_text() for n in ("a1", "a2")}
    state = unit_state(fleet.boxes["a"], ["a1", "a2"])
    edited = standin("a2", env={"STANDIN_LOAD_SECONDS": "0.3", "MODEL_REVISION": "3"})
    wanted = {"a": [standin("a1"), edited, standin("a3")], "b": [{"name": "b1", "state": "absent"}]}
    run = fleet.play(wanted, "--check", "--diff")
    assert run.rc == 0, run.stderr[-2000:]
    items = run.items("a")
    assert items["a1"]["changed"] is False
    assert items["a2"]["action"] == "would-update" and items["a3"]["action"] == "would-create"
    unit_diff = next(d["prepared"] for d in items["a2"]["diff"] if "prepared" in d)
    assert "+Environment=" in unit_diff and "MODEL_REVISION=3" in unit_diff
    spec_diff = next(d for d in items["a2"]["diff"] if "before" in d)
    assert 'MODEL_REVISION = "3"' in spec_diff["after"] and "MODEL_REVISION" not in spec_diff["before"]
    assert any("+++ b/a3.socket" in d.get("prepared", "") for d in items["a3"]["diff"])
    b1 = run.items("b")["b1"]
    assert b1["action"] == "would-remove" and b1["changed"] is True
    assert run.changed("a") == 1 and run.changed("b") == 1
    # nothing on disk moved, nothing restarted
    assert {h: unit_files(b) for h, b in fleet.boxes.items()} == files
    assert {n: fleet.spec_file("a", n).read_text() for n in ("a1", "a2")} == specs
    assert not fleet.spec_file("a", "a3").exists()
    assert unit_state(fleet.boxes["a"], ["a1", "a2"]) == state


def test_purge_removes_instances_not_listed(fleet):
    fleet.converge(BASE)
    a1 = unit_state(fleet.boxes["a"], ["a1"])
    run = fleet.play({"a": [standin("a1")], "b": []}, unitgen_purge=True)
    assert run.rc == 0, run.stderr[-2000:]
    assert sorted(run.status("a")) == ["a1"] and run.status("b") == {}
    assert not list(fleet.boxes["a"].unit_dir.glob("a2*"))
    assert not list(fleet.boxes["b"].unit_dir.glob("b1*"))
    assert unit_state(fleet.boxes["a"], ["a1"]) == a1
    again = fleet.play({"a": [standin("a1")], "b": []}, unitgen_purge=True)
    assert again.changed("a") == 0 and again.changed("b") == 0


def test_without_purge_unlisted_instances_stay(fleet):
    fleet.converge(BASE)
    run = fleet.play({"a": [standin("a1")], "b": []})
    assert run.changed("a") == 0 and run.changed("b") == 0
    assert sorted(run.status("a")) == ["a1", "a2"] and sorted(run.status("b")) == ["b1"]


def test_rolling_example_updates_one_host_after_the_other(fleet):
    """ansible/examples/rolling.yml (serial: 1): host b starts its new version
    only after host a's answered."""
    fleet.converge(BASE)
    edited = {h: [standin(s["name"], env={"STANDIN_LOAD_SECONDS": "1", "ROLL": "1"})
                  for s in BASE[h]] for h in BASE}
    run = fleet.play(edited, playbook=ANSIBLE / "examples" / "rolling.yml")
    assert run.rc == 0, (run.doc["tasks"][-3:], run.stderr[-2000:])
    # serial: 1 runs the play once per host
    assert run.doc["plays"].count("Rolling update of the model servers") == 2
    assert run.changed("a") >= 1 and run.changed("b") >= 1
    a_ready = max(_usec(fleet.boxes["a"], f"{n}.service") for n in ("a1", "a2"))
    b_started = _usec(fleet.boxes["b"], "b1-backend.service", "ExecMainStartTimestampMonotonic")
    assert b_started > a_ready
    # the load-balancer play wrote the ports unitgen chose, from unitgen_status
    conf = fleet.upstreams.read_text()
    for host in ("a", "b"):
        for name, row in run.status(host).items():
            assert f"upstream {name} {{" in conf and f"server {host}:{row['port']};" in conf


def _usec(box: Sandbox, unit: str, prop_name: str = "ActiveEnterTimestampMonotonic") -> int:
    return int(box.systemctl("show", "-p", prop_name, "--value", unit).stdout.strip())


def test_role_refuses_the_unrelated_pypi_name(tmp_path):
    if shutil.which("ansible-playbook", path=str(BIN)) is None:
        pytest.skip("ansible-core is not installed")
    inv = tmp_path / "inventory.yml"
    play = tmp_path / "play.yml"
    play.write_text(PLAYBOOK)
    for package, words in (("unitgen==0.1.0", "unrelated"), ("", "Set unitgen_executable")):
        inv.write_text(json.dumps({"model_servers": {"hosts": {"h": {
            "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
            "unitgen_package": package, "unitgen_venv": str(tmp_path / "venv")}}}}))
        run = run_playbook(play, inv, tmp_path)
        assert run.failures("h") == 1
        failed = [t["hosts"]["h"] for t in run.doc["tasks"]
                  if t["hosts"].get("h", {}).get("status") == "failed"]
        assert words in failed[0]["msg"]
        assert not (tmp_path / "venv").exists()  # refused before installing anything


# Stands in for the syslog extension module in the modules Ansible runs (a
# PYTHONPATH entry comes before lib-dynload), since these "hosts" have no
# /dev/log: what AnsibleModule logs about its invocation lands in a file.
SYSLOG_STANDIN = '''\
import os

LOG_USER = 8
LOG_INFO = 6
_ident = ["python"]


def __getattr__(name):
    if name.startswith("LOG_"):
        return 0
    raise AttributeError(name)


def openlog(ident="python", logoption=0, facility=LOG_USER):
    _ident[0] = ident


def syslog(priority, message=None):
    if message is None:
        message = priority
    with open(os.environ["UNITGEN_TEST_SYSLOG"], "a", encoding="utf-8") as fh:
        fh.write("%s: %s\\n" % (_ident[0], message))


def closelog():
    pass
'''


def secret_standin(name: str, tag: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A stand-in spec that carries secrets as a vLLM inventory would: an API key
    (which the server demands, and unitgen's probe sends), a declared HF_TOKEN,
    and a token unitgen is not told about. Returns the spec and its secrets."""
    values = {
        "VLLM_API_KEY": f"sk-{tag}-{secrets.token_hex(12)}",
        "HF_TOKEN": f"hf_{tag}{secrets.token_hex(12)}",
        "HUGGING_FACE_HUB_TOKEN": f"hf_hub{tag}{secrets.token_hex(12)}",
    }
    spec = standin(name, api_key_env="VLLM_API_KEY", secret_env=["HF_TOKEN"],
                   env={"STANDIN_LOAD_SECONDS": "0.3", "STANDIN_KEY_ENV": "VLLM_API_KEY",
                        "HF_HOME": "/var/lib/models/hf", **values})
    return spec, values


def _leaks(texts: dict[str, str], values: dict[str, str]) -> list[str]:
    return [f"{var} in {where}" for where, text in texts.items()
            for var, value in values.items() if value in text]


def test_secrets_never_reach_logs_diffs_or_callback_output(fleet):
    """A spec with an API key and Hugging Face tokens: a first deploy (-v), a
    check run with --diff that would change them, real runs that change them
    (--diff), a check run of its removal, in the JSON callback and in Ansible's
    own text output at -vvv.
    No secret value is in any stdout, stderr, callback document or what the
    module logged about its invocation; the spec diff shows a placeholder that
    still says the secret changed."""
    fleet.converge(BASE)
    work = fleet.work / "secrets"
    (work / "pythonpath").mkdir(parents=True, exist_ok=True)
    (work / "pythonpath" / "syslog.py").write_text(SYSLOG_STANDIN)
    syslog_file = work / "syslog.txt"
    env = {"PYTHONPATH": str(work / "pythonpath"), "UNITGEN_TEST_SYSLOG": str(syslog_file)}
    text_env = {**env, "ANSIBLE_STDOUT_CALLBACK": "default"}
    seen: dict[str, str] = {}
    every: dict[str, str] = {}

    def wanted(spec: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
        return {"a": [standin("a1"), spec], "b": BASE["b"]}

    def json_run(label: str, spec: dict[str, Any], *args: str) -> Run:
        run: Run = fleet.play(wanted(spec), *args, env=env)
        seen[f"{label}: stdout (JSON callback)"] = run.stdout
        seen[f"{label}: stderr"] = run.stderr
        assert run.failures("a") == 0, (run.doc["tasks"][-3:], run.stderr[-2000:])
        return run

    def text_run(label: str, spec: dict[str, Any], *args: str) -> None:
        done = ansible_playbook(fleet.playbook(), fleet.inventory(wanted(spec)), fleet.work,
                                *args, env=text_env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        seen[f"{label}: stdout (default callback)"] = done.stdout
        seen[f"{label}: stderr"] = done.stderr

    first_spec, first = secret_standin("s1", "one")
    every.update({f"{k} (first)": v for k, v in first.items()})
    run = json_run("deploy", first_spec, "-v")
    assert run.items("a")["s1"]["action"] == "created"
    port = run.status("a")["s1"]["port"]
    assert get(port, key=first["VLLM_API_KEY"])[0] == 200  # the key reached the server
    assert get(port)[0] == 401

    second_spec, second = secret_standin("s1", "two")
    every.update({f"{k} (second)": v for k, v in second.items()})
    check = json_run("check", second_spec, "--check", "--diff", "-v")
    result = check.items("a")["s1"]
    assert result["action"] == "would-update"
    text_run("check", second_spec, "--check", "--diff", "-vvv")
    changed = json_run("change", second_spec, "--diff", "-v")
    assert changed.items("a")["s1"]["action"] == "updated"
    assert get(port, key=second["VLLM_API_KEY"])[0] == 200

    third_spec, third = secret_standin("s1", "three")
    every.update({f"{k} (third)": v for k, v in third.items()})
    text_run("change", third_spec, "--diff", "-vvv")
    assert get(port, key=third["VLLM_API_KEY"])[0] == 200
    # removing it (the item keeps its secrets) shows the spec file going, redacted
    gone = json_run("remove", {**third_spec, "state": "absent"}, "--check", "--diff", "-v")
    removal = gone.items("a")["s1"]
    assert removal["action"] == "would-remove"
    assert 'VLLM_API_KEY = "<redacted>"' in next(d for d in removal["diff"] if "before" in d)["before"]

    seen["module syslog"] = syslog_file.read_text()
    log = seen["module syslog"].splitlines()
    # syslog names the module by its full name (it runs from the collection)
    me = "ansible-unitgen.unitgen.unitgen_instance"
    invoked = [ln for ln in log if ln.startswith(f"{me}: Invoked with")]
    assert invoked and all("spec=NOT_LOGGING_PARAMETER" in ln for ln in invoked), log[:5]
    assert f"{me}: Instance s1: state=present spec_file=" \
        f"{fleet.spec_file('a', 's1')}" in log
    assert _leaks(seen, every) == []
    # unitgen puts an undeclared token into the unit file: the module says so
    assert "s1: env.HUGGING_FACE_HUB_TOKEN looks like a secret" in seen["check: stderr"]

    # the check run's spec diff: secrets as a placeholder that shows they change
    spec_diff = next(d for d in result["diff"] if "before" in d)
    for var in ("VLLM_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        before = [ln for ln in spec_diff["before"].splitlines() if ln.startswith(f"{var} =")]
        after = [ln for ln in spec_diff["after"].splitlines() if ln.startswith(f"{var} =")]
        assert before and after and before != after, (var, spec_diff)
        assert "<redacted" in before[0] and "<redacted" in after[0]
    assert 'HF_HOME = "/var/lib/models/hf"' in spec_diff["after"]  # the rest is shown
    # the host keeps the spec (0600); declared secrets are in no unit file
    spec_file = fleet.spec_file("a", "s1")
    assert third["VLLM_API_KEY"] in spec_file.read_text()
    assert spec_file.stat().st_mode & 0o777 == 0o600
    units = {n: text for n, (text, _) in unit_files(fleet.boxes["a"]).items()}
    declared = {k: v for k, v in third.items() if k != "HUGGING_FACE_HUB_TOKEN"}
    assert _leaks(units, declared) == []
