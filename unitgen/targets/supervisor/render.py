"""Rendering a resolved instance into one supervisord conf file (text, not yet
on disk), plus a mode-0600 env file with its environment (keys included).

Topology (docs/supervisor.md says why): supervisord owns the public port as an
``[fcgi-program:NAME]`` socket and the server runs as ``[program:NAME-backend]``.
For servers that cannot take a socket, the fcgi-program is a small wrapper that
waits until the server answers on its private endpoint and then runs
systemd-socket-proxyd on the socket (fd 3). For a custom server with
``socket_activation = true`` it holds the socket and hands it to the server,
which gets it as fd 3. Quoting lives in :mod:`unitgen.targets.supervisor.escape`,
whose functions are the templates' filters; a value that passed none is refused
when the template is rendered (:func:`unitgen.targets.base.strict_environment`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jinja2

from unitgen.errors import Problem, SpecError
from unitgen.plan.instance import CONFIG_DIR, RUNTIME_DIR, Instance, runtime_subdir
from unitgen.plan.record import record_of
from unitgen.targets.base import MARKER, RenderedFile, Target, find_proxyd, strict_environment
from unitgen.targets.capabilities import ALL, Capability, Limits
from unitgen.targets.supervisor import escape
from unitgen.targets.supervisor.gateway import (
    GATEWAY_USER,
    keys_maps_args,
    render_gateway_files,
)

__all__ = [
    "LIMITS",
    "MARKER",
    "ConfFile",
    "SupervisorContext",
    "SupervisorTarget",
    "conf_name",
    "env_path",
    "group_names",
    "make_environment",
    "reload_signal",
    "render_instance",
    "run_as",
    "secret_name",
    "target_notices",
]

# A big model can take a while to free GPU memory and exit on SIGTERM; after
# this supervisord sends SIGKILL to the whole process group (killasgroup).
STOP_WAIT_SECONDS = 120
GATEWAY_STOP_WAIT_SECONDS = 30  # HAProxy stops at once on SIGTERM; as systemd's TimeoutStopSec
LOG_MAXBYTES = "50MB"
LOG_BACKUPS = 5
# supervisord's fcgi socket listens with this backlog: clients that connect
# while the model loads wait here (the kernel caps it at net.core.somaxconn).
BACKLOG = 4096

_AUTORESTART = {"on-failure": "unexpected", "on-abnormal": "unexpected", "always": "true",
                "no": "false"}


@dataclass(frozen=True)
class SupervisorContext:
    """What rendering needs from the host: the interpreter that runs unitgen's
    small wrappers, systemd-socket-proxyd, and the directories for runtime
    sockets, logs and secrets, and the configuration directory below which a
    gateway's HAProxy files go (``unitgen/gateways/NAME``, as systemd's ``%E``)."""

    python: str
    proxyd: str
    run_dir: str
    log_dir: str
    secrets_dir: str
    config_dir: str = "/etc"

    @classmethod
    def detect(cls, *, run_dir: str = "/run/unitgen", log_dir: str = "/var/log/unitgen",
               secrets_dir: str = "/etc/unitgen/secrets",
               config_dir: str = "/etc") -> SupervisorContext:
        """This host: this interpreter and the installed proxyd."""
        return cls(python=sys.executable, proxyd=find_proxyd(), run_dir=run_dir,
                   log_dir=log_dir, secrets_dir=secrets_dir, config_dir=config_dir)


# One file to install: the conf file goes in the include directory, the env
# file (secret: mode 0600) in the context's secrets directory.
ConfFile = RenderedFile


def conf_name(name: str) -> str:
    """File name of an instance's conf file in the include directory."""
    return f"unitgen-{name}.conf"


def secret_name(name: str) -> str:
    """File name of an instance's env file (its whole environment, keys included)."""
    return f"{name}.env"


def group_names(inst: Instance) -> list[str]:
    """supervisord process groups of an instance: the public one first."""
    return [inst.name, f"{inst.name}-backend"]


