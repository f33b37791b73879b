"""The second security review (issue 17), supervisor target: a real supervisord
(run as root, as on the hosts it is for) with a server run as ``user =
"nobody"``, and an attacker that is another local user (uid 1000, a real
process with only its own rights). Each test failed on the code before the fix
(see the comments)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import STANDIN, RecordingUnixListener, free_port, get, raw_get, wait_for, write_spec
from tests.live.test_attacks_live import SQUATTER, received
from tests.supervisord import Supervisord, supervisord_unavailable_reason
from unitgen.ops.interface import DeployOptions as Options
from unitgen.ops.supervisor.deploy import deploy, remove
from unitgen.ops.supervisor.site import Site
from unitgen.plan.record import parse_record
from unitgen.targets.supervisor.installed import scan

QUIET = Options(say=lambda line: None)
ATTACKER_UID = 1000
KEY = "sk-sup-attack-91c2"
# the server runs as nobody: an interpreter nobody may execute (the venv's is
# under /root here), the stand-in needs nothing but the standard library
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root (supervisord drops to user = nobody) and /usr/bin/python3")


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisord]:
    reason = supervisord_unavailable_reason()
    if reason:
        pytest.skip(f"no supervisord: {reason}")
    root = tmp_path_factory.mktemp("sup-attack")
    os.chmod(root, 0o755)  # nobody's server runs from here
    box = Supervisord.start(root)
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture
def target(sd: Supervisord) -> Iterator[Site]:
    t = sd.target()
    yield t
    names = sorted(scan(t.conf_dir))
    if names:
        remove(names, t)


_PORTS: dict[str, int] = {}


def nobody_spec(directory: Path, name: str, *, key: str = KEY, user: bool = True,
                private_port: int | None = None, **env: str) -> Path:
    env_toml = "".join(f', {k} = "{v}"' for k, v in env.items())
    port = _PORTS.setdefault(name, free_port())  # one public port per instance name
    return write_spec(directory, name, (
        f'name = "{name}"\nbackend = "custom"\nport = {port}\n'
        f'command = ["{SYSTEM_PYTHON}", "{STANDIN}", "--host", "{{host}}", "--port", "{{port}}"]\n'
        + ('user = "nobody"\n' if user else "")
        + (f"private_port = {private_port}\n" if private_port else "")
        + f'api_key_env = "SECRET_KEY"\n'
        f'env = {{ SECRET_KEY = "{key}", STANDIN_KEY_ENV = "SECRET_KEY"{env_toml} }}\n'
        '[health]\ntimeout = "30s"\n'))


def attacker(port: int, seconds: float, *, burst: bool = False) -> subprocess.Popen[str]:
    code = SQUATTER.replace("os.setgid(65534); os.setuid(65534)",
                            f"os.setgid({ATTACKER_UID}); os.setuid({ATTACKER_UID})")
    proc = subprocess.Popen([sys.executable, "-I", "-c", code, str(port), str(seconds),
                             "burst" if burst else "hold"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    return proc


def conf_text(target: Site, name: str) -> str:
    return (target.conf_dir / f"unitgen-{name}.conf").read_text()


def private_port(target: Site, name: str) -> int:
    record = parse_record(conf_text(target, name))
    assert record is not None and record.private_port is not None
    return record.private_port


def server_pid(sd: Supervisord, name: str) -> int:
    return int(sd.rpc().call("getProcessInfo", f"{name}-backend")["pid"])


def test_a_local_user_cannot_take_a_crashed_servers_private_port(sd, target, tmp_path):
    # Before: user = ... gave a private port from 20000-29999; a squatter bound it
    # while the server was down and got the key, then the clients' traffic.
    spec = nobody_spec(tmp_path, "crash1", STANDIN_EXIT_AFTER="3")
    result = deploy([spec], target, QUIET)
    assert result.exit_code == 0, result.lines
    port = private_port(target, "crash1")
    assert port < 1024, f"private port {port} is not privileged"
    # render and deploy agree on it
    done = subprocess.run([sys.executable, "-m", "unitgen", "render", "--target", "supervisor",
                           str(spec)], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "UNITGEN_SUPERVISOR_RUN_DIR": target.ctx.run_dir,
                               "UNITGEN_SUPERVISOR_LOG_DIR": target.ctx.log_dir,
                               "UNITGEN_SUPERVISOR_SECRETS_DIR": target.ctx.secrets_dir})
    rendered = parse_record(done.stdout.split("\n", 1)[1])
    assert rendered is not None and rendered.private_port == port, done.stdout + done.stderr
    # the server really runs as nobody, with the one capability it needs
    status = Path(f"/proc/{server_pid(sd, 'crash1')}/status").read_text()
    assert "\nUid:\t65534\t65534\t65534\t65534" in status
    assert int(status.split("CapAmb:")[1].split()[0], 16) == 1 << 10
    squat = attacker(port, 8)
    out = squat.communicate(timeout=30)[0]
    assert "BOUND" not in out, out  # EACCES all along, through the crash and the restart
    assert KEY not in out


def test_the_proxy_sends_no_key_to_another_users_listener(sd, target, tmp_path):
    # an explicit unprivileged private port: the privilege guard is gone, and the
    # wrapper's probe must see who listens before it sends the key
    port = free_port()
    while port < 1024:
        port = free_port()
    squat = attacker(port, 8)
    try:
        assert squat.stdout is not None and squat.stdout.readline().strip() == "BOUND"
        spec = nobody_spec(tmp_path, "squat2", private_port=port)
        deploy([spec], target, Options(wait=False, say=lambda line: None))
        out = squat.communicate(timeout=30)[0]
    finally:
        if squat.poll() is None:
            squat.kill()
            squat.communicate(timeout=10)
    assert KEY not in out and not received(out), f"the squatter received: {received(out)[:3]}"


def test_secrets_and_run_directory_stay_roots_when_the_user_changes(sd, target, tmp_path):
    # Before: the secret file was handed to the user (0.x); when user = went away
    # it stayed theirs, and a PYTHONPATH= they appended ran as root next start.
    # And with the default 0700 secrets directory, user + key failed outright.
    spec = nobody_spec(tmp_path, "own1")
    result = deploy([spec], target, QUIET)
    assert result.exit_code == 0, result.lines
    secret = Path(target.ctx.secrets_dir) / "own1.env"
    st = secret.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert stat.S_IMODE(Path(target.ctx.secrets_dir).stat().st_mode) == 0o700
    port = int(result.data["instances"][0]["public"].rsplit(":", 1)[1])
    assert get(port, key=KEY)[0] == 200
    # a secret file someone else got hold of (as 0.x left it) is taken back
    os.chown(secret, 65534, 65534)
    result = deploy([nobody_spec(tmp_path, "own1", user=False)], target, QUIET)
    assert result.exit_code == 0, result.lines
    st = secret.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert Path(f"/proc/{server_pid(sd, 'own1')}/status").read_text().count("Uid:\t0\t") == 1


def test_a_rotated_key_restarts_the_server(sd, target, tmp_path):
    # Before: only the secret file changed, supervisord saw nothing to restart,
    # the probe got 401 with the new key and deploy rolled back to the old one.
    result = deploy([nobody_spec(tmp_path, "rot1", key="sk-old-1")], target, QUIET)
    assert result.exit_code == 0, result.lines
    port = int(result.data["instances"][0]["public"].rsplit(":", 1)[1])
    before = server_pid(sd, "rot1")
    result = deploy([nobody_spec(tmp_path, "rot1", key="sk-new-2")], target, QUIET)
    assert result.exit_code == 0, result.lines
    assert result.data["instances"][0]["action"] == "updated"
    assert server_pid(sd, "rot1") != before
    assert wait_for(lambda: get(port, key="sk-new-2")[0] == 200, 20)
    assert get(port, key="sk-old-1")[0] == 401


def test_server_logs_are_roots_alone(sd, target, tmp_path):
    # Before: 0644 files in a 0755 directory; vLLM's request log holds prompts
    result = deploy([nobody_spec(tmp_path, "log1")], target, QUIET)
    assert result.exit_code == 0, result.lines
    logs = Path(target.ctx.log_dir)
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700 and logs.stat().st_uid == 0
    reader = subprocess.run(
        [sys.executable, "-I", "-c",
         f"import os; os.setgid({ATTACKER_UID}); os.setuid({ATTACKER_UID}); "
         f"print(open({str(logs / 'log1.log')!r}).read())"],
        capture_output=True, text=True, timeout=30, check=False)
    assert reader.returncode != 0 and "Permission denied" in reader.stderr, reader.stdout


# Issue 25, High 1: the server's socket directory is its own; a link it puts in
# place of its socket must not lead the proxy (root under supervisord) anywhere
# the server itself could not go.
RELINK_SERVER = f"""#!{SYSTEM_PYTHON}
import os, subprocess, sys, time
args = sys.argv[1:]
path = args[args.index("--uds") + 1]
child = subprocess.Popen(["{SYSTEM_PYTHON}", "{STANDIN}", *args])
while not os.path.exists(path):
    time.sleep(0.05)
