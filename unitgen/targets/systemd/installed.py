"""The installed units are the database: which instances exist, which ports they
own, which files are ours. Read from unit files only (no second state file that
could drift)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from unitgen.errors import NoSuchInstanceError
from unitgen.features.gateway.plan import Member
from unitgen.plan.record import Record, parse_record
from unitgen.targets.base import MARKER
from unitgen.targets.systemd.escape import env_file_value

__all__ = ["Installed", "config_dir", "installed_secret", "own_unit_names", "require", "scan",
           "secrets_dir", "unit_dir"]


def config_dir(scope: str) -> Path:
    """What the ``%E`` specifier means for that manager: /etc, or the user's config dir."""
    if scope == "user":
        return Path(os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config"))
    return Path("/etc")


def unit_dir(scope: str) -> Path:
    """Where unitgen installs units for the system or the user manager."""
    return config_dir(scope) / "systemd" / ("user" if scope == "user" else "system")


def secrets_dir(scope: str) -> Path:
    """Where secret files go: ``%E/unitgen/secrets`` of that manager."""
    return config_dir(scope) / "unitgen" / "secrets"


@dataclass
class Installed:
    """One installed instance: its files and its record (:mod:`unitgen.plan.record`)."""

    name: str
    files: dict[str, Path] = field(default_factory=dict)
    record: Record | None = None  # None: files of an older unitgen (deploy the spec again)

    @property
    def rec(self) -> Record:
        """The record, or an empty one for files an older unitgen wrote."""
        return self.record or Record(self.name)

    @property
    def backend(self) -> str:
        """The backend's name."""
        return self.rec.backend

    @property
    def public_host(self) -> str:
        """The public listen address."""
        return self.rec.public_host

    @property
    def public_port(self) -> int:
        """The public port (0: unknown)."""
        return self.rec.public_port

    @property
    def socket_ports(self) -> tuple[int, ...]:
        """Every port its socket unit holds (a gateway: + metrics)."""
        return self.rec.ports

    @property
    def private_port(self) -> int | None:
        """The loopback TCP port behind the proxy."""
        return self.rec.private_port

    @property
    def private_unix(self) -> str | None:
        """The private Unix socket, as a unit writes it (``%t/...``)."""
        return self.rec.private_unix("%t")

    @property
    def probe_target(self) -> str:
        """What the public readiness probe asks."""
        return self.rec.probe

    @property
    def probe_path(self) -> str:
        """The health path."""
        return self.rec.health

    @property
    def eager(self) -> bool:
        """Started at boot (else on the first connection)."""
        return self.rec.eager

    @property
    def gpus(self) -> tuple[str, ...]:
        """GPU UUIDs it is placed on."""
        return self.rec.gpus

    @property
    def gpu_share(self) -> bool:
        """Its GPUs may be shared."""
        return self.rec.gpu_share

    @property
    def member(self) -> Member | None:
        """The gateway member it is."""
        return self.rec.member

    @property
    def is_gateway(self) -> bool:
        """A gateway, not a model server."""
        return self.rec.is_gateway

    @property
    def container(self) -> str | None:
        """image = ...: its container's name."""
        return self.rec.container

    @property
    def image(self) -> str:
        """image = ...: the image."""
        return self.rec.image

    @property
    def swap_group(self) -> str | None:
        """The swap group it is a member of."""
        return self.rec.swap_group

    @property
    def server_unit(self) -> str:
        """The unit that runs the model server."""
        backend = f"{self.name}-backend.service"
        return backend if backend in self.files else f"{self.name}.service"

    @property
    def units(self) -> list[str]:
        """Unit file names (no secrets)."""
        return sorted(n for n in self.files if not n.endswith(".env"))


def own_unit_names(name: str) -> tuple[str, ...]:
    """The only unit file names instance ``name`` can have."""
    return (f"{name}.socket", f"{name}.service", f"{name}-backend.service")


def scan(directory: Path) -> dict[str, Installed]:
    """Every unitgen instance installed in ``directory``."""
    found: dict[str, Installed] = {}
    if not directory.is_dir():
        return found
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.suffix not in (".socket", ".service"):
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        name = _field(text, MARKER)
        # Only the instance's own unit names count: a copy of one of its units saved
        # under another name carries the marker too, and is the user's file.
        if name is None or path.name not in own_unit_names(name):
            continue
        inst = found.setdefault(name, Installed(name=name))
        inst.files[path.name] = path
        record = parse_record(text)
        if record is not None and record.name == name and inst.record is None:
            inst.record = record
    return found


def require(scope: str, names: list[str], hint: str = "") -> dict[str, Installed]:
    """The installed instances; UnitgenError naming any of ``names`` that is not one."""
    installed = scan(unit_dir(scope))
    missing = [n for n in names if n not in installed]
    if missing:
        raise NoSuchInstanceError(f"no unitgen instance named {', '.join(missing)} in "
                           f"{unit_dir(scope)}{hint}")
    return installed


def _field(text: str, prefix: str) -> str | None:
    # split on "\n" only: systemd does, and str.splitlines() would also split on
    # U+2028 and the like, which a spec value could smuggle into a Description=.
    for line in text.split("\n")[:10]:
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return None


def installed_secret(scope: str, name: str, variable: str) -> str | None:
    """An installed instance's secret (its API key), from its root-only secret
    file; None when it has none or the file cannot be read."""
    try:
        text = (secrets_dir(scope) / f"{name}.env").read_text(encoding="utf-8")
    except OSError:
        return None
    return env_file_value(text, variable)
