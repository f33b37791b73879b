"""Reading back what unitgen installed in a supervisord include directory: the
conf files are the database (their header says instance, ports and probe)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unitgen.errors import NoSuchInstanceError
from unitgen.targets.supervisor.render import MARKER

__all__ = ["InstalledConf", "require", "scan"]


@dataclass(frozen=True)
class InstalledConf:
    """One instance's conf file, as its header describes it."""

    name: str
    path: Path
    public: str  # host:port
    private: str  # listen address, or a sentence for socket-activated servers
    health_path: str
    timeout: float
    key_env: str | None
    gpus: tuple[str, ...] = ()
    gpu_share: bool = False
    backend: str = ""

    @property
    def public_host(self) -> str:
        """The public listen address."""
        return self.public.rpartition(":")[0].strip("[]")

    @property
    def public_port(self) -> int:
        """The public port."""
        return int(self.public.rpartition(":")[2])

    @property
    def private_port(self) -> int | None:
        """The private loopback port, when the server listens on one."""
        host, _, port = self.private.rpartition(":")
        return int(port) if host and port.isdigit() and not self.private.startswith("/") else None

    @property
    def uses_proxy(self) -> bool:
        """True when a proxy forwards the public socket to a private endpoint."""
        return not self.private.startswith("(")

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
        host, _, port = self.public.rpartition(":")
        return f"{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"  # noqa: S104


def read_header(path: Path) -> dict[str, str] | None:
    """The ``# unitgen-KEY: value`` lines of a file unitgen wrote, else None."""
    try:
        head = path.read_bytes()[:8192].decode("utf-8", "replace")
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in head.split("\n"):
        if line.startswith("# unitgen-") and ": " in line:
            key, _, value = line[len("# unitgen-"):].partition(": ")
            fields[key] = value
        elif line.startswith("["):
            break
    if "instance" not in fields or not any(line.startswith(MARKER) for line in head.split("\n")):
        return None
    return fields


def scan(conf_dir: Path) -> dict[str, InstalledConf]:
    """Every instance whose conf file unitgen wrote in ``conf_dir``."""
    out: dict[str, InstalledConf] = {}
    if not conf_dir.is_dir():
        return out
    for path in sorted(conf_dir.glob("unitgen-*.conf")):
        fields = read_header(path)
        if fields is None:
            continue
        try:
            out[fields["instance"]] = InstalledConf(
                name=fields["instance"], path=path, public=fields["public"],
                private=fields.get("private", ""), health_path=fields.get("health", "/health"),
                timeout=float(fields.get("timeout", "1800")), key_env=fields.get("key-env"),
                gpus=tuple(fields["gpus"].split(" ")[0].split(",")) if fields.get("gpus") else (),
                gpu_share=fields.get("gpus", "").endswith(" shared"),
                backend=fields.get("backend", ""),
            )
        except (KeyError, ValueError):
            continue  # an older or damaged header: not something to act on
    return out


def require(conf_dir: Path, names: list[str]) -> dict[str, InstalledConf]:
    """The named instances; NoSuchInstanceError (bad input, exit 2, as for the
    systemd target) naming the missing ones."""
    found = scan(conf_dir)
    missing = [n for n in names if n not in found]
    if missing:
        known = ", ".join(sorted(found)) or "none"
        raise NoSuchInstanceError(f"no unitgen instance {', '.join(missing)} in {conf_dir} "
                           f"(installed: {known})")
    return {n: found[n] for n in names}
