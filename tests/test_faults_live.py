"""Faults, each on a real systemd user manager with the stand-in server (issue 11):
a server that hangs after ready, a crash loop, a hang during start, kill -9
under load, concurrent deploys and a deploy racing daemon-reload.

Counts measured here are printed (``-s`` shows them) and summarised in
docs/reliability.md."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import custom_spec, get, prop, wait_for, write_spec
from tests.test_operate_live import cli, cli_json
from unitgen.ops.sandbox import Sandbox

pytestmark = pytest.mark.systemd


@pytest.fixture
def box(sandbox: Sandbox) -> Iterator[Sandbox]:
    """The shared sandbox; instances this test deployed are removed afterwards."""
    before = {p.name for p in sandbox.unit_dir.glob("*")}
    yield sandbox
    names = sorted({p.stem for p in sandbox.unit_dir.glob("*.socket")
                    if p.name not in before and "unitgen-instance" in p.read_text()})
    if names:
        cli(sandbox, "remove", "--user", *names)
    sandbox.systemctl("reset-failed")


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
    assert "restarted 1 time; last: liveness: " in row["detail"], row
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
