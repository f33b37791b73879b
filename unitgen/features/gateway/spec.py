"""Gateway specs: a file with ``kind = "gateway"``. Its keys are declared here,
once, the way instance keys are in :mod:`unitgen.spec.keys`, and read with the
same readers (every problem with file and key)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Any

from unitgen.errors import SpecError
from unitgen.spec.keys import Key, Kind, by_name
from unitgen.spec.readers import READERS, Checker, kind_of

__all__ = ["GATEWAY_KEYS", "UPSTREAM_KEYS", "GatewaySpec", "UpstreamSpec", "is_gateway",
           "parse_gateway"]

_NAME_RE = r"[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?"
_DAY = 86400.0

GATEWAY_KEYS: tuple[Key, ...] = (
    Key("kind", Kind.TEXT, "`\"gateway\"`: this file is a gateway, not an instance",
        required=True, pattern="gateway", pattern_doc="is \"gateway\" here"),
    Key("name", Kind.TEXT, "gateway name; its units are `<name>.socket`, `<name>.service`",
        required=True, pattern=_NAME_RE,
        pattern_doc="must be 1-48 lowercase letters, digits or '-', not starting or ending "
                    "with '-'"),
    Key("description", Kind.TEXT, "free text shown in the units' `Description=`"),
    Key("host", Kind.TEXT, "listen address, an IP literal", default="127.0.0.1"),
    Key("port", Kind.INTEGER, "the one port clients use (owned by the socket)",
        required=True, lo=1, hi=65535),
    Key("api_keys_file", Kind.PATH, "a file of API keys, one a line, each alone or with "
        "`name=`, `models=`, `rpm=`, `in_flight=` (root's, mode 0600; docs/gateway.md): a "
        "request without `Authorization: Bearer <one of them>` gets 401"),
    Key("metrics", Kind.TEXT, "`HOST:PORT` of HAProxy's Prometheus exporter (`/metrics`): a "
        "loopback address, unless `metrics_keys_file` is set"),
    Key("metrics_keys_file", Kind.PATH, "a file of keys, one a line (root's, mode 0600): "
        "`/metrics` then wants `Authorization: Bearer <one of them>` (401 otherwise)"),
    Key("max_body", Kind.SIZE, "the largest request body routed by its `model` (HAProxy "
        "reads all of it; each request in flight holds a buffer this big)",
        default=1 << 20, lo=16 << 10, hi=64 << 20,
        bounds_why="below 16 KiB a chat request hardly fits; above 64 MiB a buffer per "
                   "request in flight costs more than it routes"),
    Key("max_connections", Kind.INTEGER, "connections HAProxy holds at once (`maxconn`)",
        default=1024, lo=1, hi=1_000_000),
    Key("client_timeout", Kind.DURATION, "while an answer streams: close a client that "
        "neither sends nor reads for this long",
        default=600.0, lo=1, hi=_DAY),
    Key("request_timeout", Kind.DURATION, "the time a client has to send a whole request, "
        "head and body (then 408): a client that trickles one holds its connection no "
        "longer; an idle kept-alive connection is closed after it too", default=30.0, lo=1,
        hi=3600),
    Key("max_connections_per_client", Kind.INTEGER, "connections one client address may hold "
        "at once (more are closed at once); default: half of `max_connections`",
        lo=1, hi=1_000_000),
    Key("upstreams", Kind.TABLES, "instances on other hosts this gateway routes to: a list of "
        "tables with the keys of `UPSTREAM_KEYS` (`[[upstreams]]`; docs/gateway.md)",
        default=()),
)

# One upstream: an instance another host runs, as the gateway reaches it. The
# keys an instance spec already has (its name, aliases and bounds at the
# gateway) are the instance keys themselves, so their rules are written once.
UPSTREAM_KEYS: tuple[Key, ...] = (
    Key("node", Kind.TEXT, "the host that runs it (an inventory name); with `name` it names "
        "the HAProxy server `<node>_<name>`, which the runtime API drains",
        required=True, pattern=r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,62})",
        pattern_doc="must be a host name: letters, digits, '.' and '-', at most 63, "
                    "no '_' (it separates the node from the name in server names)"),
    replace(by_name("name"), required=True, doc="the instance's name on that host: a route "
            "name (the instance name rules)"),
    Key("address", Kind.TEXT, "`HOST:PORT` the gateway connects to (an IP literal: the "
        "host's address and the port its instance got)", required=True),
    by_name("aliases"),
    by_name("max_concurrent"),
    by_name("queue_timeout"),
    by_name("balance"),
    Key("wait", Kind.DURATION, "how long an answer may take to start (the instance's load "
        "deadline)", default=1800.0, lo=1, hi=_DAY),
    Key("on_demand", Kind.BOOLEAN, "the instance starts on its first request: the gateway "
        "never health-checks it actively (a check would wake it)", default=False),
    Key("api_key_file", Kind.PATH, "a file holding the instance's own API key, one line "
        "(root's, mode 0600): a gateway with `api_keys_file` sends it in place of its "
        "clients' keys"),
)


def _default(name: str) -> Any:  # noqa: ANN401 - typed by each field
    """A gateway key's declared default: the one place it is written."""
    return next(k.default for k in GATEWAY_KEYS if k.name == name)


def _up_default(name: str) -> Any:  # noqa: ANN401 - typed by each field
    return next(k.default for k in UPSTREAM_KEYS if k.name == name)


