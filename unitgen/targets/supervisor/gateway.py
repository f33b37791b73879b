"""A gateway's files for the supervisor target: where its HAProxy configuration
and the files it answers with go (the same files as for systemd, rendered by
:mod:`unitgen.features.gateway.render`), and what HAProxy is handed at start.

supervisord runs every program as root; the gateway's wrapper drops to
:data:`GATEWAY_USER` before HAProxy starts, so HAProxy never has root. It reads
the API keys from maps the wrapper makes, as root, in the gateway's private
runtime directory (:mod:`unitgen.inunit.gwkeys`, as the systemd unit's
``ExecStartPre=+`` does for its dynamic user); the binding makes them again at
each reload.
"""

from __future__ import annotations

from pathlib import Path

from unitgen.errors import Problem, SpecError
from unitgen.features.gateway.files import gateway_files
from unitgen.features.gateway.plan import GatewayPlan
from unitgen.features.gateway.render import FILES, GatewayPaths
from unitgen.plan.instance import runtime_subdir
from unitgen.targets.base import RenderedFile

__all__ = ["GATEWAY_USER", "gateway_dir", "gateway_paths", "keys_maps_args",
           "render_gateway_files", "runtime_dir"]

# The user HAProxy runs as: the one the distribution's haproxy package makes for
# it (Debian, Ubuntu, Fedora, Alpine: "haproxy"). supervisord has no dynamic users.
GATEWAY_USER = "haproxy"


def gateway_dir(config_dir: str, name: str) -> Path:
    """Where a gateway's HAProxy files are installed (root's, readable by HAProxy),
    below the target's configuration directory."""
    return Path(config_dir) / "unitgen" / "gateways" / name


def runtime_dir(run_dir: str, name: str) -> str:
    """The gateway's private runtime directory (0700, HAProxy's user's): its
    runtime API, the socket its holder serves, the keys' copy."""
    return f"{run_dir}/{runtime_subdir(name)}"


def gateway_paths(name: str, config_dir: str, run_dir: str) -> GatewayPaths:
    """Where HAProxy reads gateway ``name``'s files under supervisord."""
    return GatewayPaths(str(gateway_dir(config_dir, name)), runtime_dir(run_dir, name))


def keys_maps_args(name: str, plan: GatewayPlan, config_dir: str) -> list[str]:
    """The wrapper's options that make the gateway's keys maps as root before
    HAProxy starts (:mod:`unitgen.inunit.gwkeys`; the binding makes them again
    at each reload); none when it has no keys."""
    keys, metrics_keys = plan.settings.api_keys_file, plan.settings.metrics_keys_file
    if not keys and not metrics_keys:
        return []
    return [*(["--gw-keys", keys] if keys else []),
            *(["--gw-metrics-keys", metrics_keys] if metrics_keys else []),
            "--gw-models", str(gateway_dir(config_dir, name) / FILES["models"])]


def render_gateway_files(name: str, plan: GatewayPlan, config_dir: str, run_dir: str,
                         where: tuple[str, str]) -> list[RenderedFile]:
    """The HAProxy configuration of a gateway and the files it names (config
    files, their names below ``config_dir``). A member with an API key of its
    own is refused (naming ``where``): sending it its key needs the keys copied
    again at each reload, which the supervisor target does not do yet; the
    systemd target does (docs/supervisor.md)."""
    keyed = sorted(m.instance for m in plan.members if m.keyed)
    if keyed and plan.settings.api_keys_file:
        raise SpecError(problems=[Problem(*where, (
            f"{', '.join(keyed)} has an API key of its own: a gateway under supervisord "
            "cannot send a member its own key yet (the systemd target can); give the member "
            "no key (the gateway's keys guard it) or deploy with the systemd target"))])
    files = gateway_files(name, plan, gateway_paths(name, config_dir, run_dir),
                          f"unitgen/gateways/{name}", where)
    return [f for f in files if not f.secret]  # no member keys to send: no keys file
