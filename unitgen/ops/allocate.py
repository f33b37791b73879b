"""Choosing public and private ports on a host: skip ports any process listens
on (psutil) and ports other unitgen instances own (their installed units)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from unitgen.errors import UnitgenError
from unitgen.spec.ports import DEFAULT_PORT_RANGE
from unitgen.targets.systemd.installed import Installed

__all__ = ["Listener", "PortBusyError", "deploy_lock", "listeners", "pick_port"]



class PortBusyError(UnitgenError):
    """An explicit port is taken by another process or instance."""


@dataclass(frozen=True)
class Listener:
    """A process listening on a TCP port."""

    port: int
    pid: int | None
    process: str

    def describe(self) -> str:
        """``pid 123 (nginx: master process)`` or ``an unknown process``."""
        if self.pid is None:
            return "a process unitgen cannot see (another user or namespace)"
        return f"pid {self.pid} ({self.process})"


def listeners() -> dict[int, Listener]:
    """TCP ports something listens on, with the holder where visible."""
    out: dict[int, Listener] = {}
    for conn in psutil.net_connections(kind="inet"):
        if conn.status != psutil.CONN_LISTEN or not conn.laddr:
            continue
        port = int(conn.laddr.port)
        name = ""
        if conn.pid:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(conn.pid)
                name = " ".join(proc.cmdline()[:3]) or proc.name()
        out.setdefault(port, Listener(port, conn.pid, name))
    return out


def bindable(port: int) -> bool:
    """True when a listening socket could bind ``port`` now (SO_REUSEADDR, as
    systemd does). Catches what a LISTEN table misses: ports held by connections."""
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET, "127.0.0.1")):  # noqa: S104
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def owners(installed: dict[str, Installed]) -> dict[int, str]:
    """Port -> the instance that owns it (public or private)."""
    out: dict[int, str] = {}
    for inst in installed.values():
        if inst.public_port:
            out[inst.public_port] = inst.name
        if inst.private_port:
            out[inst.private_port] = inst.name
    return out


def check_port(port: int, name: str, installed: dict[str, Installed], busy: dict[int, Listener],
               what: str = "port") -> None:
    """Raise PortBusyError when ``port`` is owned by another instance or process."""
    owner = owners(installed).get(port)
    if owner is not None and owner != name:
        raise PortBusyError(f"{name}: {what} {port} is owned by unitgen instance {owner!r}")
    mine = installed.get(name)
    ours = mine is not None and port in (mine.public_port, mine.private_port)
    if port in busy and not ours:
        raise PortBusyError(f"{name}: {what} {port} is in use by {busy[port].describe()}")
    if not ours and not bindable(port):
        raise PortBusyError(f"{name}: {what} {port} cannot be bound now (held by a connection "
                            "or another network namespace); choose another")


def pick_port(name: str, preferred: int, installed: dict[str, Installed],
              busy: dict[int, Listener], also_taken: set[int],
              span: tuple[int, int] = DEFAULT_PORT_RANGE) -> int:
    """The first free port from ``preferred`` onward, wrapping inside ``span``."""
    taken = set(owners(installed)) | set(busy) | also_taken
    lo, hi = span
    size = hi - lo + 1
    start = preferred if lo <= preferred <= hi else lo
    for i in range(size):
        port = lo + (start - lo + i) % size
        if port not in taken and bindable(port):
            return port
    raise PortBusyError(f"{name}: no free port left in {lo}-{hi}; set port = ... in the spec")


@contextlib.contextmanager
def deploy_lock(scope: str) -> Iterator[None]:
    """Serialize deploys to one manager: two deploys never pick the same port.
    The lock lives in the runtime directory, not among the unit files."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") if scope == "user" else "/run"
    directory = Path(runtime or "/tmp")  # noqa: S108 - last resort when no runtime dir is set
    fd = os.open(directory / "unitgen-deploy.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
