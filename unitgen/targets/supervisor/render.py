"""Rendering a resolved instance into one supervisord conf file (text, not yet
on disk), plus a mode-0600 secret file when the instance has an API key.

Topology (docs/supervisor.md says why): supervisord owns the public port as an
``[fcgi-program:NAME]`` socket and the server runs as ``[program:NAME-backend]``.
For servers that cannot take a socket, the fcgi-program is a small wrapper that
waits until the server answers on its private endpoint and then runs
systemd-socket-proxyd on the socket (fd 3). For a custom server with
``socket_activation = true`` it holds the socket and hands it to the server,
which gets it as fd 3. Quoting lives in :mod:`unitgen.targets.supervisor.escape`.
"""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2

from unitgen.errors import Problem, SpecError
from unitgen.plan.instance import RUNTIME_DIR, Instance, runtime_subdir
from unitgen.spec.model import InstanceSpec
from unitgen.targets.base import MARKER, RenderedFile, find_proxyd, templates_dir
from unitgen.targets.supervisor import escape

__all__ = [
    "MARKER",
    "ConfFile",
    "SupervisorContext",
    "SupervisorTarget",
    "conf_name",
    "group_names",
    "render_instance",
    "secret_name",
    "spec_refusals",
    "target_notices",
]

# A big model can take a while to free GPU memory and exit on SIGTERM; after
# this supervisord sends SIGKILL to the whole process group (killasgroup).
STOP_WAIT_SECONDS = 120
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
    sockets, logs and secrets."""

    python: str
    proxyd: str
    run_dir: str
    log_dir: str
    secrets_dir: str

    @classmethod
    def detect(cls, *, run_dir: str = "/run/unitgen", log_dir: str = "/var/log/unitgen",
               secrets_dir: str = "/etc/unitgen/secrets") -> SupervisorContext:
        """This host: this interpreter and the installed proxyd."""
        return cls(python=sys.executable, proxyd=find_proxyd(), run_dir=run_dir,
                   log_dir=log_dir, secrets_dir=secrets_dir)


# One file to install: the conf file goes in the include directory, the secret
# file (mode 0600) in the context's secrets directory.
ConfFile = RenderedFile


def conf_name(name: str) -> str:
    """File name of an instance's conf file in the include directory."""
    return f"unitgen-{name}.conf"


def secret_name(name: str) -> str:
    """File name of an instance's secret file."""
    return f"{name}.env"


def group_names(inst: Instance) -> list[str]:
    """supervisord process groups of an instance: the public one first."""
    return [inst.name, f"{inst.name}-backend"]


def spec_refusals(spec: InstanceSpec) -> list[Problem]:
    """What supervisord cannot do with a valid spec, said with file and key (never
    dropped silently)."""
    out: list[Problem] = []

    def no(key: str, message: str) -> None:
        out.append(Problem(spec.source, key, message))

    if spec.activation == "on-demand":
        no("activation", "\"on-demand\" is not available with the supervisor target: "
                         "supervisord cannot start a program on the first connection; use "
                         "activation = \"eager\" (the default) or the systemd target")
    if spec.idle_stop is not None:
        no("idle_stop", "is not available with the supervisor target: supervisord cannot "
                        "stop a program when idle and start it again on a connection")
    for section, pairs in (("unit", spec.systemd_unit), ("service", spec.systemd_service)):
        for key, _ in pairs:
            no(f"systemd.{section}.{key}", "is a systemd directive; the supervisor target "
                                           "has no equivalent and will not drop it silently: "
                                           "remove it or deploy with the systemd target")
    if spec.group is not None:
        no("group", "supervisord runs a program as user = ... with that user's own groups; "
                    "it has no group setting")
    return out


def _refusals(inst: Instance) -> list[Problem]:
    out = spec_refusals(inst.spec)
    if ipaddress.ip_address(inst.public.host).version == 6:
        out.append(Problem(inst.spec.source, "host", f"{inst.public.host}: supervisord's "
                           "sockets (socket=tcp://) are IPv4 only"))
    return out


@dataclass(frozen=True)
class SupervisorTarget:
    """The supervisor target for the pipeline (unitgen.ops.pipeline)."""

    ctx: SupervisorContext
    name: str = "supervisor"

    def spec_problems(self, spec: InstanceSpec) -> list[Problem]:
        """See :func:`spec_refusals`."""
        return spec_refusals(spec)

    def render(self, inst: Instance) -> list[RenderedFile]:
        """See :func:`render_instance`."""
        return render_instance(inst, self.ctx)


def _word(value: str, key: str, problems: list[Problem], source: str) -> str:
    try:
        return escape.command_word(value)
    except escape.UnrepresentableError as exc:
        problems.append(Problem(source, key, f"{value!r}: {exc}"))
        return '""'


def _runtime(word: str, ctx: SupervisorContext) -> str:
    return word.replace(RUNTIME_DIR, ctx.run_dir)


