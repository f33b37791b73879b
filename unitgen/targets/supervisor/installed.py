"""Reading back what unitgen installed in a supervisord include directory: the
conf files are the database (their header says instance, ports and probe)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unitgen.errors import NoSuchInstanceError
from unitgen.plan.record import RUNTIME_TOKEN, Record, parse_record
from unitgen.targets.supervisor.render import MARKER

__all__ = ["InstalledConf", "read_conf", "require", "scan"]


@dataclass(frozen=True)
class InstalledConf:
    """One instance's conf file and its record (:mod:`unitgen.plan.record`)."""

    path: Path
    record: Record
    run_dir: str = "/run/unitgen"  # what the record's runtime token stands for here

    @property
    def name(self) -> str:
        """The instance's name."""
        return self.record.name

    @property
    def rec(self) -> Record:
        """Its record."""
        return self.record

    @property
    def backend(self) -> str:
        """The backend's name."""
        return self.record.backend

    @property
    def public(self) -> str:
        """The public listen address (host:port)."""
        return self.record.public

    @property
    def private(self) -> str:
        """Where the server listens, or a sentence for socket-activated servers."""
        if not self.record.private:
            return "(the server takes the public socket as fd 3)"
        return self.record.private.replace(RUNTIME_TOKEN, self.run_dir)

    @property
    def health_path(self) -> str:
        """The health path the probe asks."""
        return self.record.health

    @property
    def timeout(self) -> float:
        """The readiness deadline."""
        return self.record.timeout

    @property
    def key_env(self) -> str | None:
        """The variable holding the probe's key."""
        return self.record.key_env

    @property
    def gpus(self) -> tuple[str, ...]:
        """GPU UUIDs it is placed on."""
        return self.record.gpus

    @property
    def gpu_share(self) -> bool:
        """Its GPUs may be shared."""
        return self.record.gpu_share

    @property
    def public_host(self) -> str:
        """The public listen address."""
        return self.record.public_host

    @property
    def public_port(self) -> int:
        """The public port."""
        return self.record.public_port

    @property
    def private_port(self) -> int | None:
        """The private loopback port, when the server listens on one."""
        return self.record.private_port

    @property
    def uses_proxy(self) -> bool:
        """True when a proxy forwards the public socket to a private endpoint."""
        return bool(self.record.private)

    @property
    def groups(self) -> list[str]:
        """supervisord process groups, the public one first."""
        return [self.name, f"{self.name}-backend"]

    @property
    def server(self) -> str:
        """The namespec of the process that runs the model server."""
        return f"{self.name}-backend"

    def probe_target(self) -> str:
        """host:port to probe the public socket at."""
        return self.record.probe


def read_conf(path: Path, run_dir: str = "/run/unitgen") -> InstalledConf | None:
    """The record of a conf file unitgen wrote (its marker and its record line),
    else None."""
    try:
        head = path.read_bytes()[:16384].decode("utf-8", "replace")
    except OSError:
        return None
    lines = head.split("\n")
    if not any(line.startswith(MARKER) for line in lines[:4]):
        return None
    record = parse_record(head)
    return InstalledConf(path, record, run_dir) if record is not None else None


def scan(conf_dir: Path, run_dir: str = "/run/unitgen") -> dict[str, InstalledConf]:
    """Every instance whose conf file unitgen wrote in ``conf_dir``."""
    out: dict[str, InstalledConf] = {}
    if not conf_dir.is_dir():
        return out
    for path in sorted(conf_dir.glob("unitgen-*.conf")):
        conf = read_conf(path, run_dir)
        if conf is not None:
            out[conf.name] = conf
    return out


def require(conf_dir: Path, names: list[str],
            run_dir: str = "/run/unitgen") -> dict[str, InstalledConf]:
    """The named instances; NoSuchInstanceError (bad input, exit 2, as for the
    systemd target) naming the missing ones."""
    found = scan(conf_dir, run_dir)
    missing = [n for n in names if n not in found]
    if missing:
        known = ", ".join(sorted(found)) or "none"
        raise NoSuchInstanceError(f"no unitgen instance {', '.join(missing)} in {conf_dir} "
                           f"(installed: {known})")
    return {n: found[n] for n in names}
