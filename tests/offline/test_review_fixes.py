"""Medium and low findings of the review (issue 14) that need no service
manager; each test failed on the code before its fix."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import GOLDEN_CTX, write_spec
from unitgen.errors import SpecError
from unitgen.inunit.cgroupowner import unit_of_cgroup
from unitgen.inunit.probe import attempt
from unitgen.ops.interface import DeployOptions
from unitgen.ops.systemd.deploy import SystemdDeploy
from unitgen.ops.systemd.sandbox import Sandbox
from unitgen.ops.systemd.specs import render_spec
from unitgen.ops.transaction import run
from unitgen.ops.trust import UnsafeInstallError, untrusted_paths
from unitgen.targets.systemd.installed import scan
from unitgen.targets.systemd.render import RenderContext


def test_model_placeholder_cannot_make_argv0_a_privileged_prefix(tmp_path):
    spec = write_spec(tmp_path, "p", (
        'name = "p"\nbackend = "custom"\nmodel = "+/bin/sh"\nuser = "nobody"\n'
        'command = ["{model}", "-c", "sleep 1; echo {port}"]\n'))
    with pytest.raises(SpecError) as info:
        render_spec(spec, GOLDEN_CTX)
    assert any(p.key == "command[0]" and "'+/bin/sh'" in p.message for p in info.value.problems)


def test_gpu_wait_does_not_import_from_the_working_directory(tmp_path):
    spec = write_spec(tmp_path, "g", (
        'name = "g"\nbackend = "vllm"\nmodel = "m"\n'
        'gpus = ["GPU-00000000-1111-2222-3333-000000000000"]\n'))
    units = {f.name: f.text for f in render_spec(spec, GOLDEN_CTX).files}
    line = next(ln for ln in units["g-backend.service"].splitlines()
                if ln.startswith("ExecStartPre=") and "gpuwait" in ln)
    argv = line.split("=", 1)[1].split()
    assert argv[1:4] == ["-P", "-m", "unitgen.inunit.gpuwait"]
    # run it the way systemd would, from a working directory holding a planted module
    marker = tmp_path / "planted-ran"
    (tmp_path / "pynvml.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    subprocess.run([sys.executable, *argv[1:], "--timeout", "1s"], cwd=tmp_path,
                   capture_output=True, timeout=60, check=False)
    assert not marker.exists(), "a pynvml.py in the working directory was imported"


@pytest.mark.parametrize(("cgroup", "owner"), [
    ("0::/system.slice/qwen2-backend.service\n", ("qwen2", "system")),
    ("0::/system.slice/qwen2.service\n", ("qwen2", "system")),
    ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/qwen2.service\n",
     ("qwen2", "user@1000")),
    # a user's own unit with an instance's name is not the system instance
    ("0::/user.slice/user-1000.slice/app.slice/qwen2.service\n", None),
    ("0::/system.slice/foo.slice/qwen2.service\n", None),
    ("0::/machine.slice/x.scope/system.slice/qwen2.service\n", None),
    # hybrid hosts: systemd's named v1 hierarchy
    ("1:name=systemd:/system.slice/qwen2-backend.service\n0::/\n", ("qwen2", "system")),
])
def test_gpu_processes_are_credited_by_exact_cgroup_path(cgroup, owner):
    assert unit_of_cgroup(cgroup) == owner


def test_a_copy_of_an_instance_unit_is_not_the_instances_file(tmp_path):
    (tmp_path / "qwen2.socket").write_text("# unitgen-instance: qwen2\n[Socket]\n"
                                           "ListenStream=127.0.0.1:8000\n")
    (tmp_path / "qwen2-old.socket").write_text("# unitgen-instance: qwen2\n[Socket]\n")
    (tmp_path / "backup.service").write_text("# unitgen-instance: qwen2\n[Service]\n")
    found = scan(tmp_path)
    assert sorted(found["qwen2"].files) == ["qwen2.socket"]


def test_unicode_line_separators_cannot_fake_a_gpu_claim(tmp_path):
    fake = ('u\u2028# unitgen-record: {"v": 1, "name": "u", '
            '"gpus": ["GPU-00000000-1111-2222-3333-000000000000"]}')
    # a spec value reaches a header line escaped (no raw separator), and even a
    # raw one is no line break to the reader: systemd splits lines on "\n" only
    spec = tmp_path / f"{fake}.toml"
    spec.write_text('name = "u"\nbackend = "vllm"\nmodel = "m"\n')
    out = tmp_path / "out"
    out.mkdir()
    for f in render_spec(spec, GOLDEN_CTX).files:
        (out / f.name).write_text(f.text)
    assert scan(out)["u"].gpus == ()
    for unit in out.iterdir():
        unit.write_text(f"# from {fake}\n" + unit.read_text())
    assert scan(out)["u"].gpus == ()


def test_the_probe_deadline_bounds_a_whole_attempt():
    """A server that trickles one byte a second cannot keep the probe past it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(1000)
            for ch in b"HTTP/1.1 200 OK\r\nX: " + b"y" * 100:
                if stop.is_set():
                    return
                try:
                    conn.sendall(bytes([ch]))
                except OSError:
                    return
                time.sleep(0.5)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    t0 = time.monotonic()
    result = attempt(f"127.0.0.1:{srv.getsockname()[1]}", "/health", None, timeout=2)
    took = time.monotonic() - t0
    stop.set()
    srv.close()
    assert result.outcome == "wait" and "no answer within 2 s" in result.detail
    assert took < 4


