"""Rendering a resolved instance into systemd unit files (text, not yet on disk).

One function builds the Jinja environment (StrictUndefined: a missing variable
is a bug, not an empty string); quoting lives in :mod:`unitgen.targets.systemd.escape`.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jinja2

from unitgen.errors import Problem, SpecError
from unitgen.inunit.hareload import RELOAD_TIMEOUT
from unitgen.plan.instance import RUNTIME_DIR, Instance, runtime_subdir
from unitgen.plan.record import record_of
from unitgen.spec.model import InstanceSpec
from unitgen.targets.base import (
    MARKER,
    RenderedFile,
    Target,
    find_proxyd,
    strict_environment,
    templates_dir,
)
from unitgen.targets.capabilities import ALL, Capability, Limits
from unitgen.targets.systemd import escape
from unitgen.targets.systemd.contexts import (
    START_MARGIN,
    RenderContext,
    confine_argv,
    container_context,
    gpu_context,
    hardening_context,
    pool_context,
    probe_cmd,
    proxy_user_context,
    swap_context,
    watch_cmd,
)
from unitgen.targets.systemd.gateway import keys_copy_cmd, keys_maps_cmd, render_gateway_files
from unitgen.timespan import format_seconds

__all__ = [
    "MARKER",
    "OWNED_DIRECTIVES",
    "SYSTEM_LIMITS",
    "USER_LIMITS",
    "RenderContext",
    "RenderedFile",
    "SystemdTarget",
    "confine_argv",
    "find_proxyd",
    "make_environment",
    "render_instance",
    "render_swap_dropin",
    "secret_path",
    "server_unit",
    "spec_problems",
    "templates_dir",
]


# Directives unitgen sets itself; [systemd.*] in a spec may not override them,
# because each one could move the port, the probe or the process that owns them.
OWNED_DIRECTIVES = frozenset({
    "ExecStart", "ExecStartPost", "ExecStartPre", "ExecStop", "ExecStopPost", "ExecReload",
    "Type", "Environment", "DevicePolicy", "KillSignal",
    "EnvironmentFile", "RuntimeDirectory", "RuntimeDirectoryMode",
    "User", "Group", "WorkingDirectory", "Restart", "NotifyAccess", "TimeoutStartSec",
    "StopWhenUnneeded", "PartOf", "BindsTo", "After", "Before", "Requires", "Sockets",
    "ListenStream", "KillMode", "SyslogIdentifier", "DynamicUser",
})



@functools.cache
def make_environment() -> jinja2.Environment:
    """The one Jinja environment (:func:`unitgen.targets.base.strict_environment`):
    only the escaping filters below print a value. Built once per process:
    compiling the templates is most of a render's cost."""
    return strict_environment("systemd", _FILTERS)


_FILTERS: dict[str, Callable[..., str]] = {
    "exec": escape.exec_line,
    "env": escape.environment_assignment,
    "text": escape.text_value,
    "path": escape.path_value,
    "word": escape.word_value,
    "directive": escape.directive_name,
    "setting": escape.setting_value,
    "specifier_path": escape.specifier_path,
    "comment": escape.comment_line,
}


def secret_path(name: str) -> str:
    """Where an instance's secret file is installed, as a unit specifier path:
    ``/etc/unitgen/secrets/NAME.env`` (system) or ``~/.config/unitgen/secrets/NAME.env`` (user)."""
    return f"%E/unitgen/secrets/{name}.env"


def spec_problems(spec: InstanceSpec) -> list[Problem]:
    """What the systemd target refuses in a valid spec: directives unitgen owns,
    and values that would continue onto the next line."""
    problems = [
        Problem(spec.source, f"systemd.{section}.{key}",
                f"is set by unitgen and cannot be overridden ({_owned_hint(key)})")
        for section, pairs in (("unit", spec.systemd_unit), ("service", spec.systemd_service))
        for key, _ in pairs if key in OWNED_DIRECTIVES
    ]
    problems += [
        Problem(spec.source, f"systemd.{section}.{key}", "must not end with a backslash")
        for section, pairs in (("unit", spec.systemd_unit), ("service", spec.systemd_service))
        for key, value in pairs if value.endswith("\\")
    ]
    problems += [
        Problem(spec.source, f"systemd.{section}.{key}",
                f"{value!r}: a command's '+', '!' or '!!' prefix runs it with privileges the "
                "unit does not give its server ('+': as root, outside the sandbox; '!': "
                "despite User=); drop the prefix")
        for section, pairs in (("unit", spec.systemd_unit), ("service", spec.systemd_service))
        for key, value in pairs if key.startswith("Exec") and _raises_privileges(value)
    ]
    return problems


def _raises_privileges(value: str) -> bool:
    """Whether a command line of an ``Exec*=`` value starts with a ``+``, ``!`` or
    ``!!`` prefix. Read as systemd reads it, erring towards yes: one value may hold
    several command lines (a lone ``;`` word separates them); quotes are removed
    before the prefixes are read, and a backslash there could spell one (``\\x2b``)."""
    first = True
    for word in value.split():
        bare = word.replace('"', "").replace("'", "")
        if bare == ";":
            first = True
            continue
        if first:
            lead = bare[:len(bare) - len(bare.lstrip("-@:+!\\"))]
            if any(ch in lead for ch in "+!\\"):
                return True
        first = False
    return False


