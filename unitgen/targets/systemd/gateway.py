"""A gateway's files for the systemd target: its socket (and the exporter's),
its HAProxy service, the HAProxy configuration with the files it answers
with (rendered by :mod:`unitgen.targets.haproxy`, the same for every target),
and the secret file of the API keys it sends its members."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

from unitgen.errors import Problem, SpecError
from unitgen.plan.gateway import GatewayPlan, route_keys
from unitgen.plan.instance import CONFIG_DIR, RUNTIME_DIR, Instance
from unitgen.targets.base import RenderedFile
from unitgen.targets.haproxy.render import (
    MEMBER_KEYS,
    GatewayPaths,
    member_keys_map,
    render_gateway,
)
from unitgen.targets.systemd.contexts import RenderContext

__all__ = ["SETTINGS", "config_root", "gateway_dir", "gateway_files", "keys_copy_cmd",
           "render_gateway_files", "runtime_root"]

SETTINGS = "gateway.json"  # what re-renders the configuration when its members change


def config_root(scope: str) -> Path:
    """``%E``: /etc for the system manager, the user's configuration directory."""
    if scope == "system":
        return Path("/etc")
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def runtime_root(scope: str) -> Path:
    """``%t``: /run, or the user's runtime directory."""
    return Path("/run") if scope == "system" else Path(os.environ.get("XDG_RUNTIME_DIR", "/run"))


def gateway_dir(scope: str, name: str) -> Path:
    """Where a gateway's HAProxy files are installed."""
    return config_root(scope) / "unitgen" / "gateways" / name


def render_gateway_files(inst: Instance, ctx: RenderContext) -> list[RenderedFile]:
    """The HAProxy configuration of gateway ``inst`` and the files it names."""
    return gateway_files(inst.name, inst.gateway, ctx.scope, (inst.spec.source, ""))


def keys_copy_cmd(python: str, name: str) -> list[str]:
    """What the gateway's unit runs as root before HAProxy reads its
    configuration (start, reload): the member keys, copied from their root-only
    secret file for HAProxy's user (:mod:`unitgen.inunit.keycopy`)."""
    return [python, "-I", "-m", "unitgen.inunit.keycopy",
            f"{CONFIG_DIR}/unitgen/secrets/{name}.env",
            f"{RUNTIME_DIR}/unitgen-{name}/{MEMBER_KEYS}"]


def gateway_files(name: str, plan: GatewayPlan, scope: str,
                  where: tuple[str, str]) -> list[RenderedFile]:
    """A gateway's HAProxy files (and the settings that render them again), as
    config files below the manager's configuration directory, and the keys it
    sends its members as its secret file. SpecError (naming ``where``: file and
    key) when it cannot send each set of replicas its key."""
    keys, metrics_keys = plan.settings.api_keys_file, plan.settings.metrics_keys_file
    if scope == "system":
        # LoadCredential= gives the dynamic user a copy of the root-owned 0600 files
        keys = keys and f"/run/credentials/{name}.service/api-keys"
        metrics_keys = metrics_keys and f"/run/credentials/{name}.service/metrics-keys"
    runtime = runtime_root(scope) / f"unitgen-{name}"
    paths = GatewayPaths(str(gateway_dir(scope, name)), str(runtime), keys, metrics_keys)
    member_keys, problems = route_keys(plan)
    if problems:
        raise SpecError(problems=[Problem(*where, p) for p in problems])
    prefix = f"unitgen/gateways/{name}"
    files = [RenderedFile(f"{prefix}/{f.name}", f.text, config=True)
             for f in render_gateway(plan.settings, plan.routes, paths, keyed=set(member_keys))]
    files.append(RenderedFile(f"{name}.env", member_keys_map(name, member_keys), secret=True))
    # members on other hosts are in no installed unit here: kept with the settings
    settings = {"settings": asdict(plan.settings),
                "metrics": list(plan.metrics) if plan.metrics else None,
                "upstreams": [asdict(m) for m in plan.members if m.remote]}
    files.append(RenderedFile(f"{prefix}/{SETTINGS}", json.dumps(settings, indent=1) + "\n",
                              config=True))
    return files