def test_system_deploys_refuse_code_others_can_write(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "probe.py").write_text("")
    os.chmod(tmp_path, 0o755)
    assert untrusted_paths(sys.executable, pkg) == [] or all(
        "pkg" not in p for p in untrusted_paths(sys.executable, pkg))
    os.chmod(pkg / "probe.py", 0o666)
    found = untrusted_paths(sys.executable, pkg)
    assert any(str(pkg / "probe.py") in p and "writable" in p for p in found)
    os.chmod(pkg / "probe.py", 0o644)
    os.chown(pkg, 65534, 65534)
    assert any(str(pkg) in p and "uid 65534" in p for p in untrusted_paths(sys.executable, pkg))


def test_an_untrusted_interpreter_refuses_a_system_deploy(tmp_path):
    """deploy says why before contacting any manager, and writes nothing."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    python = shared / "python3"
    python.write_text("")
    spec = write_spec(tmp_path, "t", 'name = "t"\nbackend = "vllm"\nmodel = "m"\n')
    ctx = RenderContext(python=str(python), proxyd=GOLDEN_CTX.proxyd, scope="system")
    with pytest.raises(UnsafeInstallError) as info:
        run(SystemdDeploy("system", ctx), [spec], DeployOptions())
    assert "writable by its group or by everyone" in info.value.message
    assert "docs/production.md" in info.value.message


def test_sandbox_stop_never_kills_a_pid_that_is_no_longer_the_sandboxs(tmp_path):
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        Sandbox(root=tmp_path, manager_pid=stranger.pid, journald_pid=0, owns_root=False).stop(
            timeout=1)
        assert stranger.poll() is None, "stop killed a process that is not the sandbox's"
    finally:
        stranger.kill()
        stranger.wait()


def test_a_trailing_newline_in_an_argument_cannot_start_a_directive(tmp_path):
    """Found by the hostile-input property test: re.match(...$) let "x\\n" through
    as a plain word, so the next word became a line of its own."""
    spec = write_spec(tmp_path, "nl", (
        'name = "nl"\nbackend = "vllm"\nmodel = "m"\n'
        'args = ["x\\n", "ExecStartPre=/bin/touch", "/tmp/pwned"]\n'))
    for f in render_spec(spec, GOLDEN_CTX).files:
        lines = f.text.split("\n")
        assert not any(line.lstrip().startswith("ExecStartPre=/bin/touch") for line in lines)
        exec_start = [line for line in lines if line.startswith("ExecStart=")]
        if f.name == "nl-backend.service":
            assert exec_start == [
                'ExecStart=vllm serve m --uds "%t/unitgen-nl/http.sock" "x\\n" '
                'ExecStartPre=/bin/touch /tmp/pwned --served-model-name nl m']