# What supervisord cannot do (unitgen.targets.capabilities: which keys need what)
LIMITS = Limits(ALL - {
    Capability.ON_DEMAND, Capability.IDLE_STOP, Capability.SWAP_GROUP, Capability.CONTAINER,
    Capability.SYSTEMD_DIRECTIVES, Capability.RUN_AS_GROUP, Capability.IPV6}, {
    Capability.ON_DEMAND: "\"on-demand\" is not available with the supervisor target: "
                          "supervisord cannot start a program on the first connection; use "
                          "activation = \"eager\" (the default) or the systemd target",
    Capability.IDLE_STOP: "is not available with the supervisor target: supervisord cannot "
                          "stop a program when idle and start it again on a connection",
    Capability.SWAP_GROUP: "is not available with the supervisor target: members take turns "
                           "through socket activation and stop each other (systemd's "
                           "Conflicts=), which supervisord cannot do; deploy swap groups with "
                           "the systemd target",
    Capability.CONTAINER: "containers run with the systemd target only: its unit keeps the "
                          "container in its own cgroup and removes it on every stop (podman's "
                          "conmon outlives a supervisord program that is killed, and supervisord "
                          "cannot run a clean-up when a program ends); deploy with the systemd "
                          "target",
    Capability.SYSTEMD_DIRECTIVES: "is a systemd directive; the supervisor target has no "
                                   "equivalent and will not drop it silently: remove it or "
                                   "deploy with the systemd target",
    Capability.RUN_AS_GROUP: "supervisord runs a program as user = ... with that user's own "
                             "groups; it has no group setting",
    Capability.IPV6: "{value}: supervisord's sockets (socket=tcp://) are IPv4 only",
})


def run_as(inst: Instance) -> str | None:
    """The user the instance's programs become (None: supervisord's own). A
    gateway's HAProxy never keeps root (supervisord has no dynamic users)."""
    if inst.spec.user:
        return inst.spec.user
    return GATEWAY_USER if inst.gateway is not None else None


def reload_signal(inst: Instance) -> str | None:
    """The signal that makes the server program read its configuration again
    without letting go of its socket (None: it is restarted instead). HAProxy's
    master starts new workers on SIGUSR2; the old ones finish their requests."""
    return "USR2" if inst.gateway is not None else None




def _refusals(inst: Instance) -> list[Problem]:
    return LIMITS.spec_refusals(inst.spec) + LIMITS.plan_refusals(inst)


@dataclass(frozen=True)
class SupervisorTarget(Target):
    """The supervisor target for the pipeline (unitgen.ops.pipeline)."""

    ctx: SupervisorContext
    name: str = "supervisor"

    @property
    def limits(self) -> Limits:
        """See :class:`~unitgen.targets.base.Target`: :data:`LIMITS`."""
        return LIMITS

    def render(self, inst: Instance) -> list[RenderedFile]:
        """See :func:`render_instance`."""
        return render_instance(inst, self.ctx)


@functools.cache
def make_environment() -> jinja2.Environment:
    """The supervisor target's one Jinja environment
    (:func:`unitgen.targets.base.strict_environment`): only the filters below,
    each a function of :mod:`unitgen.targets.supervisor.escape`, print a value."""
    return strict_environment("supervisor", _FILTERS)


_FILTERS: dict[str, Callable[..., str]] = {
    "word": escape.word_value,  # names, addresses, numbers
    "value": escape.plain_value,  # directory=, log files
    "command": escape.command_line,  # command= from an argv list
    "comment": escape.comment_text,  # header lines, read back as written
    "shown": escape.shown_value,  # env values listed for people to read
    "env_line": escape.env_file_line,  # NAME=VALUE in the env file
}


def _runtime(word: str, ctx: SupervisorContext) -> str:
    return word.replace(RUNTIME_DIR, ctx.run_dir).replace(CONFIG_DIR, ctx.config_dir)


