"""Every spec key, declared once.

Each :class:`Key` says what a key is (its kind, default, bounds, which backends
and activations it applies to, one line of documentation). That one list drives
reading (:mod:`unitgen.spec.readers`: one reader per kind), validation and the
construction of :class:`~unitgen.spec.model.InstanceSpec` (:mod:`unitgen.spec.model`:
every declared key becomes its field, its default the dataclass's), and what
:mod:`unitgen.spec.reference` derives: the reference table in ``docs/spec.md`` and
the JSON Schema that ``unitgen schema`` prints. Adding a key means one
entry here and its typed field on ``InstanceSpec`` (tests check that the two agree
and that a value set in a spec arrives there), the way mkosi declares one
``ConfigSetting`` per key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from unitgen.spec.backends import BackendName
from unitgen.spec.ports import DEFAULT_HOST, DEFAULT_PORT_RANGE, PRIVATE_PORT_RANGE

__all__ = [
    "DIRECTIVE_RE",
    "ENV_NAME_RE",
    "GPU_UUID_RE",
    "KEYS",
    "MAX_GPUS",
    "TABLES",
    "Activation",
    "Balance",
    "Ipc",
    "Key",
    "Kind",
    "Pull",
    "RestartPolicy",
    "by_name",
    "check_bounds",
    "default_of",
    "fullmatch",
    "span",
    "sub_keys",
    "top_keys",
]


class Activation(StrEnum):
    """When the server starts."""

    EAGER = "eager"
    ON_DEMAND = "on-demand"


class Balance(StrEnum):
    """How a gateway shares a route's requests among its replicas (docs/gateway.md)."""

    CONVERSATION = "conversation"  # the same conversation to the same replica, load bounded
    LEASTCONN = "leastconn"  # fewest requests in flight


class RestartPolicy(StrEnum):
    """systemd's ``Restart=`` values unitgen offers."""

    ON_FAILURE = "on-failure"
    ALWAYS = "always"
    ON_ABNORMAL = "on-abnormal"
    NO = "no"


class Pull(StrEnum):
    """When deploy pulls a container image (docs/containers.md)."""

    MISSING = "missing"
    NEVER = "never"


class Ipc(StrEnum):
    """The container's IPC namespace (podman ``--ipc``)."""

    PRIVATE = "private"
    HOST = "host"


class Kind(StrEnum):
    """How a key's value is read."""

    TEXT = "string"
    CHOICE = "choice"
    INTEGER = "integer"
    BOOLEAN = "boolean"
    DURATION = "time span"
    WORDS = "list of strings"
    ENV = "table of strings"
    DIRECTIVES = "table of directives"
    GPUS = "gpus"
    SIZE = "size"
    PROGRAM = "program"
    PATH = "absolute path"
    TABLES = "list of tables"  # read by its owner (a gateway's upstreams), not by READERS


@dataclass(frozen=True)
class Key:
    """One spec key. ``name`` is the TOML key (``health.timeout`` inside a table)."""

    name: str
    kind: Kind
    doc: str
    # The value the spec holds when the key is not set (None: unset, decided later),
    # as its reader returns it: the one place a default is written.
    default: Any = None
    default_doc: str = ""  # docs text for a default decided later ("per backend")
    required: bool = False
    choices: type[StrEnum] | None = None  # Kind.CHOICE: its values, read as members
    lo: float | None = None
    hi: float | None = None
    bounds_why: str = ""  # why the bounds are what they are, for messages and docs
    backends: tuple[str, ...] = ()  # empty: every backend
    only_why: str = ""  # message when used with another backend ({backend} is filled in)
    activation: Activation | None = None  # only with this activation (checked in model._rules)
    pattern: str = ""  # a regular expression the whole value must match
    pattern_doc: str = ""
    can_be_off: bool = False  # a duration that "off" (or false) turns off
    needs: str = ""  # another key that must be set for this one to mean anything

    @property
    def field(self) -> tuple[str, str]:
        """Where the value lands: (record, attribute). ``("health", "timeout")`` is
        ``spec.health.timeout``; ``("", "systemd_unit")`` is ``spec.systemd_unit``."""
        table, _, leaf = self.name.rpartition(".")
        if table in RECORDS:
            return table, leaf
        return "", self.name.replace(".", "_")

    @property
    def choice_values(self) -> tuple[str, ...]:
        """The values a choice may take, in declaration order."""
        return tuple(c.value for c in self.choices or ())


_DAY = 86400.0

