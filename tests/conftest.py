"""Fixtures: a real systemd user manager (with journald and session D-Bus),
started once per test session and stopped by its pid even when tests fail.

The live tier must not vanish quietly: when no manager can be had, every live
test is skipped with the reason, the summary says so in a block of its own, and
the run exits non-zero unless ``UNITGEN_ALLOW_SKIP_LIVE=1`` accepts it. With
``UNITGEN_TEST_HOST_MANAGER=1`` the live tests run against the caller's own
user manager instead of a private one (docs/testing.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from unitgen.ops.systemd.sandbox import Sandbox, sandbox_unavailable_reason

ALLOW_SKIP_ENV = "UNITGEN_ALLOW_SKIP_LIVE"
HOST_MANAGER_ENV = "UNITGEN_TEST_HOST_MANAGER"
# Every skip of the live tier starts with this, so the summary can count them.
LIVE_SKIP = "live tier skipped: "


def host_manager_unavailable_reason() -> str | None:
    """Why the caller's own user manager cannot host the live tests, or None."""
    if not os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return "DBUS_SESSION_BUS_ADDRESS is not set (no session bus to reach a user manager)"
    try:
        done = subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"systemctl --user does not answer: {exc}"
    if done.returncode != 0:
        return f"systemctl --user does not answer: {done.stderr.strip()[:200]}"
    units = HostManager.user_unit_dir()
    if units.is_dir():
        # The live tests write, and on cleanup delete, files in this directory.
        mine = sorted(p.name for p in units.iterdir() if p.is_file() or p.is_symlink())
        if mine:
            return (f"{units} already holds unit files ({', '.join(mine[:5])}); the live tests "
                    "install and delete units there, so they run only where it is empty "
                    "(a throwaway account or machine)")
    return None


@dataclass
class HostManager(Sandbox):
    """The caller's own systemd user manager, with the Sandbox interface the live
    tests use. ``root`` is a scratch directory whose ``home`` links to $HOME."""

    owns_root: bool = True

    @staticmethod
    def user_unit_dir() -> Path:
        """Where unitgen installs user units for this caller."""
        config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(config) / "systemd" / "user"

    @classmethod
    def open(cls) -> HostManager:
        """A handle on the running user manager (nothing is started)."""
        root = Path(tempfile.mkdtemp(prefix="unitgen-host-"))
        (root / "home").symlink_to(Path.home())
        cls.user_unit_dir().mkdir(parents=True, exist_ok=True)
        return cls(root=root, manager_pid=0, journald_pid=0)

    @property
    def env(self) -> dict[str, str]:
        """The caller's own manager: its variables as they are."""
        keys = ("HOME", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "DBUS_SESSION_BUS_ADDRESS")
        return {k: os.environ[k] for k in keys if k in os.environ}

    @property
    def unit_dir(self) -> Path:
        """Where the tests install units."""
        return self.user_unit_dir()

    def alive(self) -> bool:
        """The host's manager outlives the tests."""
        return True

    def stop(self, *, timeout: float = 15.0) -> None:
        """Leave the manager running; remove only the scratch directory."""
        del timeout
        shutil.rmtree(self.root, ignore_errors=True)

    def journal(self, unit: str | None = None, *, lines: int = 50) -> str:
        """Recent lines of the user journal (of one unit, if given)."""
        argv = ["journalctl", "--user", "--no-pager", "-n", str(lines), "-o", "cat"]
        if unit:
            argv += ["--user-unit", unit]
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


@pytest.fixture(scope="session")
def sandbox() -> Iterator[Sandbox]:
    """A systemd user manager for the live tests: a private one (default) or the
    caller's own (UNITGEN_TEST_HOST_MANAGER=1); skipped, loudly, where neither works."""
    if os.environ.get(HOST_MANAGER_ENV) == "1":
        reason = host_manager_unavailable_reason()
        if reason:
            pytest.skip(f"{LIVE_SKIP}{HOST_MANAGER_ENV}=1 but the host's user manager cannot "
                        f"be used: {reason}")
        host = HostManager.open()
        try:
            yield host
        finally:
            host.stop()
        return
    reason = sandbox_unavailable_reason()
    if reason:
        hint = ""
        if host_manager_unavailable_reason() is None:
            hint = f"; your own user manager answers: set {HOST_MANAGER_ENV}=1 to test against it"
        pytest.skip(f"{LIVE_SKIP}no private systemd manager: {reason}{hint}")
    box = Sandbox.start(tie_to_parent=True)
    try:
        yield box
    finally:
        box.stop()


_live_skips: dict[str, int] = {}


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Count the tests the live tier lost, by reason."""
    if report.skipped:
        reason = _skip_reason(report)
        if reason.startswith(LIVE_SKIP):
            _live_skips[reason] = _live_skips.get(reason, 0) + 1


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run that lost its live tier fails, unless the caller accepted that."""
    if (_live_skips and os.environ.get(ALLOW_SKIP_ENV) != "1"
            and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say in the summary, in a block of its own, that live tests did not run."""
    if not _live_skips:
        return
    allowed = os.environ.get(ALLOW_SKIP_ENV) == "1"
    tr = terminalreporter
    tr.section("LIVE TIER NOT RUN", sep="!", red=not allowed, yellow=allowed, bold=True)
    for reason, count in sorted(_live_skips.items()):
        tr.line(f"{count} live test(s) skipped: {reason.removeprefix(LIVE_SKIP)}",
                red=not allowed, yellow=allowed)
    if allowed:
        tr.line(f"accepted: {ALLOW_SKIP_ENV}=1", yellow=True)
    else:
        tr.line(f"this run fails for it; run as root on a host with systemd installed, or "
                f"set {ALLOW_SKIP_ENV}=1 to accept a run without the live tier", red=True,
                bold=True)
