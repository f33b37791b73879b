"""Prometheus file-based service discovery (``file_sd_configs``) for a host:
every always-on instance whose engine exports metrics, and every gateway's
exporter, with the labels a dashboard groups by (``instance``, ``backend``,
``model``, ``gateway``, ``node``). Rewritten by every ``deploy`` and ``remove``
(docs/gateway.md, "Metrics").

An on-demand instance (a swap-group member is one) is never listed: any
connection to its socket starts its model, so a scrape every 15 s would keep
it loaded for ever. What its requests did is in its gateway's exporter, which
HAProxy answers itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from unitgen.plan.record import Record

__all__ = ["DISCOVERY", "KEYS_PATH", "discovery_json", "targets"]

DISCOVERY = "unitgen.json"  # in the manager's unitgen/prometheus/ directory
KEYS_PATH = "/metrics/keys"  # a gateway's counters per key (its unitgen.lua)


def targets(records: Iterable[Record], exporters: Mapping[str, tuple[str, int]],
            node: str, keyed: Iterable[str] = (), counted: Iterable[str] = (),
            ) -> list[dict[str, object]]:
    """One target group per scrape target: the engines of eager instances (at
    the address their probe asks) and the gateways' exporters (``exporters``:
    gateway -> its listen address; ``keyed``: those whose ``/metrics`` wants a
    key, labelled ``auth="bearer"`` so a scrape job with credentials keeps them;
    ``counted``: those with API keys, whose counters per key answer at
    ``/metrics/keys`` beside HAProxy's own, a target of its own)."""
    out: list[dict[str, object]] = []
    locked, per_key = set(keyed), set(counted)
    for rec in sorted(records, key=lambda r: r.name):
        if rec.is_gateway:
            if rec.name not in exporters:
                continue
            host, port = exporters[rec.name]
            labels = {"instance": rec.name, "backend": "haproxy", "gateway": rec.name,
                      "node": node}
            if rec.name in locked:
                labels["auth"] = "bearer"
            out.append({"targets": [_target(host, port)], "labels": labels})
            if rec.name in per_key:
                out.append({"targets": [_target(host, port)],
                            "labels": {**labels, "__metrics_path__": KEYS_PATH}})
        elif rec.eager and rec.metrics and rec.probe:
            labels = {"instance": rec.name, "backend": rec.backend, "model": rec.model,
                      "gateway": rec.member.gateway if rec.member is not None else "",
                      "node": node, "__metrics_path__": rec.metrics}
            out.append({"targets": [rec.probe], "labels": labels})
    return out


def _target(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind is scraped on loopback
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def discovery_json(groups: list[dict[str, object]]) -> str:
    """The file's text (Prometheus reads a JSON list of target groups)."""
    return json.dumps(groups, indent=1, sort_keys=True) + "\n"
