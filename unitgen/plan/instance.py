"""From a validated spec to a resolved instance: the server's argv and
environment, its public and private endpoints, its probe targets and secrets.

The plan every target renders; no systemd syntax. The one target-specific thing,
the directory where runtime sockets live, is the :data:`RUNTIME_DIR` token that
each target replaces (systemd: ``%t``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from unitgen.errors import Problem, SpecError
from unitgen.features.pool.plan import pool_terms, with_sleep_flags
from unitgen.inunit.poolfile import PoolTerms
from unitgen.plan.container import Container, ProblemSink, plan_container
from unitgen.plan.gpus import Placement
from unitgen.plan.serverargs import gpu_defaults, served_names
from unitgen.spec.argscan import find_options, remove_found
from unitgen.spec.backends import Backend, get_backend
from unitgen.spec.model import InstanceSpec
from unitgen.spec.ports import (
    PRIVATE_PORT_RANGE,
    default_port,
    default_private_port,
    probe_host,
    resolve_listen,
)

__all__ = ["CONFIG_DIR", "RUNTIME_DIR", "STATE_DIR", "Allocator", "Endpoint", "FixedAllocator",
           "Instance", "resolve"]

# Stands for the service manager's runtime directory inside argv words. A NUL
# can never come from a spec (the spec parser refuses it), so it cannot collide.
RUNTIME_DIR = "\x00runtime\x00"
# The manager's configuration directory (systemd: ``%E``, /etc or ~/.config), where
# a gateway's HAProxy configuration lives: a token each target replaces.
CONFIG_DIR = "\x00config\x00"
# Its state directory (systemd: ``%S``, /var/lib or ~/.local/state), where a GPU
# pool member's measured memory is kept across restarts.
STATE_DIR = "\x00state\x00"


def runtime_subdir(name: str) -> str:
    """The instance's directory under the manager's runtime directory."""
    return f"unitgen-{name}"


def private_socket(name: str) -> str:
    """Path of the private Unix socket a server listens on (with the RUNTIME_DIR token)."""
    return f"{RUNTIME_DIR}/{runtime_subdir(name)}/http.sock"


@dataclass(frozen=True)
class Endpoint:
    """Where something listens: TCP host:port, or a Unix socket path."""

    kind: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""  # may start with RUNTIME_DIR

    def probe_target(self) -> str:
        """The target as the probe takes it: ``host:port`` or a socket path."""
        if self.kind == "unix":
            return self.path
        host = probe_host(self.host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def listen(self) -> str:
        """The address as a listening socket is configured: ``host:port`` or a path."""
        if self.kind == "unix":
            return self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Instance:
    """Everything a target needs to run one instance, already checked."""

    spec: InstanceSpec
    public: Endpoint
    port_from_spec: bool
    private: Endpoint | None  # None: the server takes the public socket itself
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    secrets: tuple[tuple[str, str], ...]  # variables that hold keys: never in a unit or argv
    probe_key_env: str | None  # the variable the probe reads its bearer key from
    health_path: str
    health_timeout: float
    notices: tuple[str, ...]
    gpus: Placement | None = None
    gateway: Any = None  # a gateway's plan (unitgen.features.gateway.plan.GatewayPlan); None otherwise
    container: Container | None = None  # image = ...: the server runs in podman
    pool: PoolTerms | None = None  # a GPU pool member's terms (features.pool.plan)

    @property
    def name(self) -> str:
        """Instance name."""
        return self.spec.name

    @property
    def backend(self) -> Backend:
        """The backend definition."""
        return get_backend(self.spec.backend)

    @property
    def uses_proxy(self) -> bool:
        """True when systemd-socket-proxyd joins the public socket to a private endpoint."""
        return self.private is not None


_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_]*)\}")
CUSTOM_PLACEHOLDERS = ("host", "port", "unix", "model", "name", "spec_dir")


class Allocator(Protocol):
    """What a plan needs from the host it is made for: ports for a spec that does
    not fix them, and GPUs. ``problem(key, message)`` reports what cannot be had
    (a busy explicit port, GPUs that do not fit) without stopping the plan, so
    every problem of every spec is found in one pass."""

    def public_port(self, spec: InstanceSpec, explicit: int | None, host: str,
                    problem: ProblemSink) -> int:
        """The public port: ``explicit`` when the spec fixes it (checked), else allocated."""
        ...

    def private_port(self, spec: InstanceSpec, public: int, problem: ProblemSink) -> int:
        """The private loopback port of a TCP-only server."""
        ...

    def placement(self, spec: InstanceSpec, problem: ProblemSink) -> Placement | None:
        """GPUs for the spec (None for CPU-only specs, or when they cannot be placed)."""
        ...


@dataclass
class FixedAllocator:
    """Ports stable per name (or given), GPUs given: what ``render`` shows and
    what a caller that allocated elsewhere passes in."""

    port: int | None = None
    private: int | None = None
    gpus: Placement | None = None
    private_range: tuple[int, int] = PRIVATE_PORT_RANGE

    def public_port(self, spec: InstanceSpec, explicit: int | None, host: str,
                    problem: ProblemSink) -> int:
        """See :class:`Allocator`."""
        if explicit is not None:
            return explicit
        return self.port if self.port is not None else default_port(spec.name)

    def private_port(self, spec: InstanceSpec, public: int, problem: ProblemSink) -> int:
        """See :class:`Allocator`."""
        return self.private or default_private_port(spec.name, self.private_range)

    def placement(self, spec: InstanceSpec, problem: ProblemSink) -> Placement | None:
        """See :class:`Allocator`."""
        return self.gpus


def resolve(spec: InstanceSpec, *, port: int | None = None, private_port: int | None = None,
            placement: Placement | None = None,
            private_range: tuple[int, int] = PRIVATE_PORT_RANGE,
            allocator: Allocator | None = None) -> Instance:
    """Plan one instance in one pass: the port rules, the endpoints, ports and GPUs
    from ``allocator`` (or the fixed ``port``/``private_port``/``placement``),
    secrets, argv. Raise SpecError listing every problem."""
    alloc = allocator or FixedAllocator(port, private_port, placement, private_range)
    backend = get_backend(spec.backend)
    listen = resolve_listen(
        source=spec.source, name=spec.name, backend=backend, spec_host=spec.host,
        spec_port=spec.port, args=spec.args, env=spec.env, command=spec.command,
    )
    problems = list(listen.problems)

    def problem(key: str, message: str) -> None:
        problems.append(Problem(spec.source, key, message))

    public_port = alloc.public_port(spec, listen.port if listen.port_from_spec else None,
                                    listen.host, problem)
    public = Endpoint("tcp", host=listen.host, port=public_port)

    args, env, secrets, key_env = _take_api_key(spec, backend, listen.args, listen.env, problem)
    env, secrets = _take_secret_env(spec, env, secrets, problem)

    private: Endpoint | None
    extra_notices: list[str] = []
    if spec.socket_activation:
        private = None
    elif backend.unix_flag is not None or _uses_unix(spec):
        # a custom command that says {unix} listens on the private Unix socket
        private = Endpoint("unix", path=private_socket(spec.name))
    else:
        pport = spec.private_port or alloc.private_port(spec, public.port, problem)
        if pport == public.port:
            problem("private_port", f"{pport} is the public port; the server must listen "
                                    "elsewhere (the socket owns the public port)")
        private = Endpoint("tcp", host="127.0.0.1", port=pport)
        if spec.private_port is not None and spec.private_port >= 1024:
            extra_notices.append(
                f"private_port: {spec.private_port} is not a privileged port: while the server "
                "is down another local user could bind it and receive the clients' traffic "
                "(the probe, the liveness checker and the proxies send nothing, the key "
                "included, to a socket of another uid); leave private_port unset to get one "
                "below 1024")
    if spec.private_port is not None and (private is None or private.kind != "tcp"):
        problem("private_port", f"is only used by servers that listen on loopback TCP; "
                                f"{spec.backend} listens on a private Unix socket")

    gpus = alloc.placement(spec, problem)
    if gpus is not None:
        if any(k == "CUDA_VISIBLE_DEVICES" for k, _ in env):
            problem("env.CUDA_VISIBLE_DEVICES", "is set by unitgen from gpus; remove it")
        env = (*env, ("CUDA_VISIBLE_DEVICES", ",".join(gpus.uuids)),
               ("CUDA_DEVICE_ORDER", "PCI_BUS_ID"))
        args = gpu_defaults(backend, args, len(gpus.uuids))
    args = served_names(spec, backend, args)
    # a member without placed GPUs (not placeable here) is planned as no member
    pool = pool_terms(spec, problem) if gpus is not None else None
    if pool is not None:
        args, env = with_sleep_flags(spec, args, env)
    argv = _argv(spec, backend, args, private, problem)
    if argv and (not argv[0] or argv[0][0] in "-@:+!" or ("/" in argv[0] and argv[0][0] != "/")):
        # Checked on the filled argv: a {model} in command[0] could otherwise smuggle
        # in a prefix systemd reads as a flag ("+" runs it as root despite User=).
        problem("command[0]" if spec.backend == "custom" else "executable",
                f"{argv[0]!r} must be an absolute path or a program name, without a leading "
                "'-@:+!' (systemd reads those as flags)")
    container = plan_container(spec, argv, tuple(k for k, _ in (*env, *secrets)),
                               (private.kind, private.path, private.port) if private else None,
                               gpus.uuids if gpus else (), problem)
    if problems:
        raise SpecError(problems=problems)
    return Instance(
        spec=spec, public=public, port_from_spec=listen.port_from_spec, private=private,
        argv=argv, env=env, secrets=secrets, probe_key_env=key_env,
        health_path=spec.health.path or backend.health_path, health_timeout=spec.health.timeout,
        notices=listen.notices + tuple(extra_notices) + (gpus.notices if gpus else ()),
        gpus=gpus, container=container, pool=pool)


def _uses_unix(spec: InstanceSpec) -> bool:
    words = (*(spec.command or ()), *spec.args)
    return spec.backend == "custom" and any(
        "{unix}" in w.replace("{{", "").replace("}}", "") for w in words)


def _take_secret_env(
    spec: InstanceSpec,
    env: tuple[tuple[str, str], ...],
    secrets: tuple[tuple[str, str], ...],
    problem: ProblemSink,
) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """Move the variables named in ``secret_env`` (HF_TOKEN and the like) out of
    the unit's environment into the secret file."""
    if not spec.secret_env:
        return env, secrets
    wanted = set(spec.secret_env)
    moved = tuple((k, v) for k, v in env if k in wanted)
    for k, v in moved:
        if not v or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in v):
            problem(f"env.{k}", "a secret must be one line of printable characters")
    taken = {k for k, _ in secrets}
    return (tuple((k, v) for k, v in env if k not in wanted),
            secrets + tuple((k, v) for k, v in moved if k not in taken))


