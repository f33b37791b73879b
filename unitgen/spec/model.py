"""Instance specs: one TOML file describes one model-server instance.

This module knows TOML and the meaning of each key, nothing about systemd or
supervisor: it turns a file into a validated, frozen :class:`InstanceSpec` or a
:class:`~unitgen.errors.SpecError` listing every problem with file and key.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unitgen.errors import Problem, SpecError
from unitgen.timespan import parse_timespan

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "DEFAULT_HEALTH_TIMEOUT",
    "DEFAULT_SWAP_DRAIN",
    "RESTART_POLICIES",
    "HealthSpec",
    "InstanceSpec",
    "load_spec",
    "parse_spec",
]

BACKENDS = ("vllm", "sglang", "llama-server", "llama-box", "vox-box", "custom")
ACTIVATIONS = ("eager", "on-demand")
RESTART_POLICIES = ("on-failure", "always", "on-abnormal", "no")

# A 70B model in bf16 is ~140 GB; from a network disk at 200 MB/s plus CUDA
# graph capture and warm-up that is 15 to 20 minutes. 30 minutes leaves room
# without letting a wedged server sit in "starting" for ever.
DEFAULT_HEALTH_TIMEOUT = 1800.0

# How long a member of a swap group may finish the requests it is serving once
# another member wants the GPU: long enough for a long generation, short enough
# that a member that keeps receiving requests cannot starve the others.
DEFAULT_SWAP_DRAIN = 180.0

NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Keys of the [systemd.*] escape hatch look like systemd directives.
DIRECTIVE_RE = re.compile(r"^[A-Z][A-Za-z0-9]*$")

TOP_KEYS = (
    "name", "backend", "model", "executable", "host", "port", "args", "env",
    "command", "socket_activation", "activation", "idle_stop", "health",
    "user", "group", "working_directory", "restart", "private_port",
    "max_connections", "description", "api_key_env", "systemd",
    "gpus", "gpu_memory", "gpu_share", "swap_group", "swap_drain",
)
HEALTH_KEYS = ("path", "timeout")
SYSTEMD_KEYS = ("unit", "service")


@dataclass(frozen=True)
class HealthSpec:
    """How readiness is judged: the HTTP path to poll and the start deadline."""

    path: str | None = None
    timeout: float = DEFAULT_HEALTH_TIMEOUT


@dataclass(frozen=True)
class InstanceSpec:
    """A validated instance spec. ``source`` is the file name used in messages."""

    source: str
    name: str
    backend: str
    model: str | None = None
    executable: str | None = None
    host: str | None = None
    port: int | None = None
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] | None = None
    socket_activation: bool = False
    activation: str = "eager"
    idle_stop: float | None = None
    health: HealthSpec = field(default_factory=HealthSpec)
    user: str | None = None
    group: str | None = None
    working_directory: str | None = None
    restart: str = "on-failure"
    private_port: int | None = None
    max_connections: int = 1024
    description: str | None = None
    api_key_env: str | None = None
    systemd_unit: tuple[tuple[str, str], ...] = ()
    systemd_service: tuple[tuple[str, str], ...] = ()
    gpus: int | tuple[int, ...] | tuple[str, ...] | None = None
    gpu_memory: int | None = None
    gpu_share: bool = False
    swap_group: str | None = None
    swap_drain: float = DEFAULT_SWAP_DRAIN


class _Checker:
    """Collects problems while reading one spec table."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def add(self, key: str, message: str) -> None:
        self.problems.append(Problem(self.source, key, message))

    def unknown_keys(self, table: dict[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            allowed_list = ", ".join(allowed)
            self.add(f"{prefix}{key}", f"unknown key{hint}; known keys: {allowed_list}")

    def text(self, table: dict[str, Any], key: str, *, prefix: str = "") -> str | None:
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, str):
            self.add(prefix + key, f"must be a string, not {_kind(value)}")
            return None
        if "\x00" in value:
            self.add(prefix + key, "must not contain a NUL character")
            return None
        return value

    def word(self, value: object, key: str) -> str | None:
        """A string for argv or environment; numbers are accepted and written as text."""
        if isinstance(value, bool):
            self.add(key, f"must be a string, not a boolean ({value!r}); quote it")
            return None
        if isinstance(value, int | float):
            return str(value)
        if not isinstance(value, str):
            self.add(key, f"must be a string, not {_kind(value)}")
            return None
        if "\x00" in value:
            self.add(key, "must not contain a NUL character (no argv or environment can hold one)")
            return None
        return value

    def integer(self, table: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
        if key not in table:
            return None
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(key, f"must be an integer, not {_kind(value)}")
            return None
        if not lo <= value <= hi:
            self.add(key, f"{value} is out of range {lo}..{hi}")
            return None
        return value

    def boolean(self, table: dict[str, Any], key: str) -> bool | None:
        if key not in table:
            return None
        value = table[key]
        if not isinstance(value, bool):
            self.add(key, f"must be true or false, not {_kind(value)}")
            return None
        return value

    def duration(self, table: dict[str, Any], key: str, *, prefix: str = "") -> float | None:
        if key not in table:
            return None
        value = table[key]
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            self.add(prefix + key, f"must be a time span like \"15min\", not {_kind(value)}")
            return None
        try:
            seconds = float(value) if not isinstance(value, str) else parse_timespan(value)
        except ValueError as exc:
            self.add(prefix + key, str(exc))
            return None
        if seconds <= 0:
            self.add(prefix + key, "must be longer than zero")
            return None
        return seconds

    def choice(self, table: dict[str, Any], key: str, choices: tuple[str, ...]) -> str | None:
        value = self.text(table, key)
        if value is None:
            return None
        if value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.add(key, f"{value!r} is not one of {', '.join(choices)}{hint}")
            return None
        return value


def _kind(value: object) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "a list", dict: "a table",
    }.get(type(value), type(value).__name__)


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
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(problems=[Problem(source, "", f"invalid TOML: {exc}")]) from None
    return _from_table(data, source)


def _from_table(data: dict[str, Any], source: str) -> InstanceSpec:
    c = _Checker(source)
    c.unknown_keys(data, TOP_KEYS, "")

    name = c.text(data, "name")
    if name is None and "name" not in data:
        c.add("name", "is required (lowercase letters, digits and '-')")
    elif name is not None and not NAME_RE.match(name):
        c.add("name", f"{name!r} must be 1-48 lowercase letters, digits or '-', "
                      "not starting or ending with '-'")
        name = None
    elif name is not None and name.endswith("-backend"):
        c.add("name", f"{name!r} must not end in '-backend': that suffix names the server "
                      "unit of another instance")
        name = None

    backend = c.choice(data, "backend", BACKENDS)
    if "backend" not in data:
        c.add("backend", f"is required: one of {', '.join(BACKENDS)}")

    model = c.text(data, "model")
    if backend not in (None, "custom") and "model" not in data:
        c.add("model", f"is required for backend {backend!r} (a model path or id)")
    if model == "":
        c.add("model", "must not be empty")

    executable = c.text(data, "executable")
    if executable is not None:
        _check_executable(c, "executable", executable)

    host = c.text(data, "host")
    port = c.integer(data, "port", 1, 65535)
    private_port = c.integer(data, "private_port", 1, 65535)
    max_connections = c.integer(data, "max_connections", 1, 1_000_000)

    args = _word_list(c, data, "args") or ()
    env = _env_table(c, data)
    command: tuple[str, ...] | None = None
    if "command" in data:
        command = _word_list(c, data, "command")
        if backend not in (None, "custom"):
            c.add("command", f"is only for backend 'custom'; backend {backend!r} builds its own "
                             "command line (use args for extra arguments)")
        elif command == ():
            c.add("command", "must not be empty")
        elif command:
            _check_executable(c, "command[0]", command[0])
    elif backend == "custom":
        c.add("command", "is required for backend 'custom': the server's argv, with "
                         "{host}/{port} or {unix} where it listens")

    socket_activation = c.boolean(data, "socket_activation")
    if socket_activation is not None and backend not in (None, "custom"):
        c.add("socket_activation", f"is only for backend 'custom'; {backend!r} cannot take its "
                                   "listening socket from systemd")

    activation = c.choice(data, "activation", ACTIVATIONS) or "eager"
    idle_stop = c.duration(data, "idle_stop")
    if idle_stop is not None and activation != "on-demand":
        c.add("idle_stop", "needs activation = \"on-demand\": an eager instance is started "
                           "again at boot and by deploy, so stopping it when idle would fight that")
    if idle_stop is not None and socket_activation:
        c.add("idle_stop", "is not available with socket_activation = true: the server owns the "
                           "connections, so only it can know it is idle")

    health = HealthSpec()
    if "health" in data:
        table = data["health"]
        if not isinstance(table, dict):
            c.add("health", f"must be a table ([health]), not {_kind(table)}")
        else:
            c.unknown_keys(table, HEALTH_KEYS, "health.")
            path = c.text(table, "path", prefix="health.")
            if path is not None and (not path.startswith("/") or any(
                ch.isspace() or ord(ch) < 0x21 or ord(ch) == 0x7F for ch in path
            )):
                c.add("health.path", f"{path!r} must start with '/' and contain no spaces or "
                                     "control characters")
                path = None
            timeout = c.duration(table, "timeout", prefix="health.")
            health = HealthSpec(path=path, timeout=timeout or DEFAULT_HEALTH_TIMEOUT)

    user = c.text(data, "user")
    group = c.text(data, "group")
    for key, value in (("user", user), ("group", group)):
        if value is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$", value):
            c.add(key, f"{value!r} is not a valid user or group name")
    working_directory = c.text(data, "working_directory")
    if working_directory is not None and not working_directory.startswith("/"):
        c.add("working_directory", f"{working_directory!r} must be an absolute path")
    restart = c.choice(data, "restart", RESTART_POLICIES) or "on-failure"
    description = c.text(data, "description")
    api_key_env = c.text(data, "api_key_env")
    if api_key_env is not None:
        if backend not in (None, "custom"):
            c.add("api_key_env", f"is only for backend 'custom'; {backend!r} has a known key "
                                 "option (put it in args or env)")
        elif not ENV_NAME_RE.match(api_key_env):
            c.add("api_key_env", f"{api_key_env!r} is not an environment variable name")

    systemd_unit, systemd_service = _systemd_tables(c, data)
    gpus, gpu_memory, gpu_share = _gpu_keys(c, data)
    swap_group = c.text(data, "swap_group")
    if swap_group is not None and not NAME_RE.match(swap_group):
        c.add("swap_group", f"{swap_group!r} must be 1-48 lowercase letters, digits or '-'")
        swap_group = None
    elif swap_group is not None and activation != "on-demand":
        c.add("swap_group", "needs activation = \"on-demand\": members of a swap group take "
                            "turns, each loaded when a request asks for it")
    if swap_group is not None and socket_activation:
        c.add("swap_group", "is not available with socket_activation = true: a member drains "
                            "its requests through unitgen's proxy before it yields the GPU")
    swap_drain = c.duration(data, "swap_drain")
    if swap_drain is not None and swap_group is None and "swap_group" not in data:
        c.add("swap_drain", "needs swap_group: it bounds how long a member finishes its "
                            "requests before another member of its group loads")

    if c.problems and (name is None or backend is None):
        raise SpecError(problems=c.problems)
    assert name is not None and backend is not None  # noqa: S101 - guaranteed by the checks above
    spec = InstanceSpec(
        source=source, name=name, backend=backend, model=model, executable=executable,
        host=host, port=port, args=tuple(args), env=env, command=command,
        socket_activation=bool(socket_activation), activation=activation, idle_stop=idle_stop,
        health=health, user=user, group=group, working_directory=working_directory,
        restart=restart, private_port=private_port,
        max_connections=max_connections or 1024, description=description,
        api_key_env=api_key_env, systemd_unit=systemd_unit, systemd_service=systemd_service,
        gpus=gpus, gpu_memory=gpu_memory, gpu_share=gpu_share, swap_group=swap_group,
        swap_drain=swap_drain or DEFAULT_SWAP_DRAIN,
    )
    if c.problems:
        # The valid keys still make a spec, so `check` can go on to the port
        # rules and explain every problem in one run.
        raise SpecError(problems=c.problems, partial=spec)
    return spec


def _check_executable(c: _Checker, key: str, value: str) -> None:
    # systemd reads leading -@:+! on ExecStart= as flags, even inside quotes.
    if not value or value[0] in "-@:+!" or any(ord(ch) < 0x20 for ch in value):
        c.add(key, f"{value!r} must be an absolute path or a program name, without leading "
                   "'-@:+!' or control characters")
    elif "/" in value and not value.startswith("/"):
        c.add(key, f"{value!r} must be an absolute path (or a bare program name found on PATH)")


def _word_list(c: _Checker, data: dict[str, Any], key: str) -> tuple[str, ...] | None:
    if key not in data:
        return None
    value = data[key]
    if isinstance(value, str):
        c.add(key, f"must be a list of strings, e.g. {key} = [\"--dtype\", \"bfloat16\"], "
                   "not one string")
        return None
    if not isinstance(value, list):
        c.add(key, f"must be a list of strings, not {_kind(value)}")
        return None
    words = [c.word(item, f"{key}[{i}]") for i, item in enumerate(value)]
    if any(w is None for w in words):
        return None
    return tuple(w for w in words if w is not None)


def _env_table(c: _Checker, data: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    if "env" not in data:
        return ()
    table = data["env"]
    if not isinstance(table, dict):
        c.add("env", f"must be a table of NAME = \"value\", not {_kind(table)}")
        return ()
    out: list[tuple[str, str]] = []
    for name, value in table.items():
        if not ENV_NAME_RE.match(name):
            c.add(f"env.{name}", "is not a valid environment variable name "
                                 "(letters, digits, '_', not starting with a digit)")
            continue
        word = c.word(value, f"env.{name}")
        if word is not None:
            out.append((name, word))
    return tuple(out)


def _systemd_tables(
    c: _Checker, data: dict[str, Any]
) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    if "systemd" not in data:
        return (), ()
    table = data["systemd"]
    if not isinstance(table, dict):
        c.add("systemd", f"must be a table ([systemd.service]), not {_kind(table)}")
        return (), ()
    c.unknown_keys(table, SYSTEMD_KEYS, "systemd.")
    result: list[tuple[tuple[str, str], ...]] = []
    for section in SYSTEMD_KEYS:
        entries: list[tuple[str, str]] = []
        sub = table.get(section, {})
        if not isinstance(sub, dict):
            c.add(f"systemd.{section}", f"must be a table, not {_kind(sub)}")
            sub = {}
        for key, value in sub.items():
            where = f"systemd.{section}.{key}"
            if not DIRECTIVE_RE.match(key):
                c.add(where, "is not a systemd directive name (like Nice or MemoryMax)")
                continue
            word = c.word(value, where)
            if word is None:
                continue
            if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in word):
                c.add(where, "must be one line without control characters")
                continue
            entries.append((key, word))
        result.append(tuple(entries))
    return result[0], result[1]


def _gpu_keys(
    c: _Checker, data: dict[str, Any]
) -> tuple[int | tuple[int, ...] | tuple[str, ...] | None, int | None, bool]:
    gpus: int | tuple[int, ...] | tuple[str, ...] | None = None
    if "gpus" in data:
        value = data["gpus"]
        if isinstance(value, bool):
            c.add("gpus", "must be a count, a list of indexes or a list of GPU UUIDs")
        elif isinstance(value, int):
            if not 0 <= value <= 64:
                c.add("gpus", f"{value} is out of range 0..64")
            else:
                gpus = value
        elif isinstance(value, list) and value and all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 64 for v in value
        ):
            if len(set(value)) != len(value):
                c.add("gpus", "lists a GPU twice")
            else:
                gpus = tuple(int(v) for v in value)
        elif isinstance(value, list) and value and all(
            isinstance(v, str) and re.match(r"^(GPU|MIG)-[0-9A-Za-z/-]+$", v) for v in value
        ):
            if len(set(value)) != len(value):
                c.add("gpus", "lists a GPU twice")
            else:
                gpus = tuple(str(v) for v in value)
        else:
            c.add("gpus", "must be a count (gpus = 2), a list of indexes (gpus = [0, 1]) or a "
                          "list of UUIDs (gpus = [\"GPU-...\"])")
    gpu_memory: int | None = None
    if "gpu_memory" in data:
        raw = data["gpu_memory"]
        try:
            gpu_memory = parse_size(raw) if isinstance(raw, str) else None
        except ValueError as exc:
            c.add("gpu_memory", str(exc))
        else:
            if gpu_memory is None:
                c.add("gpu_memory", f"must be a size like \"40GiB\", not {_kind(raw)}")
        if gpus is None and "gpus" not in data:
            c.add("gpu_memory", "needs gpus (how many GPUs, or which)")
    gpu_share = c.boolean(data, "gpu_share") or False
    return gpus, gpu_memory, gpu_share


_SIZE_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
    "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2,
    "gib": 1024**3, "tib": 1024**4,
}


def parse_size(text: str) -> int:
    """Parse ``40GiB`` / ``500MB`` / ``1024`` into bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 40GiB, 500MiB, 24GB)")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"{text!r} must be larger than zero")
    return size