# What values of some kinds look like: the readers check them, the schema says them.
ENV_NAME_RE = r"[A-Za-z_][A-Za-z0-9_]*"
DIRECTIVE_RE = r"[A-Z][A-Za-z0-9]*"  # keys of [systemd.*] look like systemd directives
GPU_UUID_RE = r"(GPU|MIG)-[0-9A-Za-z/-]+"
MAX_GPUS = 64  # a count up to this, indexes below it
_NAME_RE = r"[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?"  # instance and swap group names
_ACCOUNT_RE = r"[A-Za-z_][A-Za-z0-9_.-]{0,31}"
# An image reference as podman reads it (registry/name:tag@digest), never an option.
IMAGE_RE = r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,511}"
# HOST:CONTAINER[:ro|rw]: absolute paths without ':' or blanks (podman splits on ':').
VOLUME_RE = r"/[A-Za-z0-9_./+@=,-]*:/[A-Za-z0-9_./+@=,-]*(:(ro|rw))?"

# Tables whose keys make a record of their own on the spec (``spec.health.timeout``);
# a key of any other table is a field named after both (``spec.systemd_unit``).
RECORDS = ("health",)


def _range(port_range: tuple[int, int]) -> str:
    return f"from {port_range[0]}-{port_range[1]}"


KEYS: tuple[Key, ...] = (
    Key("name", Kind.TEXT, "instance name; units are `<name>.socket`, `<name>.service`, "
        "`<name>-backend.service`", required=True,
        pattern=_NAME_RE,
        pattern_doc="must be 1-48 lowercase letters, digits or '-', not starting or ending "
                    "with '-'"),
    Key("backend", Kind.CHOICE, "the model server", required=True,
        choices=BackendName),
    Key("model", Kind.TEXT, "model path or id (required except for `custom`)"),
    Key("description", Kind.TEXT, "free text shown in the units' `Description=`"),
    Key("executable", Kind.PROGRAM, "the server program: an absolute path, or a bare name found "
        "on the manager's PATH (with `image`: the image's)", default_doc="per backend"),
    Key("host", Kind.TEXT, "public listen address, an IP literal (`0.0.0.0`, `::`); loopback "
        "by default: exposing a model is a decision to write down",
        default_doc=f"`{DEFAULT_HOST}`"),  # the port rules apply it: args may say another
    Key("port", Kind.INTEGER, "public port, owned by the socket",
        default_doc=_range(DEFAULT_PORT_RANGE), lo=1, hi=65535),
    Key("args", Kind.WORDS, "extra server arguments (numbers are written as text)",
        default=()),
    Key("env", Kind.ENV, "environment variables (`NAME = \"value\"`)", default=()),
    Key("secret_env", Kind.WORDS, "names of variables in `env` whose values are secrets: kept "
        "in a 0600 file, never in a unit, `systemctl show` or argv", default=()),
    Key("command", Kind.WORDS, "the server's argv with placeholders (`{host}`, `{port}`, "
        "`{unix}`, ...)", backends=("custom",),
        only_why="backend {backend!r} builds its own command line (use args for extra "
                 "arguments)"),
    Key("socket_activation", Kind.BOOLEAN, "the program takes its listening socket from "
        "systemd (fd 3); no proxy", default=False, backends=("custom",),
        only_why="{backend!r} cannot take its listening socket from systemd"),
    Key("activation", Kind.CHOICE, "`eager`: started by deploy and at boot; `on-demand`: the "
        "first connection starts it", default=Activation.EAGER, choices=Activation),
    Key("idle_stop", Kind.DURATION, "stop the model after this long without connections; the "
        "socket keeps listening", activation=Activation.ON_DEMAND, lo=1, hi=365 * _DAY,
        bounds_why="below a second the model stops between a client's request and its "
                   "next one, and proxyd counts whole seconds; longer than a year is a typo"),
    Key("health.path", Kind.TEXT, "readiness path", default_doc="per backend",
        pattern=r"/[\x21-\x7e]*",
        pattern_doc="must start with '/' and contain no spaces or control characters"),
    # A 70B model in bf16 is ~140 GB; from a network disk at 200 MB/s plus CUDA
    # graph capture and warm-up that is 15 to 20 minutes. 30 minutes leaves room
    # without letting a wedged server sit in "starting" for ever.
    Key("health.timeout", Kind.DURATION, "start deadline (a 70B model loads in 15-20 min)",
        default=1800.0, lo=1, hi=7 * _DAY,
        bounds_why="a start deadline beyond a week would leave a wedged server "
                   "'starting' for ever"),
    # Three checks of 10 s each.
    Key("health.watchdog", Kind.DURATION, "after ready, restart a server that has not answered "
        "its health path for this long (`\"off\"`: never); a slow request does not count",
        default=30.0, lo=3, hi=_DAY, can_be_off=True,
        bounds_why="the checker asks every third of it; longer than a day is a typo"),
    Key("user", Kind.TEXT, "run the server as this user (system manager)",
        pattern=_ACCOUNT_RE, pattern_doc="is not a valid user or group name"),
    Key("group", Kind.TEXT, "run the server with this group (system manager)",
        pattern=_ACCOUNT_RE, pattern_doc="is not a valid user or group name"),
    Key("working_directory", Kind.PATH, "the server's working directory"),
    Key("restart", Kind.CHOICE, "systemd `Restart=`", default=RestartPolicy.ON_FAILURE,
        choices=RestartPolicy),
    Key("private_port", Kind.INTEGER, "loopback port for servers that cannot listen on a Unix "
        "socket", default_doc=_range(PRIVATE_PORT_RANGE), lo=1, hi=65535),
    Key("max_connections", Kind.INTEGER, "`systemd-socket-proxyd --connections-max`",
        default=1024, lo=1, hi=1_000_000),
    Key("api_key_env", Kind.TEXT, "the variable in `env` that holds the server's API key",
        backends=("custom",),
        only_why="{backend!r} has a known key option (put it in args or env)",
        pattern=ENV_NAME_RE, pattern_doc="is not an environment variable name"),
    Key("systemd.unit", Kind.DIRECTIVES, "extra `[Unit]` directives for the server's unit",
        default=()),
    Key("systemd.service", Kind.DIRECTIVES, "extra `[Service]` directives for the server's "
        "unit (`Nice = \"5\"`); directives unitgen owns are refused", default=()),
    Key("gpus", Kind.GPUS, "a count, a list of indexes, or a list of GPU UUIDs"),
    Key("gpu_memory", Kind.SIZE, "memory needed on each GPU (`\"40GiB\"`)"),
    Key("gpu_share", Kind.BOOLEAN, "allow other instances on the same GPUs", default=False),
    Key("swap_group", Kind.TEXT, "members of one group take turns on the GPU: a request to a "
        "stopped member waits while the running one drains and stops (docs/swap.md)",
        activation=Activation.ON_DEMAND, pattern=_NAME_RE,
        pattern_doc="must be 1-48 lowercase letters, digits or '-'"),
    # Long enough for a long generation, short enough that a member that keeps
    # receiving requests cannot starve the others.
    Key("swap_drain", Kind.DURATION, "how long a member may finish what it serves before the "
        "next member of its swap group or GPU pool loads", default=180.0, lo=1, hi=_DAY,
        bounds_why="a member that keeps receiving requests must not hold the GPU for ever"),
    Key("gpu_pool", Kind.BOOLEAN, "an on-demand instance with `gpus` shares them by memory "
        "with the other on-demand instances there: loaded beside them while it fits, making "
        "room when it must (docs/swap.md); `false`: its GPUs are its own",
        default=True, activation=Activation.ON_DEMAND),
    # Long enough that a load is not wasted on a request or two, short enough
    # that a waiting member is not kept from its GPUs for long.
    Key("pool_min_turn", Kind.DURATION, "a GPU pool member, once loaded, keeps its GPUs this "
        "long before another member may make it yield", default=5.0, lo=0, hi=60.0,
        activation=Activation.ON_DEMAND,
        bounds_why="a longer turn keeps every waiting member from its GPUs that long"),
    Key("pool_sleep", Kind.BOOLEAN, "a GPU pool member whose server can sleep (vLLM, SGLang) "
        "is put to sleep instead of stopped when it makes room, host RAM allowing; its "
        "server is started with the flags that allow it", default=True,
        activation=Activation.ON_DEMAND),
    Key("hardening", Kind.BOOLEAN, "system scope: sandbox the server (docs/reliability.md lists "
        "the directives and what each opt-out costs)", default=True),
    Key("offline", Kind.BOOLEAN, "the server needs no network (a local model): "
        "`PrivateNetwork=yes` where it listens on a Unix socket", default=False),
    Key("gateway", Kind.TEXT, "the gateway (a spec with `kind = \"gateway\"`) that routes "
        "requests to this instance by their `model` (docs/gateway.md)", pattern=_NAME_RE,
        pattern_doc="must be a gateway's name: 1-48 lowercase letters, digits or '-'"),
    Key("aliases", Kind.WORDS, "more names the gateway routes to this instance (instances "
        "that share a name are replicas)", default=(),
        pattern=r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}",
        pattern_doc="must be a model name without blanks or control characters (letters, "
                    "digits and ._:/@+-, at most 200)"),
    Key("max_concurrent", Kind.INTEGER, "at the gateway: requests this instance takes at "
        "once; the rest wait in the gateway's queue", lo=1, hi=100_000),
    Key("balance", Kind.CHOICE, "at the gateway: how its replicas share requests: "
        "`conversation` (a conversation stays on one replica, whose prompt cache holds it; "
        "none takes more than 1.5x its share in flight; a full or down one passes its turn) "
        "or `leastconn` (fewest in flight); replicas must agree", default=Balance.CONVERSATION,
        choices=Balance),
    Key("image", Kind.TEXT, "run the server in a container from this image, with podman; "
        "the socket still owns the port (docs/containers.md)", pattern=IMAGE_RE,
        pattern_doc="must be an image reference (registry/name:tag), without blanks or a "
                    "leading '-'"),
    Key("volumes", Kind.WORDS, "host paths bound into the container: `HOST:CONTAINER[:ro]` "
        "(a model cache, say)", default=(), needs="image", pattern=VOLUME_RE,
        pattern_doc="must be HOST:CONTAINER or HOST:CONTAINER:ro with absolute paths "
                    "(letters, digits and _./+@=,-)"),
    Key("pull", Kind.CHOICE, "`missing`: deploy pulls the image when it is not on the host; "
        "`never`: a missing image is an error", default=Pull.MISSING, choices=Pull,
        needs="image"),
    # A vLLM image is ~10 GB: at 20 MB/s that is under 10 minutes. Apart from the
    # [health] timeout, which is about loading the model, not fetching the image.
    Key("pull_timeout", Kind.DURATION, "how long deploy may spend pulling the image",
        default=1800.0, lo=10, hi=_DAY, needs="image",
        bounds_why="an image that takes a day to pull will not arrive"),
    Key("shm_size", Kind.SIZE, "the container's /dev/shm (podman `--shm-size`; PyTorch's "
        "data loaders and NCCL need more than the default 64 MB)", needs="image"),
    Key("ipc", Kind.CHOICE, "the container's IPC namespace (`host`: what vLLM's docs suggest "
        "for tensor parallel without a large shm_size)", default=Ipc.PRIVATE, choices=Ipc,
        needs="image"),
    Key("podman_args", Kind.WORDS, "more `podman run` options, as written (`--tmpfs=/x`); "
        "the ones unitgen sets itself are refused", default=(), needs="image"),
    Key("queue_timeout", Kind.DURATION, "at the gateway: how long a request may wait for a "
        "free slot (`max_concurrent`) before it gets 429", default=60.0, lo=1, hi=_DAY,
        bounds_why="a request queued longer than a day has been given up on"),
)

