"""A run that loses its live tier says so and fails, unless told to accept it.

Each case runs pytest on one live test and one offline test in a private mount
namespace where ``/run/systemd/system`` exists, which is how a host with systemd
as PID 1 looks: the private manager refuses to start there, as it would on such
a host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SELECTION = ["tests/live/test_operate_live.py::test_dry_run_and_diff_change_nothing",
             "tests/offline/test_probe.py::test_sends_the_bearer_key"]

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare to fake a systemd host in a private mount namespace")


def pytest_as_on_a_systemd_host(**env: str) -> subprocess.CompletedProcess[str]:
    script = ("mkdir -p /run/systemd && mount -t tmpfs tmpfs /run/systemd && "
              'mkdir /run/systemd/system && exec "$0" -m pytest -p no:cacheprovider "$@"')
    clean = {k: v for k, v in os.environ.items()
             if k not in ("UNITGEN_ALLOW_SKIP_LIVE", "UNITGEN_TEST_HOST_MANAGER",
                          "DBUS_SESSION_BUS_ADDRESS", "PYTEST_ADDOPTS")}
    return subprocess.run(["unshare", "-m", "sh", "-c", script, sys.executable, *SELECTION],
                          cwd=REPO, env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)


def test_a_skipped_live_tier_fails_the_run_and_says_why():
    done = pytest_as_on_a_systemd_host()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "LIVE TIER NOT RUN" in done.stdout
    assert "1 live test(s) skipped: no private systemd manager: this host runs systemd as PID 1" \
        in done.stdout
    assert "UNITGEN_ALLOW_SKIP_LIVE=1" in done.stdout
    assert "1 passed, 1 skipped" in done.stdout


def test_a_skipped_live_tier_can_be_accepted_but_is_still_shown():
    done = pytest_as_on_a_systemd_host(UNITGEN_ALLOW_SKIP_LIVE="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "LIVE TIER NOT RUN" in done.stdout and "accepted: UNITGEN_ALLOW_SKIP_LIVE=1" in done.stdout


def test_asking_for_the_host_manager_without_one_is_loud_too():
    done = pytest_as_on_a_systemd_host(UNITGEN_TEST_HOST_MANAGER="1")
    assert done.returncode == 1, done.stdout + done.stderr
    assert ("UNITGEN_TEST_HOST_MANAGER=1 but the host's user manager cannot be used: "
            "DBUS_SESSION_BUS_ADDRESS is not set") in done.stdout
