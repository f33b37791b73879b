"""A gateway's files for the systemd target: its socket (and the exporter's),
its HAProxy service, the HAProxy configuration with the files it answers
with (rendered by :mod:`unitgen.features.gateway.render`, the same for every
target), and the secret file of the API keys it sends its members."""

from __future__ import annotations

import os
from pathlib import Path

from unitgen.features.gateway.files import gateway_files, member_keys_secret
from unitgen.features.gateway.plan import GatewayPlan
from unitgen.features.gateway.render import FILES, MEMBER_KEYS, GatewayPaths
from unitgen.plan.instance import CONFIG_DIR, RUNTIME_DIR, Instance
from unitgen.targets.base import RenderedFile
from unitgen.targets.systemd.contexts import RenderContext
from unitgen.targets.systemd.installed import config_dir

__all__ = ["gateway_dir", "gateway_paths", "keys_copy_cmd", "keys_maps_cmd",
           "render_gateway_files", "runtime_root"]


def runtime_root(scope: str) -> Path:
    """``%t``: /run, or the user's runtime directory."""
    return Path("/run") if scope == "system" else Path(os.environ.get("XDG_RUNTIME_DIR", "/run"))


def gateway_dir(scope: str, name: str) -> Path:
    """Where a gateway's HAProxy files are installed."""
    return config_dir(scope) / "unitgen" / "gateways" / name


def gateway_paths(name: str, scope: str) -> GatewayPaths:
    """Where HAProxy reads gateway ``name``'s files under this manager."""
    return GatewayPaths(str(gateway_dir(scope, name)), str(runtime_root(scope) / f"unitgen-{name}"))


def render_gateway_files(inst: Instance, ctx: RenderContext) -> list[RenderedFile]:
    """The HAProxy configuration of gateway ``inst`` and the files it names."""
    return gateway_files(inst.name, inst.gateway, gateway_paths(inst.name, ctx.scope),
                         f"unitgen/gateways/{inst.name}", (inst.spec.source, ""))


def _member_keys(name: str) -> str:
    """The root-only secret file of the keys gateway ``name`` sends its members."""
    return f"{CONFIG_DIR}/unitgen/secrets/{member_keys_secret(name)}"


def keys_copy_cmd(python: str, name: str) -> list[str]:
    """What the gateway's unit runs as root before HAProxy reads its
    configuration (start, reload): the member keys, copied from their root-only
    secret file for HAProxy's user (:mod:`unitgen.inunit.keycopy`)."""
    return [python, "-I", "-m", "unitgen.inunit.keycopy",
            _member_keys(name),
            f"{RUNTIME_DIR}/unitgen-{name}/{MEMBER_KEYS}"]


def keys_maps_cmd(python: str, name: str, plan: GatewayPlan) -> list[str]:
    """What the gateway's unit runs as root before HAProxy starts and before each
    reload when it has keys: its API keys (and the exporter's) and their policies,
    read from their root-only files into maps in its runtime directory for
    HAProxy's user, and at a reload handed to the running worker first
    (:mod:`unitgen.inunit.gwkeys`). Empty: it has no keys."""
    keys, metrics_keys = plan.settings.api_keys_file, plan.settings.metrics_keys_file
    if not keys and not metrics_keys:
        return []
    run = f"{RUNTIME_DIR}/unitgen-{name}"
    return [python, "-I", "-m", "unitgen.inunit.gwkeys",
            *(["--keys", keys] if keys else []),
            *(["--metrics-keys", metrics_keys] if metrics_keys else []),
            "--models", f"{CONFIG_DIR}/unitgen/gateways/{name}/{FILES['models']}",
            "--out", run, "--admin", f"{run}/admin.sock",
            "--member-keys", _member_keys(name)]