@dataclass(frozen=True)
class UpstreamSpec:
    """An instance on another host that a gateway routes to."""

    node: str
    name: str
    address: str
    aliases: tuple[str, ...] = _up_default("aliases")
    max_concurrent: int | None = None
    queue_timeout: float = _up_default("queue_timeout")
    balance: str = _up_default("balance")
    wait: float = _up_default("wait")
    on_demand: bool = _up_default("on_demand")
    api_key_file: str | None = None

    @property
    def server(self) -> str:
        """Its HAProxy server name, the same in every backend it is in."""
        return f"{self.node}_{self.name}"


@dataclass(frozen=True)
class GatewaySpec:
    """A validated gateway spec."""

    source: str
    name: str
    port: int
    host: str = _default("host")
    description: str | None = None
    api_keys_file: str | None = None
    metrics: str | None = None
    metrics_keys_file: str | None = None
    max_body: int = _default("max_body")
    max_connections: int = _default("max_connections")
    client_timeout: float = _default("client_timeout")
    request_timeout: float = _default("request_timeout")
    max_connections_per_client: int | None = None
    upstreams: tuple[UpstreamSpec, ...] = ()


def is_gateway(data: dict[str, Any]) -> bool:
    """A spec mapping that says it is a gateway."""
    return data.get("kind") == "gateway"


def _address(c: Checker, key: str, value: str | None) -> None:
    if value is None:
        return
    host, sep, port = value.rpartition(":")
    v6 = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if v6 else host)
        # the spelling HAProxy's server and bind lines take (the renderer's check):
        # IPv6 in brackets, no scope id, ASCII digits
        ok = (bool(sep) and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
              and (ip.version == 6) == v6 and "%" not in host)
    except ValueError:
        ok = False
    if not ok:
        c.add(key, f"{value!r} is not HOST:PORT with an IP literal (e.g. \"127.0.0.1:9101\", "
                   "\"[fd00::2]:8000\")")


def _metrics_reach(c: Checker, metrics: str | None, keys: str | None) -> None:
    """The exporter shows HAProxy's version and every route and server to whoever
    asks: beyond loopback, only to a client with a key."""
    if metrics is None or keys is not None or any(p.key == "metrics" for p in c.problems):
        return
    host = metrics.rpartition(":")[0].strip("[]")
    if not ipaddress.ip_address(host).is_loopback:
        c.add("metrics", f"{metrics!r} is reachable from other hosts, and the exporter shows "
                         "HAProxy's version and every route and server to whoever asks: "
                         f"listen on loopback (\"127.0.0.1:{metrics.rpartition(':')[2]}\") and "
                         "scrape through it, or set metrics_keys_file")


def parse_gateway(data: dict[str, Any], source: str) -> GatewaySpec:
    """Validate a gateway spec given as a mapping; SpecError with every problem."""
    c = Checker(source)
    c.unknown_keys(data, tuple(k.name for k in GATEWAY_KEYS), "")
    values: dict[str, Any] = {}
    for key in GATEWAY_KEYS:
        if key.name == "upstreams":
            values[key.name] = _upstreams(c, data.get(key.name, []))
        elif key.name in data:
            values[key.name] = READERS[key.kind](c, key, data[key.name])
        elif key.required:
            c.add(key.name, f"is required: {key.doc}")
    if values.get("host") is not None:
        try:
            ipaddress.ip_address(values["host"])
        except ValueError:
            c.add("host", f"{values['host']!r} is not an IP literal")
    _address(c, "metrics", values.get("metrics"))
    _metrics_reach(c, values.get("metrics"), values.get("metrics_keys_file"))
    if c.problems:
        raise SpecError(problems=c.problems)
    fields = {k.name: values[k.name] for k in GATEWAY_KEYS
              if k.name != "kind" and values.get(k.name) is not None}
    return GatewaySpec(source=source, **fields)


def _upstreams(c: Checker, value: object) -> tuple[UpstreamSpec, ...]:
    """``upstreams``: a list of tables, each read with :data:`UPSTREAM_KEYS`
    (problems named ``upstreams[i].key``); no server twice."""
    if not isinstance(value, list):
        c.add("upstreams", f"must be a list of tables ([[upstreams]]), not {kind_of(value)}")
        return ()
    out: list[UpstreamSpec] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        where = f"upstreams[{i}]"
        if not isinstance(item, dict):
            c.add(where, f"must be a table with node, name and address, not {kind_of(item)}")
            continue
        before = len(c.problems)
        c.unknown_keys(item, tuple(k.name for k in UPSTREAM_KEYS), f"{where}.")
        fields: dict[str, Any] = {}
        for key in UPSTREAM_KEYS:
            if key.name in item:
                fields[key.name] = READERS[key.kind](c, replace(key, name=f"{where}.{key.name}"),
                                                     item[key.name])
            elif key.required:
                c.add(f"{where}.{key.name}", f"is required: {key.doc}")
        _address(c, f"{where}.address", fields.get("address"))
        if len(c.problems) > before:
            continue
        up = UpstreamSpec(**{k: v for k, v in fields.items() if v is not None})
        if up.server in seen:
            c.add(f"{where}", f"{up.name!r} on node {up.node!r} is also upstreams[{seen[up.server]}]")
            continue
        seen[up.server] = i
        out.append(up)
    return tuple(out)
