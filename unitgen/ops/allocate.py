"""Choosing public and private ports on a host: skip ports any process listens
on (psutil) and ports other unitgen instances own (their installed units)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

from unitgen.errors import Problem, UnitgenError
from unitgen.features.gateway.keys import Secret, installed_key
from unitgen.features.gateway.plan import Member
from unitgen.ops.pipeline import HostGpus, RunAllocator, listen_overlap, place_or_report
from unitgen.plan.container import ProblemSink
from unitgen.plan.gpus import Placement
from unitgen.plan.record import Record
from unitgen.spec.model import InstanceSpec
from unitgen.spec.ports import (
    DEFAULT_PORT_RANGE,
    default_port,
    default_private_port,
    private_range_for,
)

__all__ = [
    "HostAllocator",
    "Installed",
    "Listener",
    "PortBusyError",
    "deploy_lock",
    "gpu_claims",
    "listeners",
    "pick_port",
    "port_problem",
]



class Installed(Protocol):
    """What allocation needs to know of an installed instance, whatever the
    target: the systemd target's units and the supervisor target's conf files
    both describe it."""

    @property
    def name(self) -> str: ...
    @property
    def public_host(self) -> str: ...
    @property
    def public_port(self) -> int: ...
    @property
    def private_port(self) -> int | None: ...
    @property
    def gpus(self) -> tuple[str, ...]: ...
    @property
    def gpu_share(self) -> bool: ...
    @property
    def rec(self) -> Record: ...


def gpu_claims(installed: Mapping[str, Installed]) -> dict[str, list[tuple[str, bool]]]:
    """GPU UUID -> the instances placed there and whether each shares."""
    claims: dict[str, list[tuple[str, bool]]] = {}
    for inst in installed.values():
        for uuid in inst.gpus:
            claims.setdefault(uuid, []).append((inst.name, inst.gpu_share))
    return claims


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


def owners(installed: Mapping[str, Installed]) -> dict[int, str]:
    """Port -> the instance that owns it (public or private)."""
    out: dict[int, str] = {}
    for inst in installed.values():
        if inst.public_port:
            out[inst.public_port] = inst.name
        if inst.private_port:
            out[inst.private_port] = inst.name
    return out


def port_problem(port: int, name: str, installed: Mapping[str, Installed],
                 busy: dict[int, Listener], host: str = "") -> str | None:
    """Why ``port`` cannot be this instance's: owned by another instance (on an
    overlapping address) or held by a process; None when it is free or its own."""
    for other in installed.values():
        if other.name == name:
            continue
        if other.private_port == port:
            return f"{port} is the private port of unitgen instance {other.name!r}"
        if other.public_port == port and (not host or not other.public_host or _overlap(
                host, other.public_host, port)):
            return f"{port} is owned by unitgen instance {other.name!r}"
    mine = installed.get(name)
    ours = mine is not None and port in (mine.public_port, mine.private_port)
    if port in busy and not ours:
        return f"{port} is in use by {busy[port].describe()}"
    if not ours and not bindable(port):
        return (f"{port} cannot be bound now (held by a connection or another network "
                "namespace); choose another")
    return None


def _overlap(host_a: str, host_b: str, port: int) -> bool:
    try:
        return listen_overlap(host_a, port, host_b, port)
    except ValueError:
        return True


def check_port(port: int, name: str, installed: Mapping[str, Installed], busy: dict[int, Listener],
               what: str = "port") -> None:
    """Raise PortBusyError when ``port`` is owned by another instance or process."""
    why = port_problem(port, name, installed, busy)
    if why:
        raise PortBusyError(f"{name}: {what} {why}")


def pick_port(name: str, preferred: int, installed: Mapping[str, Installed],
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
def deploy_lock(scope: str, say: Callable[[str], None] | None = None) -> Iterator[None]:
    """Serialize deploys to one manager: two deploys never pick the same port.
    The lock lives in the manager's runtime directory, not among the unit files;
    a deploy that has to wait says so."""
    runtime = os.environ.get("XDG_RUNTIME_DIR") if scope == "user" else "/run"
    try:
        if runtime:
            directory = Path(runtime)
        else:
            # Never /tmp (anyone can plant a symlink there): the user's own cache dir.
            directory = Path.home() / ".cache" / "unitgen"
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / "unitgen-deploy.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise UnitgenError(f"cannot open the deploy lock in {runtime or '~/.cache/unitgen'}: "
                           f"{exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if say is not None:
                say(f"waiting for another unitgen deploy or remove to finish (lock {path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@dataclass
class HostAllocator(RunAllocator):
    """Plans for ``deploy``: ports and GPUs of this host, under the deploy lock.
    An instance keeps the ports and GPUs it has (the installed units are the
    database); new ones get free ports; what cannot be had is a problem of the
    spec, reported with every other one before anything changes."""

    scope: str
    installed: Mapping[str, Installed]
    busy: dict[int, Listener]
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE
    host_gpus: HostGpus | None = None
    taken: set[int] = field(default_factory=set)
    reserved: set[int] = field(default_factory=set)
    unplaceable: list[Problem] = field(default_factory=list)
    # GPU claims of installed instances and of the specs placed so far in this run
    claims: dict[str, list[tuple[str, bool]]] | None = None
    # where a spec's private port comes from (default: by the manager's user)
    private_range: Callable[[InstanceSpec], tuple[int, int]] | None = None
    # swap-group mates of a spec: their GPU claims are no conflict, their memory is free
    mates: Callable[[InstanceSpec], frozenset[str]] | None = None
    # the ports planned here are the ones the instances get (see plan_paths)
    final_ports: bool = True
    # an installed instance's secret, by variable (the target knows where it is kept)
    secret: Secret | None = None

    def reserve(self, ports: set[int]) -> None:
        """Ports specs of this run fix: never allocated to another spec."""
        self.reserved = set(ports)

    def gateway_members(self, gateway: str) -> list[Member]:
        """Installed instances that join ``gateway`` (from their records)."""
        return [m for i in self.installed.values()
                if (m := i.rec.member) is not None and m.gateway == gateway]

    def member_key(self, m: Member) -> str | None:
        """A member's own API key, from where the target keeps its secrets."""
        return installed_key(m, self.secret or (lambda _name, _var: None))

    def public_port(self, spec: InstanceSpec, explicit: int | None, host: str,
                    problem: ProblemSink) -> int:
        """See :class:`~unitgen.plan.instance.Allocator`."""
        mine = self.installed.get(spec.name)
        if explicit is not None:
            why = port_problem(explicit, spec.name, self.installed, self.busy, host)
            if why:
                problem("port", why)
            port = explicit
        elif mine and mine.public_port:
            port = mine.public_port  # kept: redeploys change nothing
        else:
            try:
                port = pick_port(spec.name, default_port(spec.name), self.installed, self.busy,
                                 self.taken | self.reserved, self.port_range)
            except PortBusyError as exc:
                problem("port", exc.message.split(": ", 1)[1])
                port = default_port(spec.name)
        self.taken.add(port)
        return port

    def private_port(self, spec: InstanceSpec, public: int, problem: ProblemSink) -> int:
        """See :class:`~unitgen.plan.instance.Allocator`. A spec's own
        ``private_port`` is checked here too."""
        prange = (self.private_range(spec) if self.private_range is not None
                  else private_range_for(self.scope))
        mine = self.installed.get(spec.name)
        if spec.private_port:
            why = port_problem(spec.private_port, spec.name, self.installed, self.busy)
            if why:
                problem("private_port", why)
            port = spec.private_port
        elif mine and mine.private_port and prange[0] <= mine.private_port <= prange[1]:
            port = mine.private_port  # kept; one from 0.1 (20000+) moves to a privileged one
        else:
            try:
                port = pick_port(spec.name, default_private_port(spec.name, prange),
                                 self.installed, self.busy, self.taken | self.reserved | {public},
                                 prange)
            except PortBusyError as exc:
                problem("private_port", exc.message.split(": ", 1)[1])
                port = default_private_port(spec.name, prange)
        self.taken.add(port)
        return port

    def placement(self, spec: InstanceSpec, problem: ProblemSink) -> Placement | None:
        """See :class:`~unitgen.plan.instance.Allocator`; later specs of the run see
        this one's claim."""
        if spec.gpus is None or spec.gpus == 0:
            return None
        if self.host_gpus is None:
            self.host_gpus = HostGpus.here()
        if self.claims is None:
            self.claims = gpu_claims(self.installed)
        placed = place_or_report(spec, self.host_gpus, self.claims, problem,
                                 self.unplaceable, self.scope,
                                 self.mates(spec) if self.mates is not None else frozenset())
        if placed is not None:
            for claimers in self.claims.values():
                claimers[:] = [c for c in claimers if c[0] != spec.name]
            for uuid in placed.uuids:
                self.claims.setdefault(uuid, []).append((spec.name, placed.share))
        return placed
