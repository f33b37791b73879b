"""Instance specs: one TOML file describes one model-server instance.

This module knows TOML and the meaning of each key, nothing about systemd or
supervisor: it turns a file into a validated, frozen :class:`InstanceSpec` or a
:class:`~unitgen.errors.SpecError` listing every problem with file and key.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unitgen.errors import Problem, SpecError
from unitgen.spec.backends import BackendName
from unitgen.spec.keys import (
    KEYS,
    TABLES,
    Activation,
    Key,
    Kind,
    RestartPolicy,
    check_bounds,
    fullmatch,
    sub_keys,
    top_keys,
)
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
    "parse_size",
    "parse_spec",
]

BACKENDS = tuple(b.value for b in BackendName)
ACTIVATIONS = tuple(a.value for a in Activation)
RESTART_POLICIES = tuple(r.value for r in RestartPolicy)

# A 70B model in bf16 is ~140 GB; from a network disk at 200 MB/s plus CUDA
# graph capture and warm-up that is 15 to 20 minutes. 30 minutes leaves room
# without letting a wedged server sit in "starting" for ever.
DEFAULT_HEALTH_TIMEOUT = 1800.0
# How long a member of a swap group may finish the requests it is serving once
# another member wants the GPU: long enough for a long generation, short enough
# that a member that keeps receiving requests cannot starve the others.
DEFAULT_SWAP_DRAIN = 180.0

# After ready, a server that has not answered its health path for this long is
# restarted by systemd's watchdog: three checks of 10 s each.
DEFAULT_WATCHDOG = 30.0

# What a duration key that can be turned off reads as when it is ("off", false).
OFF = -1.0

ENV_NAME_RE = r"[A-Za-z_][A-Za-z0-9_]*"
# Keys of the [systemd.*] escape hatch look like systemd directives.
DIRECTIVE_RE = r"[A-Z][A-Za-z0-9]*"


@dataclass(frozen=True)
class HealthSpec:
    """How readiness is judged: the HTTP path to poll and the start deadline."""

    path: str | None = None
    timeout: float = DEFAULT_HEALTH_TIMEOUT
    watchdog: float | None = DEFAULT_WATCHDOG  # None: "off"


@dataclass(frozen=True)
class InstanceSpec:
    """A validated instance spec. ``source`` is the file name used in messages."""

    source: str
    name: str
    backend: BackendName
    model: str | None = None
    executable: str | None = None
    host: str | None = None
    port: int | None = None
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    secret_env: tuple[str, ...] = ()
    command: tuple[str, ...] | None = None
    socket_activation: bool = False
    activation: Activation = Activation.EAGER
    idle_stop: float | None = None
    health: HealthSpec = field(default_factory=HealthSpec)
    user: str | None = None
    group: str | None = None
    working_directory: str | None = None
    restart: RestartPolicy = RestartPolicy.ON_FAILURE
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
    hardening: bool = True  # system scope: sandbox the server (docs/reliability.md)
    offline: bool = False  # the server needs no network: PrivateNetwork= where it can


# Only a spec given as a mapping (JSON, YAML via Ansible) can hold these; TOML files
# are UTF-8 and cannot.
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Checker:
    """Collects problems while reading one spec."""

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

    def word(self, value: object, key: str) -> str | None:
        """A string for argv or environment; numbers are accepted and written as text."""
        if isinstance(value, bool):
            self.add(key, f"must be a string, not a boolean ({_toml(value)}); quote it")
            return None
        if isinstance(value, int | float):
            return str(value)
        if not isinstance(value, str):
            self.add(key, f"must be a string, not {_kind(value)}")
            return None
        if "\x00" in value:
            self.add(key, "must not contain a NUL character (no argv or environment can hold one)")
            return None
        if _SURROGATE.search(value):
            self.add(key, "must be valid Unicode (a lone surrogate cannot be written to a file)")
            return None
        return value


def _kind(value: object) -> str:
    return {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "a list", dict: "a table",
    }.get(type(value), type(value).__name__)


def _toml(value: object) -> str:
    """A value as TOML writes it (``true``, not Python's ``True``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


# --- one reader per kind of key ---------------------------------------------


def _read_text(c: _Checker, key: Key, value: object) -> str | None:
    if not isinstance(value, str):
        c.add(key.name, f"must be a string, not {_kind(value)}")
        return None
    if "\x00" in value:
        c.add(key.name, "must not contain a NUL character")
        return None
    if _SURROGATE.search(value):
        c.add(key.name, "must be valid Unicode (a lone surrogate cannot be written to a file)")
        return None
    if key.pattern and not fullmatch(key.pattern, value):
        c.add(key.name, f"{value!r} {key.pattern_doc}")
        return None
    return value


def _read_choice(c: _Checker, key: Key, value: object) -> str | None:
    text = _read_text(c, key, value)
    if text is None:
        return None
    if text not in key.choices:
        close = difflib.get_close_matches(text, key.choices, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        c.add(key.name, f"{text!r} is not one of {', '.join(key.choices)}{hint}")
        return None
    return text


def _read_integer(c: _Checker, key: Key, value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        hint = ""
        if isinstance(value, str) and value.strip().isdigit():
            hint = f" (write {key.name} = {value.strip()}, without quotes)"
        c.add(key.name, f"must be an integer, not {_kind(value)}{hint}")
        return None
    if key.lo is not None and key.hi is not None and not key.lo <= value <= key.hi:
        c.add(key.name, f"{value} is out of range {key.lo:g}..{key.hi:g}")
        return None
    return value


def _read_boolean(c: _Checker, key: Key, value: object) -> bool | None:
    if not isinstance(value, bool):
        hint = ""
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            hint = f" (write {key.name} = {value.strip().lower()}, without quotes)"
        c.add(key.name, f"must be true or false, not {_kind(value)}{hint}")
        return None
    return value


def _read_duration(c: _Checker, key: Key, value: object) -> float | None:
    if key.can_be_off and (value is False or value == "off"):
        return OFF
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        c.add(key.name, f"must be a time span like \"15min\", not {_kind(value)}")
        return None
    try:
        seconds = float(value) if not isinstance(value, str) else parse_timespan(value)
    except ValueError as exc:
        c.add(key.name, str(exc))
        return None
    if seconds <= 0:
        c.add(key.name, "must be longer than zero")
        return None
    why = check_bounds(key, seconds)
    if why:
        c.add(key.name, why)
        return None
    return seconds


def _read_words(c: _Checker, key: Key, value: object) -> tuple[str, ...] | None:
    if isinstance(value, str):
        c.add(key.name, f"must be a list of strings, e.g. {key.name} = [\"--dtype\", "
                        "\"bfloat16\"], not one string")
        return None
    if not isinstance(value, list):
        c.add(key.name, f"must be a list of strings, not {_kind(value)}")
        return None
    words = [c.word(item, f"{key.name}[{i}]") for i, item in enumerate(value)]
    if any(w is None for w in words):
        return None
    return tuple(w for w in words if w is not None)


def _read_env(c: _Checker, key: Key, value: object) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(value, dict):
        c.add(key.name, f"must be a table of NAME = \"value\", not {_kind(value)}")
        return None
    out: list[tuple[str, str]] = []
    for name, item in value.items():
        if not fullmatch(ENV_NAME_RE, name):
            c.add(f"{key.name}.{name}", "is not a valid environment variable name "
                                        "(letters, digits, '_', not starting with a digit)")
            continue
        word = c.word(item, f"{key.name}.{name}")
        if word is not None:
            out.append((name, word))
    return tuple(out)


def _read_directives(c: _Checker, key: Key, value: object) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(value, dict):
        c.add(key.name, f"must be a table, not {_kind(value)}")
        return None
    entries: list[tuple[str, str]] = []
    for name, item in value.items():
        where = f"{key.name}.{name}"
        if not fullmatch(DIRECTIVE_RE, name):
            c.add(where, "is not a systemd directive name (like Nice or MemoryMax)")
            continue
        word = c.word(item, where)
        if word is None:
            continue
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F or ch in "\x85\u2028\u2029" for ch in word):
            c.add(where, "must be one line without control characters")
            continue
        entries.append((name, word))
    return tuple(entries)


def _read_program(c: _Checker, key: Key, value: object) -> str | None:
    text = _read_text(c, key, value)
    if text is not None and not _check_executable(c, key.name, text):
        return None
    return text


def _read_path(c: _Checker, key: Key, value: object) -> str | None:
    text = _read_text(c, key, value)
    if text is None:
        return None
    if not text.startswith("/"):
        c.add(key.name, f"{text!r} must be an absolute path")
        return None
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in text) or text.endswith("\\"):
        c.add(key.name, f"{text!r} must be one line without control characters or a "
                        "trailing backslash")
        return None
    if text != text.strip(" \t"):
        # systemd strips them, so the unit would name another directory
        c.add(key.name, f"{text!r} must not start or end with a blank")
        return None
    parts = text.split("/")
    if any(p in (".", "..") for p in parts):
        # systemd refuses such paths at load time ("not normalized"); say so here.
        c.add(key.name, f"{text!r} must be a normalized path (no '.' or '..' parts)")
        return None
    return text


_GPU_UUID = r"(GPU|MIG)-[0-9A-Za-z/-]+"


def _read_gpus(c: _Checker, key: Key, value: object) -> int | tuple[int, ...] | tuple[str, ...] | None:
    if isinstance(value, bool):
        c.add(key.name, "must be a count, a list of indexes or a list of GPU UUIDs")
        return None
    if isinstance(value, int):
        if not 0 <= value <= 64:
            c.add(key.name, f"{value} is out of range 0..64")
            return None
        return value
    if isinstance(value, list) and value and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 64 for v in value
    ):
        if len(set(value)) != len(value):
            c.add(key.name, "lists a GPU twice")
            return None
        return tuple(int(v) for v in value)
    if isinstance(value, list) and value and all(
        isinstance(v, str) and fullmatch(_GPU_UUID, v) for v in value
    ):
        if len(set(value)) != len(value):
            c.add(key.name, "lists a GPU twice")
            return None
        return tuple(str(v) for v in value)
    c.add(key.name, "must be a count (gpus = 2), a list of indexes (gpus = [0, 1]) or a "
                    "list of UUIDs (gpus = [\"GPU-...\"])")
    return None


