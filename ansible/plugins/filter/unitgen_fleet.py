# Copyright: unitgen contributors
# Apache-2.0 (see the project's pyproject.toml)
"""Filters that turn the model servers' registered ``unitgen_status`` into a
gateway's ``upstreams`` (run on the controller).

``hosts | unitgen.unitgen.gateway_upstreams(hostvars)``: for each host, each
instance of its ``unitgen_status`` (gateways excepted) becomes an upstream
with ``node`` (``gateway_node``), ``name``, ``address`` (the host's
``unitgen_address``, else ``ansible_host``, else its name, with the port the
instance got) and, from the host's ``unitgen_instances`` item, ``aliases``,
``max_concurrent``, ``queue_timeout``, ``wait`` (its ``health.timeout``) and
``on_demand`` (``activation: on-demand``); in check mode also the instances
the deploy would create. A host without ``unitgen_status``
is an error, never silently dropped from the routes.

The node name of a host is written here once: the gateway names each server
``<node>_<instance>`` and the drain step of the host addresses the same name."""

from __future__ import annotations

import re
from typing import Any

from ansible.errors import AnsibleFilterError

_NOT_IN_NODE = re.compile(r"[^A-Za-z0-9.-]")


def gateway_node(host: str) -> str:
    """The node name of an inventory host: its name with every character a
    server name cannot hold (``_`` separates node and instance) as ``-``."""
    return _NOT_IN_NODE.sub("-", str(host))[:63].strip("-.") or "host"


def gateway_upstreams(hosts: list[str], hostvars: Any) -> list[dict[str, Any]]:  # noqa: ANN401
    """The upstreams of a gateway routing to every instance of ``hosts``."""
    out: list[dict[str, Any]] = []
    nodes: dict[str, str] = {}
    for host in hosts:
        node = gateway_node(host)
        if nodes.setdefault(node, host) != host:
            # a drain of one would drain the other: its servers share the prefix
            raise AnsibleFilterError(f"{nodes[node]} and {host} have one node name in the "
                                     f"gateways ({node}): rename one inventory host")
        hv = hostvars[host]
        status = hv.get("unitgen_status")
        if not status or "instances" not in status:
            raise AnsibleFilterError(f"{host} has no unitgen_status: the gateways route to what the "
                             "role found running there, so run the model servers' play "
                             "(the role) for it in the same run")
        specs = {s.get("name"): s for s in hv.get("unitgen_instances") or []}
        address = hv.get("unitgen_address") or hv.get("ansible_host") or host
        for row in [*status["instances"], *_planned(hv, status)]:
            if row.get("backend") == "gateway" or row.get("port") is None:
                continue
            _reachable(host, str(address), row)
            out.append(_upstream(gateway_node(host), str(address), row, specs.get(row["name"], {})))
    return out


def _planned(hv: Any, status: dict[str, Any]) -> list[dict[str, Any]]:  # noqa: ANN401
    """Instances the role's deploy would create but that do not run yet: in
    check mode, so that ``--check --diff`` shows the gateway's new routes
    (with the port the dry run would give them)."""
    running = {r.get("name") for r in status["instances"]}
    results = (hv.get("unitgen_deployed") or {}).get("results") or []
    return [{"name": r["item"], "port": r.get("port")} for r in results
            if isinstance(r, dict) and r.get("item") not in running
            and str(r.get("action", "")).startswith("would-") and r.get("action") != "would-remove"]


def _upstream(node: str, address: str, row: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    host = f"[{address}]" if ":" in address else address
    up: dict[str, Any] = {"node": node, "name": row["name"], "address": f"{host}:{row['port']}",
                          "aliases": list(spec.get("aliases") or []),
                          "on_demand": _on_demand(row, spec)}
    for key in ("max_concurrent", "queue_timeout"):
        if spec.get(key) is not None:
            up[key] = spec[key]
    timeout = (spec.get("health") or {}).get("timeout")
    if timeout is not None:
        up["wait"] = timeout
    return up


def _reachable(host: str, address: str, row: dict[str, Any]) -> None:
    """An instance listens where the gateways reach it: on every address of its
    host, or on the one they use. One on loopback (the spec's default host) is
    out of their reach: say so instead of routing to a port that refuses."""
    listens = str(row.get("host") or str(row.get("address") or "").rpartition(":")[0]).strip("[]")
    if listens and listens not in ("0.0.0.0", "::", address.strip("[]")):  # noqa: S104 - a listen address read back, not bound
        raise AnsibleFilterError(
            f"{host}: instance {row.get('name')} listens on {listens}, which the gateways "
            f"cannot reach at {address}: set host = \"0.0.0.0\" (or {address}) in its spec, "
            "or unitgen_address for the host")


def _on_demand(row: dict[str, Any], spec: dict[str, Any]) -> bool:
    """Whether the gateway must leave it alone (no active check: a check's
    connection would start its model). From its spec when the role lists it,
    else from its status; unknown counts as on-demand (a missing check costs
    a retry, a wrong one keeps a model loaded)."""
    if spec:
        return bool(spec.get("activation", "eager") == "on-demand")
    return row.get("activation") != "eager"


class FilterModule:
    """unitgen's filters."""

    def filters(self) -> dict[str, Any]:
        """Name -> function."""
        return {"gateway_upstreams": gateway_upstreams, "gateway_node": gateway_node}