def _argv(
    spec: InstanceSpec,
    backend: Backend,
    args: tuple[str, ...],
    private: Endpoint | None,
    problem: ProblemSink,
) -> tuple[str, ...]:
    if spec.backend == "custom":
        assert spec.command is not None  # noqa: S101 - the spec parser requires it
        used: set[str] = set()
        words = tuple(
            _fill(w, spec, private, used, problem, f"command[{i}]")
            for i, w in enumerate(spec.command)
        ) + tuple(_fill(w, spec, private, used, problem, f"args[{i}]") for i, w in enumerate(args))
        if spec.executable:
            words = (spec.executable, *words[1:])
        if private is not None and private.kind == "tcp" and "port" not in used:
            problem("command", "must say where the server listens: put {port} (and {host}) or "
                               "{unix} in it, or set socket_activation = true")
        if private is None and used & {"host", "port", "unix"}:
            problem("command", "uses {host}/{port}/{unix} but socket_activation = true: the "
                               "server gets its socket from systemd as fd 3")
        return words
    assert spec.model is not None and private is not None  # noqa: S101 - checked by spec parser
    exe = spec.executable or backend.program
    model = (spec.model,) if backend.model_flag is None else (backend.model_flag, spec.model)
    if private.kind == "unix":
        assert backend.unix_flag is not None  # noqa: S101
        listen: tuple[str, ...] = (backend.unix_flag, private.path)
    else:
        assert backend.host_flag and backend.port_flag  # noqa: S101
        listen = (backend.host_flag, private.host, backend.port_flag, str(private.port))
    return (exe, *backend.prefix, *model, *listen, *args)


