"""A gateway's files for the supervisor target: where its HAProxy configuration
and the files it answers with go (the same files as for systemd, rendered by
:mod:`unitgen.features.gateway.render`), and what HAProxy is handed at start.

supervisord runs every program as root; the gateway's wrapper drops to
:data:`GATEWAY_USER` before HAProxy starts, so HAProxy never has root. It reads
the API keys from maps the wrapper makes, as root, in the gateway's private
runtime directory (:mod:`unitgen.inunit.gwkeys`, as the systemd unit's
``ExecStartPre=+`` does for its dynamic user), and the keys it sends members
that have one of their own from a copy the wrapper makes of their root-only
secret file (:mod:`unitgen.inunit.keycopy`); the binding makes both again
before each reload's signal.
"""

from __future__ import annotations

from pathlib import Path

from unitgen.features.gateway.files import gateway_files, member_keys_secret
from unitgen.features.gateway.plan import GatewayPlan
from unitgen.features.gateway.render import FILES, GatewayPaths
from unitgen.plan.instance import runtime_subdir
from unitgen.targets.base import RenderedFile

__all__ = ["GATEWAY_USER", "gateway_dir", "gateway_paths", "keys_maps_args",
           "member_keys_path", "render_gateway_files", "runtime_dir"]

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


def keys_maps_args(name: str, plan: GatewayPlan, config_dir: str, secrets_dir: str) -> list[str]:
    """The wrapper's options that hand the gateway's keys to HAProxy's user as
    root before HAProxy starts: the keys it sends its members (copied from
    their root-only secret file, :func:`member_keys_path`), and its own keys as
    maps when it has any (:mod:`unitgen.inunit.gwkeys`). The binding does the
    same again before each reload."""
    out = ["--gw-member-keys", member_keys_path(name, secrets_dir)]
    keys, metrics_keys = plan.settings.api_keys_file, plan.settings.metrics_keys_file
    if not keys and not metrics_keys:
        return out
    return [*out, *(["--gw-keys", keys] if keys else []),
            *(["--gw-metrics-keys", metrics_keys] if metrics_keys else []),
            "--gw-models", str(gateway_dir(config_dir, name) / FILES["models"])]


def member_keys_path(name: str, secrets_dir: str) -> str:
    """The root-only file of the API keys gateway ``name`` sends its members
    (written with the instances' secrets, mode 0600)."""
    return f"{secrets_dir}/{member_keys_secret(name)}"


def render_gateway_files(name: str, plan: GatewayPlan, config_dir: str, run_dir: str,
                         where: tuple[str, str]) -> list[RenderedFile]:
    """The HAProxy configuration of a gateway and the files it names (config
    files, their names below ``config_dir``), and the keys it sends its members
    (a secret file, with the instances' secrets)."""
    return gateway_files(name, plan, gateway_paths(name, config_dir, run_dir),
                         f"unitgen/gateways/{name}", where)
