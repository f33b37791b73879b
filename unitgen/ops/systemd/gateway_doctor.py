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
from dataclasses import dataclass

from unitgen.ops.findings import Finding
from unitgen.plan.gateway import Member
from unitgen.targets.haproxy.render import CONFIG, FILES
from unitgen.targets.systemd.gateway import gateway_dir
from unitgen.targets.systemd.installed import Installed

__all__ = ["Configured", "configured", "gateway_findings", "member_findings", "units_to_ask"]

_BACKEND = re.compile(r"^backend\s+(\S+)\s*$")
_SERVER = re.compile(r"^\s+server\s+(\S+)\s+(\S+)")
_REDEPLOY = "deploy the gateway or its instances again (unitgen deploy): routes are rewritten"


@dataclass(frozen=True)
class Configured:
    """What a gateway's installed HAProxy files route: name -> (instance, address)."""

    routes: dict[str, tuple[tuple[str, str], ...]]


def configured(scope: str, name: str) -> Configured | None:
    """Read the installed configuration and route map (None: there is none)."""
    directory = gateway_dir(scope, name)
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


def units_to_ask(installed: dict[str, Installed], gateway: str) -> list[str]:
    """The socket units whose state the gateway's findings need."""
    return sorted(f"{n}.socket" for n, i in installed.items()
                  if i.member is not None and i.member.gateway == gateway)


def gateway_findings(scope: str, name: str, installed: dict[str, Installed],
                     sockets: dict[str, str]) -> list[Finding]:
    """Every route of gateway ``name``: where it leads and whether anything
    answers there. ``sockets``: socket unit -> its active state."""
    conf = configured(scope, name)
    if conf is None:
        return [Finding(False, f"gateway {name} has no HAProxy configuration in "
                               f"{gateway_dir(scope, name)}: {_REDEPLOY}")]
    members = {n: i.member for n, i in installed.items()
               if i.member is not None and i.member.gateway == name}
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
             sockets: dict[str, str]) -> str | None:
    m = members.get(inst)
    if m is None:
        return (f"{inst} is not installed (or no longer joins it): requests for it fail; "
                f"{_REDEPLOY}")
    if m.address != addr:
        return f"{inst} is reached at {addr} but its socket is {m.address}: {_REDEPLOY}"
    state = sockets.get(f"{inst}.socket", "unknown")
    if state != "active":
        return (f"{inst}.socket is {state}, so nothing holds {addr} (HAProxy answers 503): "
                f"start it (systemctl start {inst}.socket) or look at unitgen doctor {inst}")
    return None


def member_findings(inst: Installed, installed: dict[str, Installed]) -> list[Finding]:
    """An instance that joins a gateway: is that gateway deployed here?"""
    m = inst.member
    if m is None:
        return []
    gw = installed.get(m.gateway)
    if gw is None or not gw.is_gateway:
        return [Finding(False, f"{inst.name} joins gateway {m.gateway}, which is not deployed "
                               f"here: its names ({', '.join(m.names)}) are routed by nothing; "
                               f"deploy a gateway spec named {m.gateway} (docs/gateway.md)")]
    return [Finding(True, f"{inst.name} joins gateway {m.gateway} "
                          f"({gw.public_host}:{gw.public_port}) as {', '.join(m.names)}")]
