"""The record of an installed instance: one format for every target and feature.

Each file unitgen installs for an instance carries, in its header, one line

    # unitgen-record: {"name": "qwen2", "public": "0.0.0.0:8000", ...}

written from the planned instance and read back by :func:`parse_record`, the one
reader (Quadlet's model: the structure that writes is the structure that reads).
Nothing reads an installed file back by the wording of a template: the ports a
socket holds, the private endpoint, the probe, the GPU claims, the gateway an
instance joins, its swap group, its GPU pool terms and its container are all
fields here. The files stay the database (no second state file that could
drift), and a field a feature adds needs no parser per target.

The line is JSON with every non-ASCII character escaped, so it is one line in
any file format whose comments start with ``#`` (systemd units, supervisord's
INI files): nothing in it can end the line or be read as a setting.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from unitgen.features.gateway.plan import Member, member_of
from unitgen.inunit.poolfile import PoolTerms
from unitgen.plan.instance import RUNTIME_DIR, Instance
from unitgen.spec.argscan import find_options

__all__ = ["RECORD_PREFIX", "RUNTIME_TOKEN", "Record", "engine_metrics", "parse_record",
           "record_of"]

RECORD_PREFIX = "# unitgen-record: "
# How the manager's runtime directory is written inside a record (the plan's own
# token is a NUL-delimited word a reader would have to know by heart).
RUNTIME_TOKEN = "{runtime}"  # noqa: S105 - a path placeholder, not a secret
_VERSION = 1


@dataclass(frozen=True)
class Record:
    """What unitgen installed for one instance, as every target reads it back."""

    name: str
    kind: str = "instance"  # "instance" or "gateway"
    backend: str = ""
    public: str = ""  # the public listen address as a socket takes it: host:port, [v6]:port
    ports: tuple[int, ...] = ()  # every port its public side holds (a gateway: + its exporter)
    # the private endpoint the proxy forwards to: a Unix socket path (the runtime
    # directory as RUNTIME_TOKEN) or 127.0.0.1:PORT; "" when the server takes the
    # public socket itself
    private: str = ""
    probe: str = ""  # host:port the public readiness probe asks
    health: str = "/health"
    timeout: float = 0.0  # the readiness deadline ([health] timeout)
    key_env: str | None = None  # the variable holding the probe's key
    eager: bool = False
    gpus: tuple[str, ...] = ()  # GPU UUIDs it is placed on
    gpu_share: bool = False
    swap_group: str | None = None
    member: Member | None = None  # the gateway member it is
    container: str | None = None  # image = ...: its container's name
    image: str = ""
    pool: PoolTerms | None = None  # a GPU pool member's terms
    model: str = ""  # the model it serves, as its spec says
    metrics: str = ""  # the path its engine's Prometheus metrics answer at ("": none)

    @property
    def public_host(self) -> str:
        """The public listen address without the port (IPv6 unbracketed)."""
        return self.public.rpartition(":")[0].strip("[]")

    @property
    def public_port(self) -> int:
        """The public port (0 when unknown)."""
        port = self.public.rpartition(":")[2]
        return int(port) if port.isdigit() else 0

    @property
    def is_gateway(self) -> bool:
        """A gateway (HAProxy), not a model server."""
        return self.kind == "gateway"

    @property
    def private_port(self) -> int | None:
        """The private loopback port, when the server listens on one."""
        host, _, port = self.private.rpartition(":")
        if self.private.startswith("/") or RUNTIME_TOKEN in self.private or not host:
            return None
        return int(port) if port.isdigit() else None

    def private_unix(self, runtime: str) -> str | None:
        """The private Unix socket's path with the manager's runtime directory
        filled in (None when the server listens on TCP or takes its socket)."""
        if not self.private or self.private_port is not None:
            return None
        return self.private.replace(RUNTIME_TOKEN, runtime)

    def line(self) -> str:
        """The header line that carries this record (no newline)."""
        data: dict[str, Any] = {"v": _VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if value != f.default or f.name == "name":
                data[f.name] = asdict(value) if isinstance(value, Member | PoolTerms) else value
        return RECORD_PREFIX + json.dumps(data, ensure_ascii=True, separators=(", ", ": "))


def record_of(inst: Instance) -> Record:
    """The record of a planned instance (what its files say once installed)."""
    spec = inst.spec
    private = ""
    if inst.private is not None:
        private = inst.private.listen().replace(RUNTIME_DIR, RUNTIME_TOKEN)
    ports = [inst.public.port]
    if inst.gateway is not None and inst.gateway.metrics is not None:
        ports.append(inst.gateway.metrics[1])
    placement = inst.gpus
    return Record(
        name=spec.name,
        kind="gateway" if inst.gateway is not None else "instance",
        backend=spec.backend,
        public=inst.public.listen(),
        ports=tuple(ports),
        private=private,
        probe=inst.public.probe_target(),
        health=inst.health_path,
        timeout=inst.health_timeout,
        key_env=inst.probe_key_env,
        eager=spec.activation == "eager",
        gpus=placement.uuids if placement is not None else (),
        gpu_share=placement.share if placement is not None else False,
        swap_group=spec.swap_group,
        member=member_of(inst),
        container=inst.container.name if inst.container is not None else None,
        image=inst.container.image if inst.container is not None else "",
        pool=inst.pool,
        model=spec.model or "",
        metrics=engine_metrics(inst),
    )


def engine_metrics(inst: Instance) -> str:
    """Where the instance's server answers Prometheus scrapes ("": it does not,
    or unitgen does not know where): its backend's path, when its args turn them
    on (or they are always on)."""
    backend = inst.backend
    if not backend.metrics_path:
        return ""
    if backend.metrics_flag is not None and not find_options(
            inst.spec.args, (backend.metrics_flag,), backend.syntax):
        return ""
    return backend.metrics_path


def parse_record(text: str, *, lines: int = 12) -> Record | None:
    """The record in the header of an installed file's text (its first
    ``lines`` lines); None when there is none or it cannot be read (a file
    written by an older unitgen, a damaged one: nothing to act on)."""
    # split on "\n" only: systemd does, and str.splitlines() would also split on
    # U+2028 and the like
    for line in text.split("\n")[:lines]:
        if line.startswith(RECORD_PREFIX):
            try:
                data = json.loads(line[len(RECORD_PREFIX):])
                return _from_json(data)
            except (ValueError, TypeError, KeyError):
                return None
    return None


def _from_json(data: dict[str, Any]) -> Record | None:
    if not isinstance(data, dict) or data.get("v") != _VERSION:
        return None
    known = {f.name for f in fields(Record)}
    values = {k: v for k, v in data.items() if k in known}
    for key in ("ports", "gpus"):
        if key in values:
            values[key] = tuple(values[key])
    if values.get("member") is not None:
        m = dict(values["member"])
        values["member"] = Member(**{**m, "names": tuple(m["names"])})
    if values.get("pool") is not None:
        values["pool"] = PoolTerms(**values["pool"])
    rec = Record(**values)
    if not isinstance(rec.name, str) or not all(isinstance(p, int) for p in rec.ports):
        return None
    return rec