def render_instance(inst: Instance, ctx: SupervisorContext) -> list[ConfFile]:
    """Render an instance's conf file (and its env file, when it has any
    environment or key); raise SpecError naming file and key for anything
    supervisord cannot do or a value its format cannot carry."""
    problems = _refusals(inst) + _value_problems(inst, ctx)
    if problems:
        raise SpecError(problems=problems)
    try:
        return _render_files(inst, ctx)
    except ValueError as exc:  # a filter refused what the checks above let through
        raise SpecError(problems=[Problem(inst.spec.source, "", f"cannot be rendered: {exc}")]) \
            from None


def _value_problems(inst: Instance, ctx: SupervisorContext) -> list[Problem]:
    """Every value a filter would refuse, with the spec key it came from."""
    spec = inst.spec
    problems: list[Problem] = []

    def check(write: Callable[[str], str], value: str, key: str, what: str = "") -> None:
        try:
            write(value)
        except escape.UnrepresentableError as exc:
            problems.append(Problem(spec.source, key, f"{what}{value!r}: {exc}"))

    for key, word in zip(_argv_keys(inst), inst.argv, strict=True):
        check(escape.command_word, _runtime(word, ctx), key)
    for name, value in (*inst.env, *inst.secrets):
        check(functools.partial(escape.env_file_line, name), value, f"env.{name}")
    if spec.working_directory is not None:
        check(escape.plain_value, spec.working_directory, "working_directory")
    paths = {"run_dir": ctx.run_dir, "log_dir": ctx.log_dir, "secrets_dir": ctx.secrets_dir,
             "config_dir": ctx.config_dir, "python": ctx.python, "proxyd": ctx.proxyd}
    for key, value in paths.items():
        for write in (escape.plain_value, escape.command_word, escape.comment_text):
            check(write, value, "", f"the supervisor {key} ")
    return problems


def env_path(inst: Instance, ctx: SupervisorContext) -> str:
    """Where the instance's env file is installed ('' when it has none)."""
    if not inst.env and not inst.secrets:
        return ""
    return f"{ctx.secrets_dir}/{secret_name(inst.name)}"


def _hold_path(inst: Instance, ctx: SupervisorContext) -> str:
    return f"{ctx.run_dir}/{runtime_subdir(inst.name)}/listen.sock"


def _server_argv(inst: Instance, ctx: SupervisorContext) -> list[str]:
    """The server's argv, behind the root wrapper when it needs one. supervisord
    runs every program as root; the wrapper reads the root-owned env file and
    makes the runtime directory, then becomes ``user`` (never supervisord's own
    user= line: that would run the wrapper as the user)."""
    spec, private = inst.spec, inst.private
    wrap: list[str] = []
    if (private is not None and RUNTIME_DIR in private.path) or inst.gateway is not None:
        wrap += ["--mkdir", f"{ctx.run_dir}/{runtime_subdir(spec.name)}"]
    if env_path(inst, ctx):
        wrap += ["--env-file", env_path(inst, ctx), "--env-digest", escape.env_digest(inst.env)]
    if private is None:
        wrap += ["--fd3-from", _hold_path(inst, ctx)]
    wrap += _gateway_wrap(inst, ctx)
    if run_as(inst):
        wrap += ["--user", str(run_as(inst))]
    if private is not None and private.kind == "tcp" and private.port < 1024:
        wrap += ["--bind-port", str(private.port)]
    argv = [_runtime(w, ctx) for w in inst.argv]
    if not wrap:
        return argv
    return [ctx.python, "-I", "-m", "unitgen.inunit.supwrap", "exec", *wrap, "--", *argv]


