"""Port allocation without a manager: real loopback sockets, real processes,
a real lock file. The live tests (test_operate_live.py) cover it end to end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from unitgen.ops.allocate import (
    Listener,
    PortBusyError,
    bindable,
    check_port,
    deploy_lock,
    listeners,
    owners,
    pick_port,
)
from unitgen.plan.record import Record
from unitgen.targets.systemd.installed import Installed


@pytest.fixture
def held() -> Iterator[socket.socket]:
    """A loopback port this process listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s


def free_run(length: int) -> int:
    """The first of ``length`` consecutive free loopback ports (from an odd base,
    so the wrap-around arithmetic is not hidden by a round number)."""
    for lo in range(45001, 47000, length + 1):
        if all(bindable(p) for p in range(lo, lo + length)):
            return lo
    raise AssertionError("no free run of ports")


def test_listeners_name_this_process(held):
    port = held.getsockname()[1]
    found = listeners()[port]
    assert (found.port, found.pid) == (port, os.getpid())
    assert sys.executable.rsplit("/", 1)[1] in found.process or "python" in found.process
    assert found.describe() == f"pid {os.getpid()} ({found.process})"


def test_a_hidden_holder_is_described_as_such():
    assert "cannot see" in Listener(1, None, "").describe()


def test_bindable(held):
    assert not bindable(held.getsockname()[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert bindable(port)


def _installed(name: str, public: int, private: int | None = None) -> Installed:
    """An installed instance as its record says it (loopback ports)."""
    return Installed(name, record=Record(name, public=f"127.0.0.1:{public}",
                                         private=f"127.0.0.1:{private}" if private else ""))


def test_owners_lists_public_and_private_ports():
    installed = {"a": _installed("a", 31001, 41001), "b": _installed("b", 31002)}
    assert owners(installed) == {31001: "a", 41001: "a", 31002: "b"}


def test_pick_port_starts_at_the_preferred_and_skips_what_is_taken(held):
    lo = free_run(6)
    span = (lo, lo + 5)
    assert pick_port("x", lo + 2, {}, {}, set(), span) == lo + 2
    installed = {"a": _installed("a", lo + 2, lo + 3)}
    busy = {lo + 4: Listener(lo + 4, 1, "init")}
    assert pick_port("x", lo + 2, installed, busy, set(), span) == lo + 5
    # wraps around inside the range
    assert pick_port("x", lo + 2, installed, busy, {lo + 5}, span) == lo
    # both ends of the range may be preferred
    assert pick_port("x", lo + 5, {}, {}, set(), span) == lo + 5
    assert pick_port("x", lo, {}, {}, set(), span) == lo
    # a preferred port outside the range starts at its low end
    assert pick_port("x", 1, {}, {}, set(), span) == lo
    assert pick_port("x", lo + 99, {}, {}, {lo}, span) == lo + 1


def test_pick_port_skips_a_port_bound_by_someone_unseen():
    lo = free_run(2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", lo))  # bound, not listening: no LISTEN entry, still unusable
        assert pick_port("x", lo, {}, {}, set(), (lo, lo + 1)) == lo + 1


def test_pick_port_says_when_the_range_is_full():
    lo = free_run(2)
    with pytest.raises(PortBusyError, match=rf"^x: no free port left in {lo}-{lo + 1}; set port"):
        pick_port("x", lo, {}, {}, {lo, lo + 1}, (lo, lo + 1))


def test_check_port_names_the_owner_or_the_holder(held):
    port = held.getsockname()[1]
    installed = {"other": _installed("other", 40123), "me": _installed("me", port)}
    with pytest.raises(PortBusyError, match=r"^me: port 40123 is owned by unitgen instance 'other'$"):
        check_port(40123, "me", installed, {})
    with pytest.raises(PortBusyError,
                       match=rf"^x: private_port {port} is in use by pid {os.getpid()} "):
        check_port(port, "x", {}, listeners(), "private_port")
    # an instance's own port is fine although its socket holds it
    check_port(port, "me", installed, listeners())
    check_port(40123, "other", installed, {})


def test_check_port_refuses_a_port_it_cannot_bind():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(PortBusyError) as info:
            check_port(port, "x", {}, {})
    assert str(info.value) == (f"x: port {port} cannot be bound now (held by a connection or "
                               "another network namespace); choose another")


HOLD = """
import sys, time
from unitgen.ops.allocate import deploy_lock
with deploy_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _locked_by_child(scope: str, seconds: float, env: dict[str, str]) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", HOLD, scope, str(seconds)], text=True,
                             stdout=subprocess.PIPE, env={**os.environ, **env})
    assert child.stdout is not None and child.stdout.readline() == "locked\n"
    return child


def test_deploy_lock_waits_for_another_process(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    child = _locked_by_child("user", 0.6, {"XDG_RUNTIME_DIR": str(tmp_path)})
    try:
        t0 = time.monotonic()
        with deploy_lock("user"):
            waited = time.monotonic() - t0
        assert waited > 0.3, waited
        assert (tmp_path / "unitgen-deploy.lock").stat().st_mode & 0o777 == 0o600
    finally:
        child.wait(timeout=10)


def test_deploy_lock_is_per_manager(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    child = _locked_by_child("user", 5, {"XDG_RUNTIME_DIR": str(a)})
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(b))
        t0 = time.monotonic()
        with deploy_lock("user"):
            assert time.monotonic() - t0 < 2
        assert (b / "unitgen-deploy.lock").exists()
    finally:
        child.kill()
        child.wait(timeout=10)


def test_deploy_lock_is_released_after_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with pytest.raises(RuntimeError), deploy_lock("user"):
        raise RuntimeError("boom")
    child = _locked_by_child("user", 0, {"XDG_RUNTIME_DIR": str(tmp_path)})
    assert child.wait(timeout=10) == 0


def test_system_scope_locks_in_run(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    if not os.access("/run", os.W_OK):
        pytest.skip("needs write access to /run")
    with deploy_lock("system"):
        assert Path("/run/unitgen-deploy.lock").exists()
    assert not (tmp_path / "unitgen-deploy.lock").exists()
