"""Faults, each on a real systemd user manager with the stand-in server (issue 11):
a server that hangs after ready, a crash loop, a hang during start, kill -9
under load, concurrent deploys and a deploy racing daemon-reload.

Counts measured here are printed (``-s`` shows them) and summarised in
docs/reliability.md."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import custom_spec, get, prop, wait_for, write_spec
from tests.live.test_gpus_live import cli as gpu_cli
from tests.live.test_operate_live import cli, cli_json
from tests.nvml import FAKE_DIR, GIB, eight_gpus, write_scenario
from unitgen.ops.systemd.sandbox import Sandbox

pytestmark = pytest.mark.systemd



def spec(directory: Path, name: str, *, health: str = 'timeout = "30s"\n', extra: str = "",
         **env: str) -> Path:
    """The stand-in as a custom backend, with ``env`` and a [health] table."""
    return write_spec(directory, name, custom_spec(name, env=env,
                                                   extra=extra + "[health]\n" + health))


def public_port(data: dict[str, Any]) -> int:
    return int(data["instances"][0]["public"].rsplit(":", 1)[1])


def status_of(box: Sandbox, name: str) -> dict[str, Any]:
    rc, data = cli_json(box, "status", "--user", name)
    assert rc == 0, data
    row: dict[str, Any] = data["instances"][0]
    return row


def checker_pids(main_pid: int) -> list[int]:
    """The liveness checkers in the same cgroup (unit) as ``main_pid``."""
    cgroup = Path(f"/proc/{main_pid}/cgroup").read_text()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cgroup").read_text() != cgroup:
                continue
            if b"unitgen.inunit.watch" in (entry / "cmdline").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


# ---------------------------------------------------------------- liveness


def test_a_server_that_hangs_after_ready_is_detected_and_restarted(box, tmp_path):
    marker = tmp_path / "hung"
    path = spec(tmp_path, "hangs", health='timeout = "30s"\nwatchdog = "6s"\n',
                STANDIN_HANG_AFTER="5", STANDIN_HANG_ONCE=str(marker))
    rc, data = cli_json(box, "deploy", "--user", str(path))
    assert rc == 0, data
    port = public_port(data)
    first_pid = int(prop(box, "hangs-backend.service", "MainPID"))
    first = status_of(box, "hangs")
    assert first["state"] == "ready", first

    # the checker's requests use up the three answers: the server now accepts and
    # never answers; status says so before systemd acts
    assert wait_for(marker.exists, 20), "the stand-in never started to hang"
    seen: list[dict[str, Any]] = []

    def unhealthy() -> bool:
        seen.append(status_of(box, "hangs"))
        return bool(seen[-1]["state"] == "unhealthy")

    assert wait_for(unhealthy, 8, interval=0.3), seen[-1:]
    assert "did not answer" in seen[-1]["detail"], seen[-1]
    assert "no answer within" in seen[-1]["detail"], seen[-1]

    # systemd's watchdog (6 s without an answer) kills it; Restart= brings it back
    assert wait_for(lambda: prop(box, "hangs-backend.service", "NRestarts") == "1", 30)
    assert wait_for(lambda: status_of(box, "hangs")["state"] == "ready", 30)
    row = status_of(box, "hangs")
    assert row["restarts"] == 1 and row["pid"] != first_pid, row
    # the manager's own verdict (watchdog) is in the journal too, with the checker's reason
    assert "restarted 1 time; last: " in row["detail"] and "liveness: " in row["detail"], row
    assert "did not answer" in row["detail"], row

    done = cli(box, "doctor", "--user", "hangs")
    assert "restarted 1 time" in done.stdout and "did not answer" in done.stdout, done.stdout
    assert "liveness checker runs" in done.stdout, done.stdout

    # requests after the restart are answered, by the new process
    code, body = get(port, "/v1/models")
    assert code == 200 and body["pid"] != first_pid


def test_a_slow_request_is_not_a_hang(box, tmp_path):
    path = spec(tmp_path, "slowreq", health='timeout = "30s"\nwatchdog = "3s"\n',
                STANDIN_SLOW_PATH="/v1/slow", STANDIN_SLOW_SECONDS="8")
    rc, data = cli_json(box, "deploy", "--user", str(path))
    assert rc == 0, data
    pid = int(prop(box, "slowreq-backend.service", "MainPID"))
    t0 = time.monotonic()
    code, body = get(public_port(data), "/v1/slow", timeout=30)
    assert code == 200 and body["pid"] == pid
    assert time.monotonic() - t0 >= 8
    assert prop(box, "slowreq-backend.service", "NRestarts") == "0"
    assert status_of(box, "slowreq")["state"] == "ready"


def test_watchdog_off_renders_no_checker(tmp_path):
    path = spec(tmp_path, "nowatch", health='watchdog = "off"\n')
    done = subprocess.run([sys.executable, "-m", "unitgen", "render", str(path)],
                          capture_output=True, text=True, check=True)
    assert "unitgen.inunit.watch" not in done.stdout
    path = spec(tmp_path, "watch", health='watchdog = "45s"\n')
    done = subprocess.run([sys.executable, "-m", "unitgen", "render", str(path)],
                          capture_output=True, text=True, check=True)
    assert "unitgen.inunit.watch" in done.stdout and "--bound 45s" in done.stdout


def test_the_checker_stays_small(box, tmp_path):
    rc, data = cli_json(box, "deploy", "--user", str(spec(tmp_path, "small")))
    assert rc == 0, data
    rss = {}
    for pid in checker_pids(int(prop(box, "small-backend.service", "MainPID"))):
            status = Path(f"/proc/{pid}/status").read_text()
            rss[pid] = int(next(ln.split()[1] for ln in status.splitlines()
                                if ln.startswith("VmRSS:")))
    assert len(rss) == 1, rss
    kib = next(iter(rss.values()))
    print(f"\nliveness checker resident memory: {kib / 1024:.1f} MiB")
    assert kib <= 15 * 1024


# ---------------------------------------------------------------- crash loop, hang at start


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def test_crash_loop_stops_at_the_start_limit_and_keeps_the_port(box, tmp_path):
    path = spec(tmp_path, "crashloop", STANDIN_EXIT_AFTER="0.5")
    rc, data = cli_json(box, "deploy", "--user", str(path))
    assert rc == 0, data  # it was ready, for half a second
    port = public_port(data)
    server = "crashloop-backend.service"
    t0 = time.monotonic()

    def stopped() -> bool:
        # failed, and still failed a while later: no restart is pending any more
        if prop(box, server, "ActiveState") != "failed":
            return False
        time.sleep(1.5)
        return prop(box, server, "ActiveState") == "failed"

    assert wait_for(stopped, 60, 0.2), (prop(box, server, "NRestarts"), box.journal(server))
    took = time.monotonic() - t0
    restarts = int(prop(box, server, "NRestarts"))
    print(f"\ncrash loop: {restarts} restarts, stopped at the start limit after {took:.1f} s")
    # StartLimitBurst=5: five starts; the sixth, refused, still counts as a restart
    assert restarts == 5
    time.sleep(2)
    assert int(prop(box, server, "NRestarts")) == restarts  # not in a loop any more
    row = status_of(box, "crashloop")
    assert row["state"] == "failed", row
    assert "stopped at its start limit" in row["detail"], row
    # the socket still owns the port, and the next deploy uses it
    assert prop(box, "crashloop.socket", "ActiveState") == "active"
    assert port_accepts(port)
    path = spec(tmp_path, "crashloop")
    rc, data = cli_json(box, "deploy", "--user", str(path))
    assert rc == 0, data
    assert public_port(data) == port
    assert get(port)[0] == 200


def test_a_hang_during_start_fails_at_the_deadline(box, tmp_path):
    # accepts connections and never answers, from the first request on
    path = spec(tmp_path, "hangstart", health='timeout = "4s"\n', STANDIN_HANG_AFTER="0")
    t0 = time.monotonic()
    done = cli(box, "deploy", "--user", "--json", str(path), timeout=120)
    took = time.monotonic() - t0
    assert done.returncode == 1, done.stdout
    assert took < 4 + 30, f"deploy waited {took:.0f} s for a 4 s deadline"
    assert "not ready after 4s" in done.stdout + done.stderr
    assert "no answer within" in done.stdout + done.stderr
    assert not (box.unit_dir / "hangstart.socket").exists()  # a new instance is rolled back


# ---------------------------------------------------------------- disk full on the unit directory


def test_disk_full_on_the_unit_directory_keeps_the_previous_version(box, tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs over the unit directory")
    path = spec(tmp_path, "diskfull")
    rc, data = cli_json(box, "deploy", "--user", str(path))
    assert rc == 0, data
    port = public_port(data)
    pid = int(prop(box, "diskfull-backend.service", "MainPID"))
    saved = {p.name: p.read_bytes() for p in box.unit_dir.iterdir() if p.is_file()}
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(box.unit_dir)],
                   check=True)
    try:
        for name, content in saved.items():
            (box.unit_dir / name).write_bytes(content)
        filler = box.unit_dir / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        spec(tmp_path, "diskfull", STANDIN_LOADING="404")  # a changed spec
        done = cli(box, "deploy", "--user", str(path))
        assert done.returncode == 1, done.stdout
        assert "No space left on device" in done.stderr + done.stdout, done.stderr
        assert "Traceback" not in done.stderr
        now = {p.name: p.read_bytes() for p in box.unit_dir.iterdir()
               if p.is_file() and p.name != "filler"}
        assert now == saved  # every file as it was, no temp file left
        assert int(prop(box, "diskfull-backend.service", "MainPID")) == pid
        assert get(port)[0] == 200
    finally:
        subprocess.run(["umount", "-l", str(box.unit_dir)], check=False)
        box.systemctl("daemon-reload")


# ---------------------------------------------------------------- kill -9 under load


@dataclass
class Tally:
    ok: int = 0
    reset: int = 0
    refused: int = 0
    hung: int = 0
    other: int = 0
    slowest: float = 0.0

    def line(self) -> str:
        total = self.ok + self.reset + self.refused + self.hung + self.other
        return (f"{total} requests: {self.ok} ok, {self.reset} reset, {self.refused} refused, "
                f"{self.hung} hung, {self.other} other; slowest {self.slowest:.1f} s")

    def add(self, outcome: str, seconds: float) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)
        self.slowest = max(self.slowest, seconds)


REQUEST_BOUND = 20.0  # no request may take longer than this


def one_request(port: int) -> str:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_BOUND) as s:
            s.settimeout(REQUEST_BOUND)
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    except TimeoutError:
        return "hung"
    except ConnectionRefusedError:
        return "refused"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    except OSError:
        return "other"
    if data.startswith(b"HTTP/1.0 200") or data.startswith(b"HTTP/1.1 200"):
        return "ok"
    return "reset" if not data else "other"


def load_and_kill(port: int, kill: Callable[[], None], *, clients: int = 6,
                  seconds: float = 6.0, kill_at: float = 2.0) -> Tally:
    """``clients`` loops of requests through the public port for ``seconds``;
    ``kill`` (the server, with SIGKILL) runs at ``kill_at``."""
    tally = Tally()
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < end:
            t0 = time.monotonic()
            outcome = one_request(port)
            with lock:
                tally.add(outcome, time.monotonic() - t0)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(kill_at)
    kill()
    for t in threads:
        t.join(seconds + REQUEST_BOUND + 10)
    assert not any(t.is_alive() for t in threads), "a client is still waiting"
    return tally


@pytest.mark.parametrize(("label", "extra", "health"), [
    # the settings before this change: restart after 2 s, nothing left in the unit
    ("before", '[systemd.service]\nRestartSec = "2s"\n', 'watchdog = "off"\n'),
    ("no-checker", "", 'watchdog = "off"\n'),
    ("defaults", "", ""),
])
def test_kill_9_under_load(box, tmp_path, label, extra, health):
    name = f"load-{label}"
    path = spec(tmp_path, name, extra=extra, health='timeout = "30s"\n' + health,
                STANDIN_LOAD_SECONDS="1", STANDIN_LOADING="refuse")
    rc, data = cli_json(box, "deploy", "--user", str(path))
    assert rc == 0, data
    port = public_port(data)
    server = f"{name}-backend.service"
    tally = load_and_kill(port, lambda: os.kill(int(prop(box, server, "MainPID")), signal.SIGKILL))
    total = tally.ok + tally.reset + tally.refused + tally.hung + tally.other
    print(f"\nkill -9 under load ({label}): {tally.line()}")
    assert tally.hung == 0 and tally.slowest < REQUEST_BOUND
    assert tally.refused == 0  # the socket owns the port throughout
    assert tally.ok > 0
    # what is lost: requests in flight when the server died, and those the proxy
    # forwarded before it was stopped (usually a few ms; up to ~0.5 s seen on a
    # loaded machine). A proxy left running through the restart loses half.
    assert tally.reset + tally.other <= max(6, total // 4), tally
    assert wait_for(lambda: prop(box, f"{name}-backend.service", "NRestarts") == "1", 30)
    assert get(port)[0] == 200  # and afterwards it serves again


# ---------------------------------------------------------------- concurrency


def test_concurrent_deploys_removes_and_a_racing_daemon_reload(box, tmp_path):
    gone = spec(tmp_path, "race-gone")
    rc, data = cli_json(box, "deploy", "--user", str(gone))
    assert rc == 0, data
    names = [f"race-{i}" for i in range(4)]
    paths = [spec(tmp_path, n) for n in names]
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    stop_reloading = threading.Event()
    reloads = [0]

    def reload_loop() -> None:
        while not stop_reloading.is_set():
            box.systemctl("daemon-reload")
            reloads[0] += 1

    def run(key: str, *args: str) -> None:
        results[key] = cli(box, *args, timeout=300)

    reloader = threading.Thread(target=reload_loop)
    workers = [threading.Thread(target=run, args=(n, "deploy", "--user", "--json", str(p)))
               for n, p in zip(names, paths, strict=True)]
    workers.append(threading.Thread(target=run, args=("remove", "remove", "--user", "race-gone")))
    reloader.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join(300)
    stop_reloading.set()
    reloader.join(60)
    print(f"\n4 deploys and 1 remove with {reloads[0]} daemon-reloads racing them")
    assert reloads[0] > 0
    for key, done in results.items():
        assert done.returncode == 0, (key, done.stdout, done.stderr)
    ports = {n: public_port(json.loads(results[n].stdout)) for n in names}
    assert len(set(ports.values())) == len(names), ports
    for n in names:
        assert {f"{n}.socket", f"{n}.service", f"{n}-backend.service"} <= {
            p.name for p in box.unit_dir.glob(f"{n}*")}
        assert get(ports[n])[0] == 200
    assert not list(box.unit_dir.glob("race-gone*"))
    assert not list(box.unit_dir.glob(".*"))  # no temp files left


def test_a_watchdog_restart_waits_for_the_gpu_memory(box, tmp_path):
    scenario = write_scenario(tmp_path / "nvml.json", eight_gpus())
    marker = tmp_path / "hung"
    path = spec(tmp_path, "gpuhang", health='timeout = "30s"\nwatchdog = "6s"\n',
                extra="gpus = 1\n", PYTHONPATH=str(FAKE_DIR),
                FAKE_NVML_SCENARIO=str(scenario), STANDIN_HANG_AFTER="3",
                STANDIN_HANG_ONCE=str(marker))
    done = gpu_cli(box, scenario, "deploy", "--user", "--json", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert wait_for(marker.exists, 20)
    # the hung server's memory is released late (a wedged CUDA context takes its time)
    until = time.time() + 9
    write_scenario(scenario, eight_gpus(processes={0: [
        {"pid": 2**22 + 5, "used": 30 * GIB, "until": until}]}))
    server = "gpuhang-backend.service"
    assert wait_for(lambda: prop(box, server, "NRestarts") == "1", 30)
    assert wait_for(lambda: prop(box, server, "SubState") == "running", 30)
    started = int(prop(box, server, "ExecMainStartTimestampMonotonic"))
    assert started > 0
    assert time.time() >= until
    assert "gpu wait: GPU memory released after" in box.journal(server)
