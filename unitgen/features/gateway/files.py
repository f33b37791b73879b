"""A gateway's installed files, the same for every target: its HAProxy
configuration and the files it names (:mod:`unitgen.features.gateway.render`),
and the settings that render them again when members change (its members on
other hosts are in no installed unit here: they are kept with the settings).
Where the files go and where HAProxy reads them is the target's
(:class:`GatewayPaths`)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from unitgen.errors import Problem, SpecError
from unitgen.features.gateway.plan import (
    GatewayPlan,
    GatewaySettings,
    Member,
    balance_problems,
    route_keys,
)
from unitgen.features.gateway.render import GatewayPaths, member_keys_map, render_gateway
from unitgen.targets.base import RenderedFile

__all__ = ["SETTINGS", "gateway_files", "member_keys_secret", "read_settings"]

SETTINGS = "gateway.json"  # what re-renders the configuration when its members change


def member_keys_secret(name: str) -> str:
    """The name of gateway ``name``'s secret file (with the instances' secrets):
    the keys it sends its members, which every target copies for HAProxy."""
    return f"{name}.env"


def gateway_files(name: str, plan: GatewayPlan, paths: GatewayPaths, prefix: str,
                  where: tuple[str, str]) -> list[RenderedFile]:
    """A gateway's files as config files named ``prefix/<file>``, and the keys it
    sends its members as its secret file ``<name>.env`` (mode 0600). SpecError
    (naming ``where``: file and key) when it cannot send each set of replicas
    its key, or replicas that disagree on their balance."""
    member_keys, problems = route_keys(plan)
    problems += balance_problems(plan)
    if problems:
        raise SpecError(problems=[Problem(*where, p) for p in problems])
    files = [RenderedFile(f"{prefix}/{f.name}", f.text, config=True)
             for f in render_gateway(plan.settings, plan.routes, paths, keyed=set(member_keys))]
    files.append(RenderedFile(member_keys_secret(name), member_keys_map(name, member_keys),
                              secret=True))
    settings = {"settings": asdict(plan.settings),
                "metrics": list(plan.metrics) if plan.metrics else None,
                "upstreams": [asdict(m) for m in plan.members if m.remote]}
    files.append(RenderedFile(f"{prefix}/{SETTINGS}", json.dumps(settings, indent=1) + "\n",
                              config=True))
    return files


def read_settings(directory: Path) -> GatewayPlan | None:
    """An installed gateway's settings and its members on other hosts (None:
    none, or unreadable)."""
    try:
        data = json.loads((directory / SETTINGS).read_text(encoding="utf-8"))
        metrics = data.get("metrics")
        ups = tuple(Member(**{**m, "names": tuple(m["names"])})
                    for m in data.get("upstreams", []))
        return GatewayPlan(GatewaySettings(**data["settings"]), ups,
                           tuple(metrics) if metrics else None)
    except (OSError, ValueError, TypeError, KeyError):
        return None
