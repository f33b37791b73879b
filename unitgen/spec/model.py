"""Instance specs: one TOML file describes one model-server instance.

This module knows TOML and the meaning of each key, nothing about systemd or
supervisor: it turns a file into a validated, frozen :class:`InstanceSpec` or a
:class:`~unitgen.errors.SpecError` listing every problem with file and key. Each
key's value is read by :mod:`unitgen.spec.readers`; the rules that involve more
than one key are here.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unitgen.errors import Problem, SpecError
from unitgen.features.gateway.spec import GatewaySpec, is_gateway, parse_gateway
from unitgen.spec.backends import BackendName
from unitgen.spec.keys import (
    KEYS,
    TABLES,
    Activation,
    Balance,
    Ipc,
    Pull,
    RestartPolicy,
    default_of,
    sub_keys,
    top_keys,
)
from unitgen.spec.readers import OFF, READERS, Checker, check_executable, kind_of, parse_size

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "DEFAULT_HEALTH_TIMEOUT",
    "DEFAULT_SWAP_DRAIN",
    "RESTART_POLICIES",
    "HealthSpec",
    "InstanceSpec",
    "load_any",
    "load_spec",
    "parse_size",
    "parse_spec",
]

BACKENDS = tuple(b.value for b in BackendName)
ACTIVATIONS = tuple(a.value for a in Activation)
RESTART_POLICIES = tuple(r.value for r in RestartPolicy)

DEFAULT_HEALTH_TIMEOUT: float = default_of("health.timeout")
DEFAULT_SWAP_DRAIN: float = default_of("swap_drain")

# The fields of both records are the declared keys (unitgen.spec.keys), each
# with its declared default: no default is written here. Their types are what
# each key's reader returns.


@dataclass(frozen=True)
class HealthSpec:
    """How readiness is judged: the HTTP path to poll, the start deadline and the
    liveness bound after ready."""

    path: str | None = default_of("health.path")
    timeout: float = default_of("health.timeout")
    watchdog: float | None = default_of("health.watchdog")  # None: "off"


@dataclass(frozen=True)
class InstanceSpec:
    """A validated instance spec. ``source`` is the file name used in messages."""

    source: str
    name: str
    backend: BackendName
    model: str | None = default_of("model")
    executable: str | None = default_of("executable")
    host: str | None = default_of("host")
    port: int | None = default_of("port")
    args: tuple[str, ...] = default_of("args")
    env: tuple[tuple[str, str], ...] = default_of("env")
    secret_env: tuple[str, ...] = default_of("secret_env")
    command: tuple[str, ...] | None = default_of("command")
    socket_activation: bool = default_of("socket_activation")
    activation: Activation = default_of("activation")  # noqa: RUF009 - an enum member
    idle_stop: float | None = default_of("idle_stop")
    health: HealthSpec = field(default_factory=HealthSpec)
    user: str | None = default_of("user")
    group: str | None = default_of("group")
    working_directory: str | None = default_of("working_directory")
    restart: RestartPolicy = default_of("restart")  # noqa: RUF009 - an enum member
    private_port: int | None = default_of("private_port")
    max_connections: int = default_of("max_connections")
    description: str | None = default_of("description")
    api_key_env: str | None = default_of("api_key_env")
    systemd_unit: tuple[tuple[str, str], ...] = default_of("systemd.unit")
    systemd_service: tuple[tuple[str, str], ...] = default_of("systemd.service")
    gpus: int | tuple[int, ...] | tuple[str, ...] | None = default_of("gpus")
    gpu_memory: int | None = default_of("gpu_memory")
    gpu_share: bool = default_of("gpu_share")
    swap_group: str | None = default_of("swap_group")
    swap_drain: float = default_of("swap_drain")
    gpu_pool: bool = default_of("gpu_pool")  # on-demand with gpus: share them by memory
    pool_min_turn: float = default_of("pool_min_turn")
    pool_sleep: bool = default_of("pool_sleep")
    hardening: bool = default_of("hardening")  # system scope: sandbox the server
    offline: bool = default_of("offline")  # no network: PrivateNetwork= where it can
    gateway: str | None = default_of("gateway")  # the gateway that routes to it
    aliases: tuple[str, ...] = default_of("aliases")  # more route names
    max_concurrent: int | None = default_of("max_concurrent")  # at the gateway
    queue_timeout: float = default_of("queue_timeout")  # at the gateway, then 429
    balance: Balance = default_of("balance")  # noqa: RUF009 - an enum member
    image: str | None = default_of("image")  # run the server with podman (docs/containers.md)
    volumes: tuple[str, ...] = default_of("volumes")
    pull: Pull = default_of("pull")  # noqa: RUF009 - an enum member
    pull_timeout: float = default_of("pull_timeout")
    shm_size: int | None = default_of("shm_size")
    ipc: Ipc = default_of("ipc")  # noqa: RUF009 - an enum member
    podman_args: tuple[str, ...] = default_of("podman_args")


# The records that hold a table's keys (Key.field names the record).
_RECORDS: dict[str, type[HealthSpec]] = {"health": HealthSpec}


def load_spec(path: Path) -> InstanceSpec:
    """Read and validate one spec file; raise SpecError naming the file on any problem."""
    source = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(problems=[Problem(source, "", f"cannot read: {exc.strerror}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(problems=[Problem(source, "", f"not UTF-8: {exc.reason}")]) from None
    return parse_spec(text, source)


def parse_spec(text: str, source: str) -> InstanceSpec:
    """Validate TOML text as an instance spec; ``source`` names it in messages."""
    return from_mapping(_toml_of(text, source), source)


def _toml_of(text: str, source: str) -> dict[str, Any]:
    # Some Windows editors save UTF-8 with a byte order mark; TOML does not allow one.
    text = text.removeprefix("\ufeff")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(problems=[Problem(source, "", f"invalid TOML: {exc}")]) from None


def load_any(path: Path) -> InstanceSpec | GatewaySpec:
    """An instance spec, or a gateway's (``kind = "gateway"``)."""
    source = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise SpecError(problems=[Problem(source, "", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise SpecError(problems=[Problem(source, "", f"not UTF-8: {exc.reason}")]) from None
    data = _toml_of(text, source)
    if is_gateway(data):
        return parse_gateway(data, source)
    if "kind" in data:
        raise SpecError(problems=[Problem(source, "kind", f"{data['kind']!r}: a spec is an "
                                          "instance (no kind) or kind = \"gateway\"")])
    return from_mapping(data, source)


def from_mapping(data: dict[str, Any], source: str) -> InstanceSpec:
    """Validate a spec given as a mapping (parsed TOML, or JSON/YAML from elsewhere)."""
    c = Checker(source)
    c.unknown_keys(data, top_keys(), "")
    values: dict[str, Any] = {}
    tables_ok: dict[str, dict[str, Any]] = {}
    for table, shown in TABLES.items():
        if table not in data:
            continue
        sub = data[table]
        if not isinstance(sub, dict):
            c.add(table, f"must be a table ({shown}), not {kind_of(sub)}")
            continue
        c.unknown_keys(sub, sub_keys(table), f"{table}.")
        tables_ok[table] = sub
    for key in KEYS:
        table, _, leaf = key.name.rpartition(".")
        container = tables_ok.get(table, {}) if table else data
        if leaf in container:
            values[key.name] = READERS[key.kind](c, key, container[leaf])
    _rules(c, data, values)

    name, backend = values.get("name"), values.get("backend")
    if c.problems and (name is None or backend is None):
        raise SpecError(problems=c.problems)
    spec = _build(source, values)
    if c.problems:
        # The valid keys still make a spec, so `check` can go on to the port
        # rules and explain every problem in one run.
        raise SpecError(problems=c.problems, partial=spec)
    return spec


def _rules(c: Checker, data: dict[str, Any], values: dict[str, Any]) -> None:
    """What involves more than one key. Keys whose own value was wrong are None."""
    if "name" not in data:
        c.add("name", "is required (lowercase letters, digits and '-')")
    name = values.get("name")
    if name is not None and name.endswith("-backend"):
        c.add("name", f"{name!r} must not end in '-backend': that suffix names the server "
                      "unit of another instance")
        values["name"] = None
    if "backend" not in data:
        c.add("backend", f"is required: one of {', '.join(BACKENDS)}")
    # as text: messages show it as the spec writes it ('vllm', not a member's repr)
    backend = None if values.get("backend") is None else str(values["backend"])
    if backend not in (None, "custom") and "model" not in data:
        c.add("model", f"is required for backend {backend!r} (a model path or id)")
    if values.get("model") == "":
        c.add("model", "must not be empty")
    for key in KEYS:
        if key.name in values and key.backends and backend is not None \
                and backend not in key.backends:
            c.add(key.name, f"is only for backend {key.backends[0]!r}; "
                            + key.only_why.format(backend=backend))
            values[key.name] = None
    for key in KEYS:
        if key.needs and key.name in data and key.needs not in data:
            c.add(key.name, f"needs {key.needs}: it says how the container runs "
                            "(docs/containers.md)")
    if "image" in data:
        for account in ("user", "group"):
            if account in data:
                c.add(account, "is not available with image: podman runs as root and the "
                           "server runs as the image's user (podman_args = [\"--user=...\"] "
                           "picks another one inside the container)")
    command = values.get("command")
    if "command" in data and backend == "custom" and command is not None:
        if command == ():
            c.add("command", "must not be empty")
        else:
            check_executable(c, "command[0]", command[0])
    elif "command" not in data and backend == "custom":
        c.add("command", "is required for backend 'custom': the server's argv, with "
                         "{host}/{port} or {unix} where it listens")
    activation = values.get("activation") or default_of("activation")
    if values.get("idle_stop") is not None and activation != "on-demand":
        c.add("idle_stop", "needs activation = \"on-demand\": an eager instance is started "
                           "again at boot and by deploy, so stopping it when idle would fight that")
    if values.get("idle_stop") is not None and values.get("socket_activation"):
        c.add("idle_stop", "is not available with socket_activation = true: the server owns the "
                           "connections, so only it can know it is idle")
    if "gpu_memory" in data and "gpus" not in data:
        c.add("gpu_memory", "needs gpus (how many GPUs, or which)")
    swap_group = values.get("swap_group")
    if swap_group is not None and activation != "on-demand":
        c.add("swap_group", "needs activation = \"on-demand\": members of a swap group take "
                            "turns, each loaded when a request asks for it")
    if swap_group is not None and values.get("socket_activation"):
        c.add("swap_group", "is not available with socket_activation = true: a member drains "
                            "its requests through unitgen's proxy before it yields the GPU")
    _pool_rules(c, data, values, activation)
    env_names = {k for k, _ in values.get("env") or ()}
    for i, var in enumerate(values.get("secret_env") or ()):
        if var not in env_names:
            c.add(f"secret_env[{i}]", f"names {var}, which is not set in env")


def _pool_rules(c: Checker, data: dict[str, Any], values: dict[str, Any],
                activation: str) -> None:
    """Swap groups and GPU pools (docs/swap.md): an on-demand instance with GPUs
    is a pool member unless it is in a swap group or says gpu_pool = false."""
    pooled = (activation == "on-demand" and "gpus" in data and values.get("gpus") != 0
              and "swap_group" not in data and values.get("gpu_pool") is not False
              and not values.get("socket_activation"))
    if "swap_drain" in data and "swap_group" not in data and not pooled:
        c.add("swap_drain", "needs swap_group or a GPU pool (an on-demand instance with gpus): "
                            "it bounds how long a member finishes its requests before another "
                            "member loads")
    for key in ("gpu_pool", "pool_min_turn", "pool_sleep"):
        if key not in data:
            continue
        if activation != "on-demand":
            c.add(key, "needs activation = \"on-demand\": GPU pool members are loaded when a "
                       "request asks for them")
        elif "gpus" not in data:
            c.add(key, "needs gpus: a GPU pool is the on-demand instances on the same GPUs")
        elif "swap_group" in data:
            c.add(key, "is not for a swap group member: its group runs one member at a time")
        elif key != "gpu_pool" and not pooled:
            c.add(key, "has no effect: this instance is not in a GPU pool (gpu_pool = false "
                       "or socket_activation = true)")


def _build(source: str, values: dict[str, Any]) -> InstanceSpec:
    """The spec from what the readers returned: every declared key becomes its
    field, the declared default where the key is absent or its value was wrong
    (None). No key is listed here, so none can be left out."""
    records: dict[str, dict[str, Any]] = {"": {}, **{r: {} for r in _RECORDS}}
    for key in KEYS:
        value = values.get(key.name)
        if value is None:
            value = key.default
        elif key.can_be_off and value == OFF:
            value = None
        record, attr = key.field
        records[record][attr] = value
    nested: dict[str, Any] = {name: cls(**records[name]) for name, cls in _RECORDS.items()}
    return InstanceSpec(source=source, **nested, **records[""])