def _fill(
    word: str,
    spec: InstanceSpec,
    private: Endpoint | None,
    used: set[str],
    problem: ProblemSink,
    key: str,
) -> str:
    def sub(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = match.group(1)
        used.add(name)
        if name == "port":
            return str(private.port) if private and private.kind == "tcp" else "{port}"
        if name == "host":
            return private.host if private and private.kind == "tcp" else "{host}"
        if name == "unix":
            return private_socket(spec.name)
        if name == "model":
            if spec.model is None:
                problem(key, "{model} is used but the spec has no model")
            return spec.model or ""
        if name == "name":
            return spec.name
        if name == "spec_dir":
            return str(Path(spec.source).resolve().parent)
        problem(key, f"unknown placeholder {token}; known: "
                     + ", ".join("{" + p + "}" for p in CUSTOM_PLACEHOLDERS)
                     + " (write {{ and }} for literal braces)")
        return token

    return _PLACEHOLDER.sub(sub, word)


def _take_api_key(
    spec: InstanceSpec,
    backend: Backend,
    args: tuple[str, ...],
    env: tuple[tuple[str, str], ...],
    problem: ProblemSink,
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], tuple[tuple[str, str], ...], str | None]:
    """Move the API key out of argv/env into a secret, so the probe can authenticate
    and no unit file or command line ever shows it."""
    if spec.backend == "custom":
        if spec.api_key_env is None:
            return args, env, (), None
        values = [v for k, v in env if k == spec.api_key_env]
        if not values:
            problem("api_key_env", f"names {spec.api_key_env}, which is not set in env")
            return args, env, (), None
        _check_key(values[0], f"env.{spec.api_key_env}", problem)
        kept = tuple((k, v) for k, v in env if k != spec.api_key_env)
        return args, kept, ((spec.api_key_env, values[0]),), spec.api_key_env

    hits = find_options(args, backend.key_flags, backend.syntax, many=backend.key_many)
    if any(h.more for h in hits):
        problem("args", f"{hits[0].spelled} is given several keys; unitgen keeps one key in the "
                        f"secret file ({backend.key_env}): give one")
        return args, env, (), None
    claims = [("args", h.shown(), h.value) for h in hits]
    if backend.key_env:
        claims += [(f"env.{k}", k, v) for k, v in env if k == backend.key_env]
    if not claims:
        return args, env, (), None
    for where, shown, value in claims:
        if value is None:
            problem(where, f"{shown}: the API key option needs a value")
            return args, env, (), None
    if len({v for _, _, v in claims}) > 1:
        problem(claims[1][0], "two different API keys are given; keep one")
        return args, env, (), None
    where, _, key = claims[0]
    assert key is not None  # noqa: S101
    if backend.key_env is None:
        problem(where, f"{spec.backend} takes its API key only on its command line, where any "
                       "local user can read it (ps, /proc); unitgen will not put it there. "
                       "Put an authenticating proxy in front, or use a server that reads the "
                       "key from its environment (vllm, llama-server)")
        return args, env, (), None
    _check_key(key, where, problem)
    kept_args = remove_found(args, hits)
    kept_env = tuple((k, v) for k, v in env if k != backend.key_env)
    return kept_args, kept_env, ((backend.key_env, key),), backend.key_env


def _check_key(key: str, where: str, problem: ProblemSink) -> None:
    if not key or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in key):
        problem(where, "the API key must be one line of printable characters")