# Keys that are tables of keys, with the word a wrong type is told to use.
TABLES = {"health": "[health]", "systemd": "[systemd.service]"}


def top_keys() -> tuple[str, ...]:
    """Top-level key names, in declaration order (tables once)."""
    out: list[str] = []
    for key in KEYS:
        top = key.name.split(".", 1)[0]
        if top not in out:
            out.append(top)
    return tuple(out)


def sub_keys(table: str) -> tuple[str, ...]:
    """The keys inside ``[table]``."""
    return tuple(k.name.split(".", 1)[1] for k in KEYS if k.name.startswith(table + "."))


def by_name(name: str) -> Key:
    """The declaration of one key."""
    for key in KEYS:
        if key.name == name:
            return key
    raise KeyError(name)


def default_of(name: str) -> Any:  # noqa: ANN401 - each key's default has its own type
    """The declared default of one key (for the dataclass field that holds it)."""
    key = by_name(name)
    if key.required:
        raise KeyError(f"{name} is required: it has no default")
    return key.default


def check_bounds(key: Key, seconds: float) -> str | None:
    """Why a duration is out of the key's bounds, or None."""
    if not math.isfinite(seconds):
        return "must be a finite time span"
    if key.lo is not None and seconds < key.lo:
        return f"{span(seconds)} is shorter than {span(key.lo)}: {key.bounds_why}"
    if key.hi is not None and seconds > key.hi:
        return f"{span(seconds)} is longer than {span(key.hi)}: {key.bounds_why}"
    return None


def span(seconds: float) -> str:
    """Seconds as the docs and messages show them: ``30min``, ``3d``, ``1.5s``."""
    for unit, size in (("d", _DAY), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def fullmatch(pattern: str, value: str) -> bool:
    """``re.fullmatch``: ``$`` in ``re.match`` accepts a trailing newline."""
    return re.fullmatch(pattern, value) is not None