# The system manager can do everything unitgen asks of a manager; a user
# manager (--user) cannot switch users (unitgen.targets.capabilities).
SYSTEM_LIMITS = Limits(ALL, {})
_OWN_USER = ("is for the system manager: a user manager runs everything as its own user "
             "(drop {key} or deploy without --user)")
USER_LIMITS = Limits(ALL - {Capability.RUN_AS_USER, Capability.RUN_AS_GROUP},
                     {Capability.RUN_AS_USER: _OWN_USER, Capability.RUN_AS_GROUP: _OWN_USER})


@dataclass(frozen=True)
class SystemdTarget(Target):
    """The systemd target for one manager (see :class:`RenderContext`)."""

    ctx: RenderContext
    name: str = "systemd"

    @property
    def limits(self) -> Limits:
        """See :class:`~unitgen.targets.base.Target`: a user manager's are narrower."""
        return USER_LIMITS if self.ctx.scope == "user" else SYSTEM_LIMITS

    def spec_problems(self, spec: InstanceSpec) -> list[Problem]:
        """See :func:`spec_problems`."""
        return spec_problems(spec)

    def render(self, inst: Instance) -> list[RenderedFile]:
        """See :func:`render_instance`."""
        return render_instance(inst, self.ctx)


def _owned_hint(key: str) -> str:
    hints = {
        "User": "use user = ...", "Group": "use group = ...", "Restart": "use restart = ...",
        "Environment": "use [env]", "WorkingDirectory": "use working_directory = ...",
        "ExecStart": "use args, or command for backend custom",
        "TimeoutStartSec": "use [health] timeout",
    }
    return hints.get(key, "it keeps the port, the probe and the process tree consistent")


def render_swap_dropin(name: str, group: str, mates: list[str]) -> RenderedFile:
    """``<name>-backend.service.d/unitgen-swap.conf``: the group's ``Conflicts=``,
    rewritten for every member whenever the member list changes."""
    text = make_environment().get_template("swap-group.conf.j2").render({
        "name": name, "group": group,
        "conflicts": [f"{m}-backend.service" for m in mates],
        # one ordering edge per pair (no cycle): a stop is then always ordered
        # before the other member's start, whichever way the edge points
        "after": [f"{m}-backend.service" for m in mates if m < name],
    })
    return RenderedFile(f"{name}-backend.service.d/unitgen-swap.conf", text)


def server_unit(inst: Instance) -> str:
    """The unit that runs the model server: ``NAME-backend.service`` behind a
    proxy, else the instance's own ``NAME.service``."""
    return f"{inst.name}-backend.service" if inst.uses_proxy else f"{inst.name}.service"


def render_instance(inst: Instance, ctx: RenderContext) -> list[RenderedFile]:
    """Render an instance's unit files (and its secret file, if it has a key).

    A value that no escaping filter can write (validation should have refused it
    already) becomes a spec problem, never a half-written or injected unit."""
    problems = spec_problems(inst.spec)
    if problems:
        raise SpecError(problems=problems)
    try:
        return _render_files(inst, ctx)
    except ValueError as exc:
        raise SpecError(problems=[Problem(inst.spec.source, "", f"cannot be rendered: {exc}")]) \
            from None


def _common(inst: Instance, ctx: RenderContext) -> dict[str, object]:
    """The values every unit of an instance is rendered with."""
    spec = inst.spec
    addr = ipaddress.ip_address(inst.public.host)
    hardening = hardening_context(inst, ctx)
    # a server run as another user needs the right to bind its privileged private port
    bind_low_port = bool((spec.user or hardening["hardening"]) and inst.private is not None
                         and inst.private.kind == "tcp" and inst.private.port < 1024
                         and inst.container is None)
    argv = list(inst.argv)
    if bind_low_port:
        assert inst.private is not None  # noqa: S101 - bind_low_port says so
        # ... and only that one: with the capability alone it could bind any
        # privileged port, another instance's private port included
        argv = confine_argv(ctx.python, inst.private.port, argv)
    return {
        "source": Path(spec.source).name,
        "name": spec.name,
        "record": record_of(inst).line(),
        "backend": spec.backend,
        "model": spec.model or spec.name,
        "description": spec.description or "",
        "public_listen": inst.public.listen(),
        "free_bind": not (addr.is_loopback or addr.is_unspecified),
        "eager": spec.activation == "eager",
        "wanted_by": "default.target" if ctx.scope == "user" else "multi-user.target",
        "start_timeout": format_seconds(inst.health_timeout + START_MARGIN),
        "secret_file": secret_path(spec.name) if inst.secrets else "",
        "argv": argv,
        "env": list(inst.env),
        "working_directory": spec.working_directory or "",
        "user": spec.user or "",
        "group": spec.group or "",
        "restart": spec.restart,
        "unit_extra": list(spec.systemd_unit),
        "service_extra": list(spec.systemd_service),
        "probe_public": probe_cmd(ctx, inst, inst.public.probe_target(), "public"),
        "watch": watch_cmd(ctx, inst, inst.public.probe_target(), "public"),
        "bind_low_port": bind_low_port,
        **hardening,
        **proxy_user_context(inst, ctx),
        **gpu_context(inst, ctx),
        **container_context(inst, ctx),  # its argv is podman run's
        "swap_group": spec.swap_group or "",
        "pool": inst.pool is not None,
        # its proxy takes a turn before it forwards: a swap group's, or its GPUs' in a pool
        "takes_turns": bool(spec.swap_group) or inst.pool is not None,
        "memrecord": [],
        "pool_devices": [],
        **_gateway_context(inst, ctx),
    }