def _read_size(c: _Checker, key: Key, value: object) -> int | None:
    if not isinstance(value, str):
        c.add(key.name, f"must be a size like \"40GiB\", not {_kind(value)}")
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        c.add(key.name, str(exc))
        return None


_READERS: dict[Kind, Callable[[_Checker, Key, object], object]] = {
    Kind.TEXT: _read_text,
    Kind.CHOICE: _read_choice,
    Kind.INTEGER: _read_integer,
    Kind.BOOLEAN: _read_boolean,
    Kind.DURATION: _read_duration,
    Kind.WORDS: _read_words,
    Kind.ENV: _read_env,
    Kind.DIRECTIVES: _read_directives,
    Kind.PROGRAM: _read_program,
    Kind.PATH: _read_path,
    Kind.GPUS: _read_gpus,
    Kind.SIZE: _read_size,
}


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
    # Some Windows editors save UTF-8 with a byte order mark; TOML does not allow one.
    text = text.removeprefix("\ufeff")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(problems=[Problem(source, "", f"invalid TOML: {exc}")]) from None
    return from_mapping(data, source)


def from_mapping(data: dict[str, Any], source: str) -> InstanceSpec:
    """Validate a spec given as a mapping (parsed TOML, or JSON/YAML from elsewhere)."""
    c = _Checker(source)
    c.unknown_keys(data, top_keys(), "")
    values: dict[str, Any] = {}
    tables_ok: dict[str, dict[str, Any]] = {}
    for table, shown in TABLES.items():
        if table not in data:
            continue
        sub = data[table]
        if not isinstance(sub, dict):
            c.add(table, f"must be a table ({shown}), not {_kind(sub)}")
            continue
        c.unknown_keys(sub, sub_keys(table), f"{table}.")
        tables_ok[table] = sub
    for key in KEYS:
        table, _, leaf = key.name.rpartition(".")
        container = tables_ok.get(table, {}) if table else data
        if leaf in container:
            values[key.name] = _READERS[key.kind](c, key, container[leaf])
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