def _gateway_wrap(inst: Instance, ctx: SupervisorContext) -> list[str]:
    """What root hands a gateway's HAProxy before it becomes its user: the
    exporter's socket as fd 4 (bound first, so a privileged port works too)
    and its keys as maps in its runtime directory."""
    plan = inst.gateway
    if plan is None:
        return []
    out: list[str] = []
    if plan.metrics is not None:
        host, port = plan.metrics
        out += ["--listen-fd4", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    out += keys_maps_args(inst.name, plan, ctx.config_dir, ctx.secrets_dir)
    return out


def _public_argv(inst: Instance, ctx: SupervisorContext) -> list[str]:
    """The fcgi-program's argv: the holder of a socket-activated server's socket,
    or the proxy wrapper that forwards once the private endpoint answers."""
    spec, private = inst.spec, inst.private
    as_user = ["--user", str(run_as(inst))] if run_as(inst) else []
    if private is None:
        return [ctx.python, "-I", "-m", "unitgen.inunit.supwrap", "hold",
                "--serve", _hold_path(inst, ctx), *as_user]
    cmd = [ctx.python, "-I", "-m", "unitgen.inunit.supwrap", "proxy",
           "--private", _runtime(private.probe_target(), ctx), "--path", inst.health_path]
    if inst.probe_key_env:
        cmd += ["--key-env", inst.probe_key_env, "--env-file", env_path(inst, ctx)]
    if spec.user:
        cmd += ["--server-user", spec.user]
    return [*cmd, "--", ctx.proxyd, f"--connections-max={spec.max_connections}",
            _runtime(private.listen(), ctx)]


def _source_name(inst: Instance) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in Path(inst.spec.source).name)


def _template_values(inst: Instance, ctx: SupervisorContext) -> dict[str, object]:
    spec = inst.spec
    return {
        "source": _source_name(inst),
        "name": spec.name,
        "record": record_of(inst).line(),
        "public": inst.public.listen(),
        "hold": inst.private is None,
        "public_argv": _public_argv(inst, ctx),
        "server_argv": _server_argv(inst, ctx),
        "env_file": env_path(inst, ctx),
        "env_shown": list(inst.env),
        "secret_names": [k for k, _ in inst.secrets],
        "directory": spec.working_directory or "",
        "user": run_as(inst) or "",
        "gateway": inst.gateway is not None,
        "autorestart": _AUTORESTART[spec.restart],
        "stopwaitsecs": GATEWAY_STOP_WAIT_SECONDS if inst.gateway is not None
                        else STOP_WAIT_SECONDS,
        "backlog": BACKLOG,
        "server_log": f"{ctx.log_dir}/{spec.name}.log",
        "proxy_log": f"{ctx.log_dir}/{spec.name}-proxy.log",
        "log_maxbytes": LOG_MAXBYTES,
        "log_backups": LOG_BACKUPS,
    }


def _render_files(inst: Instance, ctx: SupervisorContext) -> list[ConfFile]:
    env = make_environment()
    text = env.get_template("instance.conf.j2").render(_template_values(inst, ctx))
    files = [ConfFile(conf_name(inst.name), text)]
    if inst.gateway is not None:
        files += render_gateway_files(inst.name, inst.gateway, ctx.config_dir, ctx.run_dir,
                                      (inst.spec.source, ""))
    if env_path(inst, ctx):
        # every variable, not only the keys: supervisord's environment= cannot
        # carry "#x", "a ;b", "%(here)s" or '"q"' (escape.py), this file can
        env_text = env.get_template("instance.env.j2").render({
            "name": inst.name, "source": _source_name(inst), "format": escape.ENV_FILE_FORMAT,
            "env": list(inst.env), "secrets_line": escape.ENV_SECRETS_LINE,
            "secrets": list(inst.secrets)})
        files.append(ConfFile(secret_name(inst.name), env_text, secret=True))
    return files


def target_notices(inst: Instance) -> tuple[str, ...]:
    """What the supervisor target does differently from the spec's words."""
    if inst.spec.restart == "on-abnormal":
        return ("restart = \"on-abnormal\": supervisord restarts on any unexpected exit "
                "(autorestart=unexpected), not only after a signal",)
    return ()


def _argv_keys(inst: Instance) -> list[str]:
    """The spec key each argv word came from, for messages (best effort)."""
    spec = inst.spec
    n = len(inst.argv)
    if spec.backend == "custom" and spec.command is not None:
        keys = [f"command[{i}]" for i in range(len(spec.command))]
        keys += [f"args[{i}]" for i in range(n - len(keys))]
        return keys[:n]
    return ["model" if w == spec.model else "args" for w in inst.argv]