time.sleep(3)
os.symlink(os.environ["RELINK_TO"], path + ".new")
os.rename(path + ".new", path)
print("RELINKED uid", os.getuid(), flush=True)
sys.exit(child.wait())
"""


def _proxy_log(target: Site, name: str) -> str:
    path = Path(target.ctx.log_dir) / f"{name}-proxy.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else "(no proxy log)"


def test_a_server_cannot_point_the_proxy_at_a_root_only_socket(sd, tmp_path):
    # Before: the proxy (systemd-socket-proxyd under the wrapper) ran as root and
    # connected to the link's target for every client of the public port.
    listener = RecordingUnixListener.root_only(tmp_path / "root-only")
    # nobody runs the script and makes its socket under the run directory here
    base = Path(tempfile.mkdtemp(prefix="unitgen-relink-"))
    base.chmod(0o755)
    script = base / "relink-server"
    script.write_text(RELINK_SERVER)
    script.chmod(0o755)
    target = sd.target(base)
    try:
        _relink_attack(sd, target, tmp_path, script, listener)
    finally:
        names = sorted(scan(target.conf_dir))
        if names:
            remove(names, target)
        shutil.rmtree(base)


def _relink_attack(sd: Supervisord, target: Site, tmp_path: Path, script: Path,
                   listener: RecordingUnixListener) -> None:
    port = free_port()
    spec = write_spec(tmp_path, "link1", (
        f'name = "link1"\nbackend = "vllm"\nmodel = "org/model"\nport = {port}\n'
        f'executable = "{script}"\nuser = "nobody"\n'
        f'env = {{ RELINK_TO = "{listener.path}" }}\n[health]\ntimeout = "30s"\n'))
    result = deploy([spec], target, QUIET)
    if result.exit_code:
        print("\n".join(result.lines), _proxy_log(target, "link1"))
    assert result.exit_code == 0
    assert get(port, "/v1/models")[0] == 200
    sock = Path(target.ctx.run_dir) / "unitgen-link1" / "http.sock"
    assert wait_for(sock.is_symlink, 20)
    got = raw_get(port)
    assert b"ROOT-ONLY" not in got, got
    assert listener.received == [], listener.received
    # the proxy and the server are one user
    proxy = int(sd.rpc().call("getProcessInfo", "link1")["pid"])
    assert "\nUid:\t65534\t65534\t65534\t65534" in Path(f"/proc/{proxy}/status").read_text()
