"""The supervisor target against a real supervisord (from PyPI, started here on
a Unix socket in a temp dir) with the stand-in server: deploy, readiness, port
rules, crash recovery, idempotence, rollback, removal, foreign programs,
secrets and byte-exact argv/env."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import STANDIN, custom_spec, free_port, get, standin_exe, wait_for, write_spec
from tests.live.test_quoting_live import HOSTILE, toml_str
from tests.supervisord import Supervisord, supervisord_unavailable_reason
from unitgen.errors import SpecError
from unitgen.ops.interface import DeployOptions as Options
from unitgen.ops.supervisor.deploy import deploy, remove
from unitgen.ops.supervisor.site import Site
from unitgen.ops.supervisor.status import doctor, logs, status

QUIET = Options(say=lambda line: None)
FOREIGN = "[program:foreign]\ncommand=/bin/sleep 3600\nautostart=true\nstartsecs=0\n"


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisord]:
    reason = supervisord_unavailable_reason()
    if reason:
        pytest.skip(f"no supervisord: {reason}")
    root = tmp_path_factory.mktemp("supervisord")
    (root / "conf.d").mkdir()
    (root / "conf.d" / "foreign.conf").write_text(FOREIGN)
    box = Supervisord.start(root)
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture(scope="module")
def target(sd: Supervisord) -> Site:
    return sd.target()


@pytest.fixture(scope="module")
def foreign_pid(sd: Supervisord) -> int:
    assert wait_for(lambda: sd.rpc().call("getProcessInfo", "foreign")["statename"] == "RUNNING", 10)
    return int(sd.rpc().call("getProcessInfo", "foreign")["pid"])


def _pid(sd: Supervisord, program: str) -> int:
    return int(sd.rpc().call("getProcessInfo", program)["pid"])


def _groups(sd: Supervisord) -> set[str]:
    return {p["group"] for p in sd.rpc().processes()}


def test_deploy_ready_and_answering(sd, target, foreign_pid, tmp_path):
    port = free_port()
    spec = write_spec(tmp_path, "ready", custom_spec("ready", port=port,
                                                     env={"STANDIN_LOAD_SECONDS": "1.5"}))
    result = deploy([spec], target, QUIET)
    [inst] = result.data["instances"]
    assert result.exit_code == 0, result.lines
    assert (inst["action"], inst["ready"], inst["public"]) == ("created", True, f"127.0.0.1:{port}")
    assert inst["seconds"] >= 1.5  # waited for the model, not for RUNNING
    assert get(port)[0] == 200
    [row] = status(["ready"], target).data["instances"]
    assert row["state"] == "ready" and row["pid"] == _pid(sd, "ready-backend")
    assert {"ready", "ready-backend"} <= _groups(sd)
    assert _pid(sd, "foreign") == foreign_pid


def test_status_says_starting_while_loading_not_running(sd, target, tmp_path):
    port = free_port()
    spec = write_spec(tmp_path, "slow", custom_spec("slow", port=port,
                                                    env={"STANDIN_NEVER_READY": "1"}))
    deploy([spec], target, Options(wait=False, say=lambda line: None))
    try:
        assert wait_for(lambda: sd.rpc().call("getProcessInfo", "slow-backend")["statename"]
                        == "RUNNING", 15)
        [row] = status(["slow"], target).data["instances"]
        assert row["state"] == "starting", row
        assert row["programs"]["slow-backend"] == "RUNNING"
    finally:
        remove(["slow"], target)


def test_redeploy_unchanged_touches_nothing(sd, target, tmp_path):
    port = int(status(["ready"], target).data["instances"][0]["public"].rpartition(":")[2])
    spec = write_spec(tmp_path, "ready", custom_spec("ready", port=port,
                                                     env={"STANDIN_LOAD_SECONDS": "1.5"}))
    before = (_pid(sd, "ready"), _pid(sd, "ready-backend"))
    result = deploy([spec], target, QUIET)
    assert result.data["changed"] is False
    [inst] = result.data["instances"]
    assert (inst["action"], inst["changed"], inst["ready"]) == ("unchanged", False, True)
    assert (_pid(sd, "ready"), _pid(sd, "ready-backend")) == before


def test_dry_run_diff_changes_nothing(sd, target, tmp_path):
    port = int(status(["ready"], target).data["instances"][0]["public"].rpartition(":")[2])
    conf = target.conf_dir / "unitgen-ready.conf"
    before = (conf.read_text(), _pid(sd, "ready-backend"))
    spec = write_spec(tmp_path, "ready", custom_spec("ready", port=port,
                                                     env={"STANDIN_LOAD_SECONDS": "2"}))
    result = deploy([spec], target, Options(dry_run=True, diff=True, say=lambda line: None))
    [inst] = result.data["instances"]
    assert (inst["action"], inst["changed"]) == ("would-update", True)
    # the values are in the env file (never shown); the conf file lists them
    assert "-#   STANDIN_LOAD_SECONDS='1.5'" in inst["diff"]
    assert "+#   STANDIN_LOAD_SECONDS='2'" in inst["diff"]
    assert "ready.env (secret, content not shown) changed" in inst["diff"]
    assert (conf.read_text(), _pid(sd, "ready-backend")) == before


def test_kill_9_restarts_and_ready_again(sd, target):
    old = _pid(sd, "ready-backend")
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: status(["ready"], target).data["instances"][0]["state"] == "ready"
                    and _pid(sd, "ready-backend") not in (0, old), 30)
    port = int(status(["ready"], target).data["instances"][0]["public"].rpartition(":")[2])
    code, body = get(port)
    assert code == 200 and body["pid"] == _pid(sd, "ready-backend") != old


def test_kill_9_clients_wait_instead_of_refused(sd, target):
    """After a crash the public socket stays open and clients that connect while
    the server reloads wait for it (a connection in the first milliseconds after
    the crash can still be reset: bench/supervisor_sockets.py counts those)."""
    port = int(status(["ready"], target).data["instances"][0]["public"].rpartition(":")[2])
    old = _pid(sd, "ready-backend")
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: sd.rpc().call("getProcessInfo", "ready-backend")["pid"] != old, 10)
    time.sleep(0.3)
    t0 = time.monotonic()
    code, body = get(port, timeout=30)  # sent while the stand-in is still loading (1.5 s)
    assert code == 200 and body["pid"] != old
    assert time.monotonic() - t0 > 0.5  # it waited in the socket instead of getting 503


def test_server_only_change_keeps_the_socket(sd, target, tmp_path):
    """A change of the server's environment replaces only NAME-backend: the
    public socket stays open and clients wait through the restart. The one
    client is sequential, so at most one request can be in flight when the old
    server stops; that one is lost in any design (the server dies under it)."""
    port = int(status(["ready"], target).data["instances"][0]["public"].rpartition(":")[2])
    public_pid = _pid(sd, "ready")
    outcomes: list[int | str] = []

    def client() -> None:
        end = time.monotonic() + 4
        while time.monotonic() < end:
            try:
                outcomes.append(get(port, timeout=30)[0])
            except OSError as exc:
                outcomes.append(type(exc).__name__)
            time.sleep(0.05)

    th = threading.Thread(target=client)
    th.start()
    time.sleep(0.3)
    spec = write_spec(tmp_path, "ready", custom_spec(
        "ready", port=port, env={"STANDIN_LOAD_SECONDS": "1.5", "CHANGED": "1"}))
    result = deploy([spec], target, QUIET)
    th.join()
    assert result.data["instances"][0]["ready"], result.lines
    assert _pid(sd, "ready") == public_pid  # the socket's program was not touched
    lost = [o for o in outcomes if o != 200]
    assert outcomes.count(200) > 10, outcomes
    assert len(lost) <= 1 and set(lost) <= {"RemoteDisconnected", "ConnectionResetError"}, lost


def test_changed_spec_never_ready_rolls_back(sd, target, tmp_path):
    conf = target.conf_dir / "unitgen-ready.conf"
    before_text = conf.read_text()
    port = int(status(["ready"], target).data["instances"][0]["public"].rpartition(":")[2])
    spec = write_spec(tmp_path, "ready", custom_spec(
        "ready", port=port, env={"STANDIN_NEVER_READY": "1"}, extra='[health]\ntimeout = "3s"\n'))
    result = deploy([spec], target, QUIET)
    [inst] = result.data["instances"]
    assert result.exit_code == 1 and inst["action"] == "failed"
    assert "not ready after 3 s" in inst["error"] and "restored" in inst["error"]
    assert "last log lines of ready-backend" in inst["error"]
    assert conf.read_text() == before_text
    assert get(port)[0] == 200
    assert status(["ready"], target).data["instances"][0]["state"] == "ready"


def test_new_spec_that_fails_leaves_nothing(sd, target, tmp_path):
    spec = write_spec(tmp_path, "never", custom_spec("never", port=free_port(),
                                                     env={"STANDIN_NEVER_READY": "1"},
                                                     extra='[health]\ntimeout = "2s"\n'))
    result = deploy([spec], target, QUIET)
    assert result.exit_code == 1
    assert not (target.conf_dir / "unitgen-never.conf").exists()
    assert not {"never", "never-backend"} & _groups(sd)


def _vllm_standin(tmp_path: Path, name: str, extra: str) -> Path:
    """A vllm spec whose executable is the stand-in (it listens on --uds)."""
    exe = standin_exe(tmp_path)
    return write_spec(tmp_path, name, f'name = "{name}"\nbackend = "vllm"\nmodel = "m"\n'
                                      f'executable = "{exe}"\n{extra}')


def test_port_conflict_refused_before_anything(sd, target, tmp_path):
    port = free_port()
    spec = _vllm_standin(tmp_path, "clash", f'port = {port}\nargs = ["--port", "9000"]\n')
    with pytest.raises(SpecError) as err:
        deploy([spec], target, QUIET)
    [problem] = err.value.problems
    assert problem.key == "args" and f"--port 9000 conflicts with port = {port}" in problem.message
    assert not (target.conf_dir / "unitgen-clash.conf").exists()


def test_port_adopted_from_args(sd, target, tmp_path):
    port = free_port()
    spec = _vllm_standin(tmp_path, "adopt", f'args = ["--port={port}", "--dtype", "auto"]\n')
    try:
        result = deploy([spec], target, QUIET)
        [inst] = result.data["instances"]
        assert inst["public"] == f"127.0.0.1:{port}" and inst["ready"], result.lines
        assert any("taken as the public port" in n for n in inst["notices"])
        code, body = get(port)
        assert code == 200
        argv = psutil.Process(body["pid"]).cmdline()
        assert not any(w.startswith("--port") for w in argv)  # the server listens privately
        assert argv[argv.index("--uds") + 1] == f"{target.ctx.run_dir}/unitgen-adopt/http.sock"
    finally:
        if (target.conf_dir / "unitgen-adopt.conf").exists():
            remove(["adopt"], target)


def test_port_held_by_another_instance_refused(sd, target, tmp_path):
    port = int(status(["ready"], target).data["instances"][0]["public"].rpartition(":")[2])
    spec = write_spec(tmp_path, "thief", custom_spec("thief", port=port))
    # the same port rules as the systemd target: refused input, naming the owner
    with pytest.raises(SpecError, match=r"port: \d+ is owned by unitgen instance 'ready'"):
        deploy([spec], target, QUIET)


def test_two_specs_one_port_refused(sd, target, tmp_path):
    port = free_port()
    a = write_spec(tmp_path, "one", custom_spec("one", port=port))
    b = write_spec(tmp_path, "two", custom_spec("two", port=port))
    with pytest.raises(SpecError) as err:
        deploy([a, b], target, QUIET)
    assert any(p.key == "port" and "two sockets cannot own one port" in p.message
               and "'one'" in p.message for p in err.value.problems)
    assert not list(target.conf_dir.glob("unitgen-one.conf")) + list(
        target.conf_dir.glob("unitgen-two.conf"))


def test_foreign_program_name_refused(sd, target, tmp_path):
    spec = write_spec(tmp_path, "foreign", custom_spec("foreign", port=free_port()))
    with pytest.raises(Exception, match="did not write"):
        deploy([spec], target, QUIET)
    assert (target.conf_dir / "foreign.conf").read_text() == FOREIGN


def test_socket_activated_server_gets_fd3(sd, target, tmp_path):
    port = free_port()
    record = tmp_path / "record.json"
    text = (f'name = "sa"\nbackend = "custom"\nport = {port}\nsocket_activation = true\n'
            f'command = ["{sys.executable}", "{STANDIN}"]\n'
            f'env = {{ STANDIN_RECORD = "{record}" }}\n')
    spec = write_spec(tmp_path, "sa", text)
    try:
        result = deploy([spec], target, QUIET)
        assert result.data["instances"][0]["ready"], result.lines
        rec = json.loads(record.read_text())
        assert rec["env"]["LISTEN_FDS"] == "1" and rec["env"]["LISTEN_PID"] == str(rec["pid"])
        assert rec["pid"] == _pid(sd, "sa-backend")
        assert get(port)[1]["pid"] == rec["pid"]
        # the held socket outlives a crash: a client during the restart waits
        os.kill(rec["pid"], signal.SIGKILL)
        code, body = get(port, timeout=30)
        assert code == 200 and body["pid"] not in (0, rec["pid"])
    finally:
        remove(["sa"], target)


def test_secret_stays_out_of_conf_and_argv(sd, target, tmp_path):
    port = free_port()
    key = "sk-live-secret-42"
    record = tmp_path / "record.json"
    text = custom_spec("keyed", port=port, env={"STANDIN_KEY_ENV": "MY_KEY", "MY_KEY": key,
                                                 "STANDIN_RECORD": str(record)},
                       extra='api_key_env = "MY_KEY"\n')
    spec = write_spec(tmp_path, "keyed", text)
    try:
        result = deploy([spec], target, QUIET)
        assert result.data["instances"][0]["ready"], result.lines
        conf = (target.conf_dir / "unitgen-keyed.conf").read_text()
        assert key not in conf
        secret = target.secrets_dir / "keyed.env"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        rec = json.loads(record.read_text())
        assert rec["env"]["MY_KEY"] == key and key not in " ".join(rec["argv"])
        assert get(port)[0] == 401 and get(port, key=key)[0] == 200
        assert status(["keyed"], target).data["instances"][0]["state"] == "ready"
    finally:
        remove(["keyed"], target)
    assert not secret.exists()


def test_env_values_supervisord_cannot_carry_arrive_byte_exact(sd, target, tmp_path):
    """Before: refused at render ("';' or '#' after a space would start a
    comment", "%(here)s", quotes at both ends): a password starting with '#'
    could not be deployed. Now every value goes through the root-owned env file."""
    port = free_port()
    record = tmp_path / "record.json"
    values = {"A": "#hash", "B": "a ;b", "C": "%(here)s", "D": 'p"q', "E": '"quoted"',
              "F": "x = y ;z #w", "G": "two\nlines\r\n", "H": "back\\slash\\n", "I": " ünï 漢字 ",
              "J": "%(ENV_HOME)s 100%", "K": ""}
    env = ", ".join(f"{k} = {toml_str(v)}" for k, v in values.items())
    text = (f'name = "exact"\nbackend = "custom"\nport = {port}\n'
            f'command = ["{sys.executable}", "{STANDIN}", "--host", "{{host}}", "--port", "{{port}}"]\n'
            f'env = {{ STANDIN_RECORD = "{record}", {env} }}\n')
    spec = write_spec(tmp_path, "exact", text)
    try:
        result = deploy([spec], target, QUIET)
        assert result.data["instances"][0]["ready"], result.lines
        recorded = json.loads(record.read_text(encoding="utf-8"))["env"]
        assert {k: recorded.get(k) for k in values} == values
        conf = (target.conf_dir / "unitgen-exact.conf").read_text(encoding="utf-8")
        assert "\nenvironment=" not in conf
        env_file = target.secrets_dir / "exact.env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600 and env_file.stat().st_uid == os.geteuid()
    finally:
        remove(["exact"], target)
    assert not env_file.exists()


def test_status_when_the_public_program_is_stopped(sd, target):
    sd.rpc().call("stopProcess", "ready", True)
    try:
        [row] = status(["ready"], target).data["instances"]
        assert row["state"] == "stopped" and "port is closed" in row["detail"], row
    finally:
        sd.rpc().call("startProcess", "ready", True)
    assert wait_for(lambda: status(["ready"], target).data["instances"][0]["state"] == "ready", 30)


def test_doctor_finds_a_server_listening_elsewhere(sd, target, tmp_path):
    """The GPUStack #2154 shape: the server also listens on a port of its own."""
    extra = free_port()
    spec = write_spec(tmp_path, "stray", custom_spec("stray", port=free_port(),
                                                     env={"STANDIN_EXTRA_PORT": str(extra)}))
    try:
        deploy([spec], target, QUIET)
        result = doctor("stray", target)
        assert result.exit_code == 1
        assert any(line.startswith("problem: the server also listens on " + str(extra))
                   for line in result.lines), result.lines
    finally:
        remove(["stray"], target)


def test_logs_and_doctor(sd, target):
    seen: list[str] = []
    assert logs("ready", target, lines=500, write=seen.append) == 0
    assert "standin: listening" in "".join(seen)
    result = doctor("ready", target)
    assert result.exit_code == 0, result.lines
    assert any("supervisord's socket" in line for line in result.lines)


@pytest.fixture(scope="module")
def stage(target: Site, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("hostile")
    yield directory
    if (target.conf_dir / "unitgen-hostile.conf").exists():
        remove(["hostile"], target)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(model=HOSTILE, args=st.lists(HOSTILE, max_size=4), env=st.lists(HOSTILE, max_size=3))
def test_hostile_values_reach_the_server_byte_exact(sd, target, stage, model, args, env):
    record = stage / "record.json"
    record.unlink(missing_ok=True)
    port = free_port()
    env_toml = ", ".join(f"V{i} = {toml_str(v)}" for i, v in enumerate(env))
    text = (
        f'name = "hostile"\nbackend = "custom"\nport = {port}\nmodel = {toml_str(model)}\n'
        f'command = ["{sys.executable}", "{STANDIN}", "--host", "{{host}}", "--port", "{{port}}", '
        f'"--model", "{{model}}"]\n'
        f"args = [{', '.join(toml_str(a) for a in args)}]\n"
        f'env = {{ STANDIN_RECORD = "{record}"{", " if env_toml else ""}{env_toml} }}\n'
        '[health]\ntimeout = "20s"\n'
    )
    spec = write_spec(stage, "hostile", text)
    try:
        result = deploy([spec], target, QUIET)
    except SpecError as exc:
        refused = exc.problems
    else:
        refused = []
    if refused:
        # refusing is allowed, naming the file and the key; never an env value
        # (the env file carries any of them)
        assert all(p.file.endswith("hostile.toml") and p.key for p in refused)
        assert not [p for p in refused if p.key.startswith("env")], refused
        return
    assert result.exit_code == 0, result.lines
    recorded = json.loads(record.read_text(encoding="utf-8"))
    assert recorded["argv"][4:6] == ["--model", model]
    assert recorded["argv"][6:] == args
    for i, value in enumerate(env):
        assert recorded["env"][f"V{i}"] == value


def test_remove_only_ours(sd, target, foreign_pid):
    assert (target.conf_dir / "unitgen-ready.conf").exists()
    result = remove(["ready"], target)
    assert result.exit_code == 0
    assert not (target.conf_dir / "unitgen-ready.conf").exists()
    assert not {"ready", "ready-backend"} & _groups(sd)
    assert (target.conf_dir / "foreign.conf").read_text() == FOREIGN
    assert _pid(sd, "foreign") == foreign_pid
    left = sorted(p.name for p in target.conf_dir.glob("*.conf"))
    assert "foreign.conf" in left and all(n == "foreign.conf" or n.startswith("unitgen-")
                                          for n in left)