def _gateway_context(inst: Instance, ctx: RenderContext) -> dict[str, object]:
    """A gateway's socket and service."""
    plan = inst.gateway
    metrics = ""
    if plan is not None and plan.metrics is not None:
        host, port = plan.metrics
        metrics = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {
        "metrics_listen": metrics,
        "runtime_dir": f"unitgen-{inst.name}",
        # a reload returns once HAProxy's new worker serves (unitgen.inunit.hareload)
        "reload_cmd": [ctx.python, "-I", "-m", "unitgen.inunit.hareload", "--admin",
                       f"{RUNTIME_DIR}/unitgen-{inst.name}/admin.sock", "--timeout",
                       format_seconds(RELOAD_TIMEOUT)] if plan is not None else [],
        "keys_copy": keys_copy_cmd(ctx.python, inst.name) if plan is not None else [],
        "keys_maps": keys_maps_cmd(ctx.python, inst.name, plan) if plan is not None else [],
    }


def _private(inst: Instance, ctx: RenderContext, common: dict[str, object]) -> dict[str, object]:
    """The values of the proxy and server units of an instance with a private endpoint."""
    spec, private = inst.spec, inst.private
    assert private is not None  # noqa: S101 - only called for one
    proxy_cmd = [ctx.proxyd, f"--connections-max={spec.max_connections}"]
    if inst.container is not None and private.kind == "unix":
        # the container's server is root on the host and its socket directory is
        # bound in read-write: a proxy that never follows a link there
        # (unitgen.inunit.relay), since systemd-socket-proxyd (root) would
        proxy_cmd = [ctx.python, "-I", "-m", "unitgen.inunit.relay",
                     f"--connections-max={spec.max_connections}"]
    if spec.idle_stop is not None:
        proxy_cmd.append(f"--exit-idle-time={format_seconds(spec.idle_stop)}")
    proxy_cmd.append(private.listen())
    values = {
        **common,
        "proxy_cmd": proxy_cmd,
        # Only an idle_stop instance needs this (its proxy exits on its own). Elsewhere
        # it would undo a restart: a server that dies leaving processes behind (workers,
        # the liveness checker) passes through "deactivating", which stops the proxy
        # (BindsTo=), and an unneeded server would then be stopped instead of restarted.
        "idle_stop": spec.idle_stop is not None,
        "probe_private": probe_cmd(ctx, inst, private.probe_target(), "private"),
        "watch": watch_cmd(ctx, inst, private.probe_target(), "private"),
        "runtime_dir": runtime_subdir(spec.name) if RUNTIME_DIR in private.path else "",
        # only a swap group's proxy is root (it starts and stops units); the others
        # run as the server's user, whose runtime directory it is
        "proxy_reaches_socket_file": private.kind == "unix" and bool(spec.swap_group),
        # a server killed with -9 leaves its socket file, and llama-server then
        # cannot bind it: the next start removes it first
        "clean_socket": ["/bin/rm", "-f", private.path] if private.kind == "unix" else [],
    }
    if spec.swap_group:
        values.update(swap_context(inst, ctx))
    elif inst.pool is not None:
        values.update(pool_context(inst, ctx))
    return values


def _render_files(inst: Instance, ctx: RenderContext) -> list[RenderedFile]:
    env = make_environment()
    name = inst.spec.name
    common = _common(inst, ctx)
    files = [RenderedFile(f"{name}.socket", env.get_template("socket.j2").render(common))]
    if inst.gateway is not None:
        files.append(RenderedFile(f"{name}.service",
                                  env.get_template("gateway.service.j2").render(common)))
        files += render_gateway_files(inst, ctx)
    elif inst.private is None:
        files.append(RenderedFile(f"{name}.service",
                                  env.get_template("direct.service.j2").render(common)))
    else:
        values = _private(inst, ctx, common)
        files.append(RenderedFile(f"{name}.service",
                                  env.get_template("proxy.service.j2").render(values)))
        files.append(RenderedFile(f"{name}-backend.service",
                                  env.get_template("backend.service.j2").render(values)))
    if inst.secrets:
        lines = [f"# Secrets of unitgen instance {name}; mode 0600. Generated: do not edit.",
                 f"{MARKER}{name}",
                 *(escape.env_file_line(k, v) for k, v in inst.secrets)]
        files.append(RenderedFile(f"{name}.env", "\n".join(lines) + "\n", secret=True))
    return files