def _rules(c: _Checker, data: dict[str, Any], values: dict[str, Any]) -> None:
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
    backend = values.get("backend")
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
    command = values.get("command")
    if "command" in data and backend == "custom" and command is not None:
        if command == ():
            c.add("command", "must not be empty")
        else:
            _check_executable(c, "command[0]", command[0])
    elif "command" not in data and backend == "custom":
        c.add("command", "is required for backend 'custom': the server's argv, with "
                         "{host}/{port} or {unix} where it listens")
    activation = values.get("activation") or "eager"
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
    if "swap_drain" in data and "swap_group" not in data:
        c.add("swap_drain", "needs swap_group: it bounds how long a member finishes its "
                            "requests before another member of its group loads")
    env_names = {k for k, _ in values.get("env") or ()}
    for i, var in enumerate(values.get("secret_env") or ()):
        if var not in env_names:
            c.add(f"secret_env[{i}]", f"names {var}, which is not set in env")


def _build(source: str, values: dict[str, Any]) -> InstanceSpec:
    def get(name: str, default: Any = None) -> Any:  # noqa: ANN401 - typed by each key's reader
        value = values.get(name)
        return default if value is None else value

    watchdog = get("health.watchdog", DEFAULT_WATCHDOG)
    health = HealthSpec(path=get("health.path"),
                        timeout=get("health.timeout", DEFAULT_HEALTH_TIMEOUT),
                        watchdog=None if watchdog == OFF else watchdog)
    return InstanceSpec(
        source=source, name=values["name"], backend=BackendName(values["backend"]),
        model=get("model"), executable=get("executable"), host=get("host"), port=get("port"),
        args=get("args", ()), env=get("env", ()), secret_env=get("secret_env", ()),
        command=values.get("command"), socket_activation=get("socket_activation", False),
        activation=Activation(get("activation", "eager")), idle_stop=get("idle_stop"),
        health=health, user=get("user"), group=get("group"),
        working_directory=get("working_directory"),
        restart=RestartPolicy(get("restart", "on-failure")), private_port=get("private_port"),
        max_connections=get("max_connections", 1024), description=get("description"),
        api_key_env=get("api_key_env"), systemd_unit=get("systemd.unit", ()),
        systemd_service=get("systemd.service", ()), gpus=values.get("gpus"),
        gpu_memory=get("gpu_memory"), gpu_share=get("gpu_share", False),
        swap_group=get("swap_group"), swap_drain=get("swap_drain", DEFAULT_SWAP_DRAIN),
        hardening=get("hardening", True), offline=get("offline", False),
    )


def _check_executable(c: _Checker, key: str, value: str) -> bool:
    # systemd reads leading -@:+! on ExecStart= as flags, even inside quotes.
    if not value or value[0] in "-@:+!" or any(ord(ch) < 0x20 for ch in value):
        c.add(key, f"{value!r} must be an absolute path or a program name, without leading "
                   "'-@:+!' or control characters")
        return False
    if "/" in value and not value.startswith("/"):
        c.add(key, f"{value!r} must be an absolute path (or a bare program name found on PATH)")
        return False
    return True


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
