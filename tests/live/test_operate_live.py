"""deploy / status / remove / doctor against a real systemd user manager over real
D-Bus (issue 3). The CLI runs as a user would run it."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import STANDIN, custom_spec, free_port, get, prop, wait_for, write_spec
from unitgen.ops.systemd.sandbox import Sandbox

pytestmark = pytest.mark.systemd


def cli(box: Sandbox, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "unitgen", *args],
                          env={**os.environ, **box.env}, capture_output=True, text=True,
                          timeout=timeout)
    if "cannot reach the user manager" in done.stderr:
        # say why the sandbox's bus is gone, instead of only that it is
        state = box.systemctl("status", "--no-pager", "dbus.socket", "dbus.service").stdout
        raise AssertionError(f"{done.stderr}\n{state}\n{box.journal(lines=30)}")
    return done


def cli_json(box: Sandbox, *args: str) -> tuple[int, Any]:
    done = cli(box, *args, "--json")
    try:
        return done.returncode, json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"not JSON: {done.stdout!r} {done.stderr}") from None


def demo_spec(directory: Path, name: str, port: int | None = None, extra: str = "",
              **env: str) -> Path:
    text = custom_spec(name, port=port, env=env, extra=extra + '[health]\ntimeout = "20s"\n')
    return write_spec(directory, name, text)


@pytest.fixture
def box(sandbox: Sandbox) -> Iterator[Sandbox]:
    """The shared sandbox, emptied of instances after each test."""
    yield sandbox
    names = [p.stem for p in sandbox.unit_dir.glob("*.socket")]
    installed = [n for n in names if "unitgen-instance" in (sandbox.unit_dir / f"{n}.socket").read_text()]
    if installed:
        cli(sandbox, "remove", "--user", *installed)
    for path in sandbox.unit_dir.glob("*"):
        if path.is_file():
            path.unlink()
    sandbox.systemctl("daemon-reload")


def backend_pid(box: Sandbox, name: str) -> int:
    return int(prop(box, f"{name}-backend.service", "MainPID"))


def test_deploy_ready_then_idempotent_then_only_changed_restarts(box, tmp_path):
    a, b = demo_spec(tmp_path, "alpha"), demo_spec(tmp_path, "beta")
    rc, data = cli_json(box, "deploy", "--user", str(a), str(b))
    assert rc == 0, data
    assert data["changed"] is True
    assert [i["action"] for i in data["instances"]] == ["created", "created"]
    ports = {i["name"]: int(i["public"].rsplit(":", 1)[1]) for i in data["instances"]}
    assert get(ports["alpha"])[0] == 200 and get(ports["beta"])[0] == 200
    assert prop(box, "alpha.service", "UnitFileState") == "enabled"
    assert prop(box, "alpha.socket", "UnitFileState") == "enabled"
    pids = {n: backend_pid(box, n) for n in ("alpha", "beta")}

    rc, data = cli_json(box, "deploy", "--user", str(a), str(b))
    assert rc == 0 and data["changed"] is False
    assert [i["action"] for i in data["instances"]] == ["unchanged", "unchanged"]
    assert {n: backend_pid(box, n) for n in ("alpha", "beta")} == pids

    demo_spec(tmp_path, "beta", STANDIN_LOAD_SECONDS="0.5")
    rc, data = cli_json(box, "deploy", "--user", str(a), str(b))
    assert rc == 0 and data["changed"] is True
    assert [i["action"] for i in data["instances"]] == ["unchanged", "updated"]
    assert backend_pid(box, "alpha") == pids["alpha"]
    assert backend_pid(box, "beta") != pids["beta"]
    # an allocated port is kept across updates: the units are the database
    assert int(data["instances"][1]["public"].rsplit(":", 1)[1]) == ports["beta"]


def test_dry_run_and_diff_change_nothing(box, tmp_path):
    spec = demo_spec(tmp_path, "dry")
    done = cli(box, "deploy", "--user", "--dry-run", "--diff", str(spec))
    assert done.returncode == 0, done.stderr
    assert "+++ b/dry.socket" in done.stdout and "dry: would-create" in done.stdout
    assert list(box.unit_dir.glob("dry*")) == []
    assert prop(box, "dry.socket", "LoadState") == "not-found"


def _free_run(length: int) -> tuple[int, int]:
    """``length`` consecutive loopback ports that nothing holds now, away from
    the default ranges (31000-31999 public, the private range) and from each
    other test's ``free_port()`` picks only by chance."""
    for _ in range(200):
        lo = random.randrange(42000, 44000 - length)
        if all(_bindable(p) for p in range(lo, lo + length)):
            return lo, lo + length - 1
    raise AssertionError(f"no {length} consecutive free ports in 42000-44000")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_concurrent_deploys_get_distinct_ports(box, tmp_path):
    # Three deploys at once, sharing one range of four ports: every process starts
    # from the same preferred port (the range's first, as the hashed default lies
    # outside it), so only the deploy lock (scan, pick and write as one step)
    # keeps them apart. Without it they all take the first port and two sockets
    # fail to bind.
    lo, hi = _free_run(4)
    names = [f"conc{i}" for i in range(3)]
    specs = [demo_spec(tmp_path, n) for n in names]
    procs = [subprocess.Popen([sys.executable, "-m", "unitgen", "deploy", "--user", "--json",
                               "--port-range", f"{lo}-{hi}", str(s)],
                              env={**os.environ, **box.env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in specs]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    ports = {}
    for name, (out, _) in zip(names, outs, strict=True):
        inst = json.loads(out)["instances"][0]
        assert (inst["name"], inst["action"], inst["ready"]) == (name, "created", True)
        ports[name] = int(inst["public"].rsplit(":", 1)[1])
    assert len(set(ports.values())) == 3, ports
    assert all(lo <= port <= hi for port in ports.values()), (ports, lo, hi)
    for name, port in ports.items():
        # each socket holds its own port, and behind it answers its own server
        assert prop(box, f"{name}.socket", "Listen") == f"127.0.0.1:{port} (Stream)"
        assert prop(box, f"{name}.socket", "ActiveState") == "active"
        status, body = get(port)
        assert status == 200 and body["pid"] == backend_pid(box, name), (name, body)


def test_busy_explicit_port_names_the_holder(box, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = cli(box, "deploy", "--user", str(demo_spec(tmp_path, "busy", port)))
    assert done.returncode != 0
    assert f"busy.toml: port: {port} is in use by pid {os.getpid()}" in done.stderr
    assert done.returncode == 2  # refused input, nothing changed
    assert "Traceback" not in done.stderr
    assert list(box.unit_dir.glob("busy*")) == []


def test_collision_with_foreign_units_is_refused(box, tmp_path):
    foreign = box.unit_dir / "ssh.service"
    foreign.write_text("[Service]\nExecStart=/bin/sleep 1000\n")
    done = cli(box, "deploy", "--user", str(demo_spec(tmp_path, "ssh")))
    assert done.returncode == 2
    assert "was not generated by unitgen" in done.stderr
    assert foreign.read_text() == "[Service]\nExecStart=/bin/sleep 1000\n"
    assert not (box.unit_dir / "ssh.socket").exists()
    # a unit that exists elsewhere (the distribution's dbus.service) is refused too
    done = cli(box, "deploy", "--user", str(demo_spec(tmp_path, "dbus")))
    assert done.returncode == 2 and "unit dbus.socket already exists" in done.stderr
    assert not (box.unit_dir / "dbus.service").exists()


def test_remove_deletes_only_our_files(box, tmp_path):
    other = box.unit_dir / "keep.service"
    other.write_text("[Service]\nExecStart=/bin/true\n")
    spec = demo_spec(tmp_path, "gone")
    assert cli(box, "deploy", "--user", str(spec)).returncode == 0
    port = int(prop(box, "gone.socket", "Listen").split(":")[1].split()[0])
    rc, data = cli_json(box, "remove", "--user", "gone")
    assert rc == 0 and len(data["removed"][0]["files"]) == 3
    assert sorted(p.name for p in box.unit_dir.iterdir() if p.is_file()) == ["keep.service"]
    assert spec.exists()
    with pytest.raises(OSError):
        get(port, timeout=2)
    # a second remove has nothing to do: exit 0, changed false (automation can repeat it)
    rc, data = cli_json(box, "remove", "--user", "gone")
    assert rc == 0 and data["changed"] is False and data["absent"] == ["gone"]


def test_failed_update_leaves_previous_version_running(box, tmp_path):
    spec = demo_spec(tmp_path, "stable")
    assert cli(box, "deploy", "--user", str(spec)).returncode == 0
    before = (box.unit_dir / "stable-backend.service").read_text()
    port = int(prop(box, "stable.socket", "Listen").split(":")[1].split()[0])
    demo_spec(tmp_path, "stable", STANDIN_NEVER_READY="1")
    spec.write_text(spec.read_text().replace('timeout = "20s"', 'timeout = "2s"'))
    done = cli(box, "deploy", "--user", str(spec))
    assert done.returncode == 1
    assert "not ready after 2s" in done.stdout + done.stderr
    assert "previous version of stable was restored and is running again" in done.stdout
    assert (box.unit_dir / "stable-backend.service").read_text() == before
    assert get(port)[0] == 200


def test_failed_new_instance_leaves_nothing(box, tmp_path):
    spec = demo_spec(tmp_path, "doa", STANDIN_NEVER_READY="1")
    spec.write_text(spec.read_text().replace('timeout = "20s"', 'timeout = "2s"'))
    done = cli(box, "deploy", "--user", str(spec))
    assert done.returncode == 1 and "its units were removed again" in done.stdout
    assert list(box.unit_dir.glob("doa*")) == []


def test_status_of_twenty_instances_in_one_call(box, tmp_path):
    names = [f"many{i:02d}" for i in range(20)]
    specs = [str(demo_spec(tmp_path, n, extra='activation = "on-demand"\n')) for n in names]
    rc, data = cli_json(box, "deploy", "--user", *specs)
    assert rc == 0, data
    assert [i["name"] for i in data["instances"]] == names
    assert {(i["ready"], i["listening"]) for i in data["instances"]} == {(None, True)}
    assert prop(box, "many00.socket", "UnitFileState") == "enabled"
    assert prop(box, "many00.service", "UnitFileState") != "enabled"
    public = {i["name"]: i["public"] for i in data["instances"]}
    assert len(set(public.values())) == 20, public
    status, body = get(int(public["many00"].rsplit(":", 1)[1]))  # wake one
    assert status == 200
    t0 = time.monotonic()
    rc, out = cli_json(box, "status", "--user")
    elapsed = time.monotonic() - t0
    assert rc == 0
    rows = {r["name"]: r for r in out["instances"]}
    assert sorted(rows) == names
    for name in names:
        row = rows[name]
        # the address status reports is the one deploy chose and the socket holds
        assert row["address"] == public[name], row
        assert prop(box, f"{name}.socket", "Listen") == f"{public[name]} (Stream)"
        assert row["backend"] == "custom", row
    woken = rows["many00"]
    assert woken["state"] == "ready", woken
    assert woken["pid"] == body["pid"] == backend_pid(box, "many00")
    assert woken["memory_bytes"] > 1_000_000 and woken["uptime_s"] is not None
    for name in names[1:]:
        # asleep: the socket listens, no server process runs
        assert (rows[name]["state"], rows[name]["pid"]) == ("listening", None), rows[name]
        assert prop(box, f"{name}-backend.service", "ActiveState") == "inactive"
    print(f"status of 20 instances: {elapsed:.2f} s")


def test_doctor_finds_a_hand_made_mismatch(box, tmp_path):
    served, probed = free_port(), free_port()
    unit = box.unit_dir / "handmade.service"
    unit.write_text(f"[Service]\nExecStart={sys.executable} {STANDIN} --host 127.0.0.1 "
                    f"--port {served}\n")
    box.systemctl("daemon-reload")
    box.systemctl("start", "handmade.service", check=True)
    try:
        assert wait_for(lambda: _listening(served), 10)
        done = cli(box, "doctor", "--user", "--unit", "handmade.service", "--port", str(probed))
        assert done.returncode == 1
        assert f"listens on {served}, but the health check probes {probed}" in done.stdout
        ok = cli(box, "doctor", "--user", "--unit", "handmade.service", "--port", str(served))
        assert ok.returncode == 0, ok.stdout
    finally:
        box.systemctl("stop", "handmade.service")


def test_doctor_on_an_instance_reports_a_stray_listener(box, tmp_path):
    stray = free_port()
    spec = demo_spec(tmp_path, "leaky", STANDIN_EXTRA_PORT=str(stray))
    assert cli(box, "deploy", "--user", str(spec)).returncode == 0
    done = cli(box, "doctor", "--user", "leaky")
    assert done.returncode == 1
    assert f"also listens on port(s) {stray}" in done.stdout
    assert "the socket owns port" in done.stdout


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_logs_show_the_servers_journal_and_port_range_is_honoured(box, tmp_path):
    spec = demo_spec(tmp_path, "chatty")
    done = cli(box, "deploy", "--user", "--port-range", "41500-41510", "--json", str(spec))
    assert done.returncode == 0, done.stderr
    public = json.loads(done.stdout)["instances"][0]["public"]
    assert 41500 <= int(public.rsplit(":", 1)[1]) <= 41510
    logs = cli(box, "logs", "--user", "chatty", "-n", "20")
    assert logs.returncode == 0
    assert "standin: listening" in logs.stdout and "ready after" in logs.stdout
    bad = cli(box, "deploy", "--user", "--port-range", "9-x", str(spec))
    assert bad.returncode == 2 and "--port-range" in bad.stderr


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr (e2fsprogs)")
def test_write_failure_half_way_restores_every_file(box, tmp_path):
    spec = demo_spec(tmp_path, "halfway", free_port())
    assert cli(box, "deploy", "--user", str(spec)).returncode == 0
    before = {p.name: p.read_text() for p in box.unit_dir.glob("halfway*")}
    pid = backend_pid(box, "halfway")
    port = int(prop(box, "halfway.socket", "Listen").split(":")[1].split()[0])
    # new port and new env: all three files change; the last one cannot be replaced
    demo_spec(tmp_path, "halfway", free_port(), STANDIN_LOADING="404")
    locked = box.unit_dir / "halfway-backend.service"
    subprocess.run(["chattr", "+i", str(locked)], check=True)
    try:
        done = cli(box, "deploy", "--user", str(spec))
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert done.returncode == 1
    assert "cannot write" in done.stderr and "nothing was changed" in done.stderr
    assert {p.name: p.read_text() for p in box.unit_dir.glob("halfway*")} == before
    assert not list(box.unit_dir.glob(".halfway*"))  # no temp files left
    assert backend_pid(box, "halfway") == pid
    assert get(port)[0] == 200


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr (e2fsprogs)")
def test_multi_spec_write_failure_restores_the_specs_written_before_it(box, tmp_path):
    # One run, two specs: the first is written, the second cannot be. The first
    # must be put back too (one deploy is all or nothing), and keep serving.
    first, second = demo_spec(tmp_path, "early", free_port()), demo_spec(tmp_path, "late")
    assert cli(box, "deploy", "--user", str(first), str(second)).returncode == 0
    before = {p.name: p.read_text() for p in box.unit_dir.glob("*") if p.is_file()}
    pid = backend_pid(box, "early")
    port = int(prop(box, "early.socket", "Listen").split(":")[1].split()[0])
    demo_spec(tmp_path, "early", free_port(), STANDIN_LOADING="404")  # all of early's files change
    demo_spec(tmp_path, "late", STANDIN_LOADING="404")
    locked = box.unit_dir / "late-backend.service"
    subprocess.run(["chattr", "+i", str(locked)], check=True)
    try:
        done = cli(box, "deploy", "--user", str(first), str(second))
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot write" in done.stderr and "late-backend.service" in done.stderr
    after = {p.name: p.read_text() for p in box.unit_dir.glob("*") if p.is_file()}
    assert after == before  # early's three files included
    assert not list(box.unit_dir.glob(".early*"))
    assert prop(box, "early.socket", "Listen") == f"127.0.0.1:{port} (Stream)"
    assert backend_pid(box, "early") == pid
    assert get(port)[0] == 200
