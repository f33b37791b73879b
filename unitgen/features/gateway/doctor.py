"""doctor, for gateways and their members: where each route of a gateway's
HAProxy configuration (what it does now) leads, compared with the instances
installed (what it should do), and why a route points nowhere.

A route points nowhere when its configuration names an instance that is gone
(its units removed by hand), reaches it at an address it no longer has, or
reaches a socket the manager does not hold (requests for it fail); an instance
points nowhere when it joins a gateway that is not deployed. Each finding says
the fix."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from unitgen.features.base import InstalledLike
from unitgen.features.gateway.plan import Member
from unitgen.features.gateway.render import CONFIG, FILES
from unitgen.ops.findings import Finding

__all__ = ["Configured", "SocketState", "configured", "gateway_findings", "member_findings",
           "members_of"]

_BACKEND = re.compile(r"^backend\s+(\S+)\s*$")
_SERVER = re.compile(r"^\s+server\s+(\S+)\s+(\S+)")
_REDEPLOY = "deploy the gateway or its instances again (unitgen deploy): routes are rewritten"


@dataclass(frozen=True)
class SocketState:
    """What holds an instance's public socket, as its target names it."""

    holder: str  # e.g. "qwen2.socket"
    state: str  # "active" when it holds the port
    start: str = ""  # the command that starts it


@dataclass(frozen=True)
class Configured:
    """What a gateway's installed HAProxy files route: name -> (instance, address)."""

    routes: dict[str, tuple[tuple[str, str], ...]]


def configured(directory: Path) -> Configured | None:
    """Read the installed configuration and route map (None: there is none)."""
    try:
        cfg = (directory / CONFIG).read_text(encoding="utf-8")
        route_map = (directory / FILES["routes"]).read_text(encoding="utf-8")
    except OSError:
        return None
    servers: dict[str, list[tuple[str, str]]] = {}
    backend = ""
    for line in cfg.splitlines():
        if m := _BACKEND.match(line):
            backend = m.group(1)
        elif (m := _SERVER.match(line)) and backend:
            servers.setdefault(backend, []).append((m.group(1), m.group(2)))
    routes: dict[str, tuple[tuple[str, str], ...]] = {}
    for line in route_map.splitlines():
        route, _, backend = line.partition(" ")
        if route:
            routes[route] = tuple(servers.get(backend.strip(), ()))
    return Configured(routes)


def members_of(installed: Mapping[str, InstalledLike], gateway: str) -> dict[str, Member]:
    """The installed instances that join ``gateway``, by name."""
    return {n: m for n, i in installed.items()
            if (m := i.rec.member) is not None and m.gateway == gateway}


def gateway_findings(directory: Path, name: str, installed: Mapping[str, InstalledLike],
                     sockets: Mapping[str, SocketState]) -> list[Finding]:
    """Every route of gateway ``name`` (its files in ``directory``): where it
    leads and whether anything answers there. ``sockets``: instance -> the state
    of what holds its public socket."""
    conf = configured(directory)
    if conf is None:
        return [Finding(False, f"gateway {name} has no HAProxy configuration in "
                               f"{directory}: {_REDEPLOY}")]
    members = members_of(installed, name)
    out: list[Finding] = []
    for route, servers in sorted(conf.routes.items()):
        why = [_why_not(inst, addr, members, sockets) for inst, addr in servers]
        good = [inst for (inst, _), w in zip(servers, why, strict=True) if w is None]
        bad = [w for w in why if w is not None]
        if good and not bad:
            out.append(Finding(True, f"route {route} -> {', '.join(good)}"))
        elif good:
            out.append(Finding(False, f"route {route} -> {', '.join(good)}; and "
                                      + "; ".join(bad)))
        else:
            out.append(Finding(False, f"route {route} points nowhere: "
                                      + ("; ".join(bad) or "no instance")))
    for inst, m in sorted(members.items()):
        missing = [n for n in m.names if inst not in {s for s, _ in conf.routes.get(n, ())}]
        if missing:
            out.append(Finding(False, f"{inst} joins gateway {name} but its configuration does "
                                      f"not route {', '.join(missing)} to it: {_REDEPLOY}"))
    if not conf.routes and not members:
        out.append(Finding(True, f"gateway {name} has no routes yet: instances join it with "
                                 f'gateway = "{name}"'))
    return out


def _why_not(inst: str, addr: str, members: dict[str, Member],
             sockets: Mapping[str, SocketState]) -> str | None:
    m = members.get(inst)
    if m is None:
        return (f"{inst} is not installed (or no longer joins it): requests for it fail; "
                f"{_REDEPLOY}")
    if m.address != addr:
        return f"{inst} is reached at {addr} but its socket is {m.address}: {_REDEPLOY}"
    holder = sockets.get(inst, SocketState(f"{inst}'s socket", "unknown", ""))
    if holder.state != "active":
        start = f" ({holder.start})" if holder.start else ""
        return (f"{holder.holder} is {holder.state}, so nothing holds {addr} (HAProxy answers "
                f"503): start it{start} or look at unitgen doctor {inst}")
    return None


def member_findings(inst: InstalledLike, installed: Mapping[str, InstalledLike]) -> list[Finding]:
    """An instance that joins a gateway: is that gateway deployed here?"""
    m = inst.rec.member
    if m is None:
        return []
    gw = installed.get(m.gateway)
    if gw is None or not gw.rec.is_gateway:
        return [Finding(False, f"{inst.name} joins gateway {m.gateway}, which is not deployed "
                               f"here: its names ({', '.join(m.names)}) are routed by nothing; "
                               f"deploy a gateway spec named {m.gateway} (docs/gateway.md)")]
    return [Finding(True, f"{inst.name} joins gateway {m.gateway} "
                          f"({gw.rec.public}) as {', '.join(m.names)}")]