def render_instance(inst: Instance, ctx: SupervisorContext) -> list[ConfFile]:
    """Render an instance's conf file (and its secret file, if it has a key);
    raise SpecError naming file and key for anything supervisord cannot do."""
    spec = inst.spec
    problems = _refusals(inst)
    source = spec.source

    argv = [_runtime(w, ctx) for w in inst.argv]
    where = _argv_keys(inst)
    server_words: list[str] = []
    for key, word in zip(where, argv, strict=True):
        server_words.append(_word(word, key, problems, source))

    env_parts: list[str] = []
    for k, v in inst.env:
        try:
            env_parts.append(f"{k}={escape.env_value(v)}")
        except escape.UnrepresentableError as exc:
            problems.append(Problem(source, f"env.{k}", f"{v!r}: {exc}"))

    def plain(value: str | None, key: str) -> str:
        if value is None:
            return ""
        try:
            return escape.plain_value(value)
        except escape.UnrepresentableError as exc:
            problems.append(Problem(source, key, f"{value!r}: {exc}"))
            return ""

    directory = plain(spec.working_directory, "working_directory")
    user = plain(spec.user, "user")
    paths = {"run_dir": ctx.run_dir, "log_dir": ctx.log_dir, "secrets_dir": ctx.secrets_dir,
             "python": ctx.python, "proxyd": ctx.proxyd}
    for key, value in paths.items():
        try:
            escape.plain_value(value)
            escape.command_word(value)
        except escape.UnrepresentableError as exc:
            problems.append(Problem(source, "", f"the supervisor {key} {value!r}: {exc}"))
    if problems:
        raise SpecError(problems=problems)

    secret = bool(inst.secrets)
    secret_file = f"{ctx.secrets_dir}/{secret_name(spec.name)}" if secret else ""
    # supervisord runs every program as root; the wrapper reads the root-owned
    # secret file and makes the runtime directory, then becomes ``user`` (never
    # supervisord's own user= line: that would run the wrapper as the user)
    wrap: list[str] = []
    if inst.private is not None and RUNTIME_DIR in inst.private.path:
        wrap += ["--mkdir", f"{ctx.run_dir}/{runtime_subdir(spec.name)}"]
    if secret:
        wrap += ["--env-file", secret_file]
    hold_path = f"{ctx.run_dir}/{runtime_subdir(spec.name)}/listen.sock"
    if inst.private is None:
        wrap += ["--fd3-from", hold_path]
    if spec.user:
        wrap += ["--user", spec.user]
    if inst.private is not None and inst.private.kind == "tcp" and inst.private.port < 1024:
        wrap += ["--bind-port", str(inst.private.port)]
    server = " ".join(server_words)
    if wrap:
        head = [ctx.python, "-I", "-m", "unitgen.inunit.supwrap", "exec", *wrap, "--"]
        server = escape.command_line(head) + " " + server

    proxy = ""
    private = ""
    if inst.private is None:
        proxy = escape.command_line([ctx.python, "-I", "-m", "unitgen.inunit.supwrap", "hold",
                                     "--serve", hold_path, *(["--user", spec.user]
                                                             if spec.user else [])])
    else:
        target = _runtime(inst.private.probe_target(), ctx)
        private = _runtime(inst.private.listen(), ctx)
        cmd = [ctx.python, "-I", "-m", "unitgen.inunit.supwrap", "proxy",
               "--private", target, "--path", inst.health_path]
        if inst.probe_key_env:
            cmd += ["--key-env", inst.probe_key_env, "--env-file", secret_file]
        if spec.user:
            cmd += ["--server-user", spec.user]
        cmd += ["--", ctx.proxyd, f"--connections-max={spec.max_connections}", private]
        proxy = escape.command_line(cmd)

    placement = inst.gpus
    gpu_header = ""
    if placement is not None:
        gpu_header = ",".join(placement.uuids) + (" shared" if placement.share else " exclusive")
    values = {
        "source": "".join(ch if ch.isprintable() else "?" for ch in Path(source).name),
        "name": spec.name,
        "backend": spec.backend,
        "public": inst.public.listen(),
        "private": private or "(the server takes the public socket as fd 3)",
        "health_path": inst.health_path,
        "timeout": f"{inst.health_timeout:g}",
        "key_env": inst.probe_key_env or "",
        "gpu_header": gpu_header,
        "public_command": proxy,
        "hold": inst.private is None,
        "server_command": server,
        "environment": ",".join(env_parts),
        "directory": directory,
        "user": user,
        "autorestart": _AUTORESTART[spec.restart],
        "stopwaitsecs": STOP_WAIT_SECONDS,
        "backlog": BACKLOG,
        "server_log": escape.plain_value(f"{ctx.log_dir}/{spec.name}.log"),
        "proxy_log": escape.plain_value(f"{ctx.log_dir}/{spec.name}-proxy.log"),
        "log_maxbytes": LOG_MAXBYTES,
        "log_backups": LOG_BACKUPS,
    }
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir() / "supervisor")),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # noqa: S701 - conf files are not HTML; escaping is escape.py's job
    )
    text = env.get_template("instance.conf.j2").render(values)
    files = [ConfFile(conf_name(spec.name), text)]
    if secret:
        lines = [f"{k}={v}" for k, v in inst.secrets]
        files.append(ConfFile(secret_name(spec.name), "\n".join(lines) + "\n", secret=True))
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
