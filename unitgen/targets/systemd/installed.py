"""The installed units are the database: which instances exist, which ports they
own, which files are ours. Read from unit files only (no second state file that
could drift)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from unitgen.errors import NoSuchInstanceError
from unitgen.plan.gateway import Member
from unitgen.targets.systemd.render import MARKER

__all__ = ["Installed", "gpu_claims", "own_unit_names", "parse_member", "require", "scan",
           "secrets_dir", "unit_dir"]


def _config_dir(scope: str) -> Path:
    """What the ``%E`` specifier means for that manager: /etc, or the user's config dir."""
    if scope == "user":
        return Path(os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config"))
    return Path("/etc")


def unit_dir(scope: str) -> Path:
    """Where unitgen installs units for the system or the user manager."""
    return _config_dir(scope) / "systemd" / ("user" if scope == "user" else "system")


def secrets_dir(scope: str) -> Path:
    """Where secret files go: ``%E/unitgen/secrets`` of that manager."""
    return _config_dir(scope) / "unitgen" / "secrets"


@dataclass
class Installed:
    """One installed instance as its unit files describe it."""

    name: str
    files: dict[str, Path] = field(default_factory=dict)
    backend: str = ""
    public_host: str = ""
    public_port: int = 0
    private_port: int | None = None  # loopback TCP behind the proxy
    private_unix: str | None = None
    probe_target: str = ""  # what <name>.service's ExecStartPost probes
    probe_path: str = "/health"
    eager: bool = False
    gpus: tuple[str, ...] = ()
    gpu_share: bool = False
    member: Member | None = None  # the gateway member it is (unitgen-member: header)
    is_gateway: bool = False
    socket_ports: tuple[int, ...] = ()  # every port its socket unit holds (a gateway: + metrics)
    container: str | None = None  # image = ...: its container's name (unitgen-container:)
    image: str = ""

    @property
    def server_unit(self) -> str:
        """The unit that runs the model server."""
        backend = f"{self.name}-backend.service"
        return backend if backend in self.files else f"{self.name}.service"

    @property
    def units(self) -> list[str]:
        """Unit file names (no secrets)."""
        return sorted(n for n in self.files if not n.endswith(".env"))


_LISTEN = re.compile(r"^ListenStream=\[?([^\]\s]*?)\]?:(\d+)\s*$", re.M)
_TARGET = re.compile(r"--target\s+\"?(\S+?)\"?\s+--path\s+(\S+).*--label public")


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
        inst.backend = _field(text, "# unitgen-backend: ") or inst.backend
        inst.is_gateway = inst.is_gateway or _field(text, "# unitgen-kind: ") == "gateway"
        member = _field(text, "# unitgen-member: ")
        if member and inst.member is None:
            inst.member = parse_member(name, member)
        container = _field(text, "# unitgen-container: ")
        if container:
            inst.container, _, inst.image = container.partition(" ")
        gpus = _field(text, "# unitgen-gpus: ")
        if gpus:
            uuids, _, mode = gpus.partition(" ")
            inst.gpus, inst.gpu_share = tuple(uuids.split(",")), mode == "shared"
        if path.name == f"{name}.socket":
            m = _LISTEN.search(text)
            if m:
                inst.public_host, inst.public_port = m.group(1), int(m.group(2))
            inst.socket_ports = tuple(int(p) for _, p in _LISTEN.findall(text))
        elif path.name == f"{name}.service":
            inst.eager = "\n[Install]\n" in text
            m = _TARGET.search(text)
            if m:
                inst.probe_target, inst.probe_path = m.group(1), m.group(2)
            proxy = re.search(r"^ExecStart=\S*(?:systemd-socket-proxyd|"
                              r" -I -m unitgen\.inunit\.swapproxy) .*? (\"?)(\S+)\1$", text, re.M)
            if proxy:
                target = proxy.group(2)
                if target.startswith("127.0.0.1:"):
                    inst.private_port = int(target.rsplit(":", 1)[1])
                else:
                    inst.private_unix = target
    return found


def require(scope: str, names: list[str], hint: str = "") -> dict[str, Installed]:
    """The installed instances; UnitgenError naming any of ``names`` that is not one."""
    installed = scan(unit_dir(scope))
    missing = [n for n in names if n not in installed]
    if missing:
        raise NoSuchInstanceError(f"no unitgen instance named {', '.join(missing)} in "
                           f"{unit_dir(scope)}{hint}")
    return installed


def gpu_claims(installed: dict[str, Installed]) -> dict[str, list[tuple[str, bool]]]:
    """GPU UUID -> the instances placed there and whether each shares."""
    claims: dict[str, list[tuple[str, bool]]] = {}
    for inst in installed.values():
        for uuid in inst.gpus:
            claims.setdefault(uuid, []).append((inst.name, inst.gpu_share))
    return claims


def _field(text: str, prefix: str) -> str | None:
    # split on "\n" only: systemd does, and str.splitlines() would also split on
    # U+2028 and the like, which a spec value could smuggle into a Description=.
    for line in text.split("\n")[:10]:
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    return None


def parse_member(name: str, text: str) -> Member | None:
    """A gateway member from its header line (``gw=G names=a,b address=H:P max=N
    wait=S queue=S on-demand=yes``); None when it cannot be read."""
    fields = dict(word.partition("=")[::2] for word in text.split())
    try:
        return Member(instance=name, address=fields["address"],
                      names=tuple(fields["names"].split(",")),
                      max_concurrent=int(fields["max"]) or None, wait=float(fields["wait"]),
                      queue_timeout=float(fields["queue"]),
                      on_demand=fields.get("on-demand") == "yes", gateway=fields["gw"],
                      key_env=fields.get("key") or None)
    except (KeyError, ValueError):
        return None
