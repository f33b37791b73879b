"""The port rules: one public port, one owner.

The public address is written once (``host``/``port`` in the spec, or adopted
from an unambiguous ``--port``/``--host`` in ``args``/``env``); the server never
binds it. Whatever in the server's arguments or environment would move its
listen address is caught here, in every spelling, and either adopted (when it
agrees) or refused with both values named.

Policy (documented in docs/spec.md):

* ``--port N`` (any spelling) or a port variable with no ``port`` key: N becomes
  the public port, with a notice; the option is removed from the server's argv.
* the same N as ``port``: removed, with a notice.
* a different N from ``port``, or two different values: an error naming both.
* a bare ``--port`` without a value, or a value that is not a port: an error.
* ``--host`` the same way; a host that is a Unix socket path, and options that
  choose the server's own endpoint (``--uds``): always an error, because the
  private endpoint belongs to unitgen.

Nothing here knows about systemd: the supervisor target uses the same rules.
"""

from __future__ import annotations

import ipaddress
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from unitgen.errors import Problem
from unitgen.spec.argscan import EXACT, find_misspelled, find_options, remove_found
from unitgen.spec.backends import GENERIC_LISTEN_FLAGS, Backend

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT_RANGE",
    "PRIVATE_PORT_RANGE",
    "UNPRIVILEGED_PRIVATE_PORT_RANGE",
    "ListenDecision",
    "default_port",
    "default_private_port",
    "private_range_for",
    "probe_host",
    "resolve_listen",
]

# Public ports for specs without one: just below Linux's ephemeral range
# (32768-60999), whose ports outgoing connections take at random (seen: a
# socket unit failed to bind 40162, held by a connection), and above the usual
# defaults of model servers (8000, 8080, 30000). deploy skips ports in use.
DEFAULT_PORT_RANGE = (31000, 31999)
# Private loopback ports for servers that cannot listen on a Unix socket
# (SGLang, vox-box, custom). They are below ip_unprivileged_port_start (1024), so
# while the server is down (on-demand, idle-stopped, restarting) no unprivileged
# local user can bind one and receive the probe's API key or the clients'
# traffic: only root or a process given CAP_NET_BIND_SERVICE (the server, by
# its unit) can serve it. 700-999 avoids the common low ports (22, 80, 443,
# 631); deploy still skips any that is in use.
PRIVATE_PORT_RANGE = (700, 999)
# For a user manager that does not run as root, which cannot bind those: the
# probe's listener check (``--own-listener``) is then the only guard.
UNPRIVILEGED_PRIVATE_PORT_RANGE = (20000, 29999)
# Loopback unless the spec says otherwise: exposing a model server to the
# network is a decision the operator writes down (host = "0.0.0.0").
DEFAULT_HOST = "127.0.0.1"


def _spread(name: str, lo: int, hi: int) -> int:
    return lo + zlib.crc32(name.encode()) % (hi - lo + 1)


def default_port(name: str) -> int:
    """The public port a spec without ``port`` renders with: stable per name."""
    return _spread(name, *DEFAULT_PORT_RANGE)


def private_range_for(scope: str) -> tuple[int, int]:
    """Where private loopback ports come from for a manager: privileged ports
    (only root can bind them) wherever the manager runs as root."""
    if scope == "system" or os.geteuid() == 0:
        return PRIVATE_PORT_RANGE
    return UNPRIVILEGED_PRIVATE_PORT_RANGE


def default_private_port(name: str, port_range: tuple[int, int] = PRIVATE_PORT_RANGE) -> int:
    """The loopback port a TCP-only server listens on behind the proxy: stable per name."""
    return _spread(name, *port_range)


def probe_host(host: str) -> str:
    """Where a local probe connects to reach a socket bound to ``host``."""
    addr = ipaddress.ip_address(host)
    if addr.is_unspecified:
        return "::1" if addr.version == 6 else "127.0.0.1"
    return host


@dataclass(frozen=True)
class ListenDecision:
    """The outcome of the port rules for one instance."""

    host: str
    port: int
    port_from_spec: bool  # False: chosen by default (deploy may allocate another)
    args: tuple[str, ...]  # server args with the adopted options removed
    env: tuple[tuple[str, str], ...]  # environment with the adopted variables removed
    notices: tuple[str, ...]
    problems: tuple[Problem, ...]


def resolve_listen(
    *,
    source: str,
    name: str,
    backend: Backend,
    spec_host: str | None,
    spec_port: int | None,
    args: tuple[str, ...],
    env: tuple[tuple[str, str], ...],
    command: tuple[str, ...] | None = None,
) -> ListenDecision:
    """Apply the port rules; see the module docstring for the policy."""
    problems: list[Problem] = []
    notices: list[str] = []

    def problem(key: str, message: str) -> None:
        problems.append(Problem(source, key, message))

    if backend.name == "custom":
        _check_custom(source, "command", command or (), problems)
        _check_custom(source, "args", args, problems)
    _refuse(backend, args, env, problem)

    syntax = backend.syntax
    env_names = dict(env)
    port_hits = find_options(args, backend.port_flags, syntax)
    host_hits = find_options(args, backend.host_flags, syntax)
    kept_args = remove_found(args, port_hits + host_hits)
    port_vars = [(k, env_names[k]) for k in backend.port_env if k in env_names]
    host_vars = [(k, env_names[k]) for k in backend.host_env if k in env_names]
    drop_env = {k for k, _ in port_vars + host_vars}
    kept_env = tuple((k, v) for k, v in env if k not in drop_env)

    # (where, shown, value) for every place that names a port / host
    port_claims = [("args", f.shown(), f.value) for f in port_hits] + [
        (f"env.{k}", f"{k}={v}", v) for k, v in port_vars
    ]
    host_claims = [("args", f.shown(), f.value) for f in host_hits] + [
        (f"env.{k}", f"{k}={v}", v) for k, v in host_vars
    ]

    port = _decide("port", spec_port, port_claims, _parse_port, problem, notices)
    for key, shown, value in host_claims:
        if value is not None and (value.endswith(".sock") or value.startswith("/")):
            problem(key, f"{shown} is not allowed: the server's own endpoint belongs to unitgen "
                         "(it listens on a private socket; the public one is host/port)")
    host_claims = [c for c in host_claims if not (c[2] or "").endswith(".sock")
                   and not (c[2] or "").startswith("/")]
    host = _decide("host", spec_host, host_claims, _parse_host, problem, notices)

    if spec_host is not None and _parse_host(spec_host) is None:
        scope = " without an IPv6 scope ID (%...)" if "%" in spec_host else ""
        problem("host", f"{spec_host!r} must be an IP address{scope} such as 127.0.0.1, 0.0.0.0 "
                        "or :: (systemd binds the socket before any name can be resolved)")

    final_port = port if port is not None else default_port(name)
    final_host = (_parse_host(host) or host) if host is not None else DEFAULT_HOST
    return ListenDecision(
        host=final_host,
        port=final_port,
        port_from_spec=port is not None,
        args=kept_args,
        env=kept_env,
        notices=tuple(notices),
        problems=tuple(problems),
    )


def _refuse(backend: Backend, args: tuple[str, ...], env: tuple[tuple[str, str], ...],
            problem: Callable[[str, str], None]) -> None:
    """What the server must never be given: options it would misread, TLS, its own
    endpoint."""
    syntax = backend.syntax
    if backend.name != "custom":
        # a spelling the server does not read (--api_key for SGLang) or reads in a way
        # unitgen does not take (vLLM's --api-key.x) would keep its value in the unit
        watched = (*backend.port_flags, *backend.host_flags, *backend.endpoint_flags,
                   *(flag for flag, _ in backend.refused_flags), *backend.key_flags)
        for f in find_misspelled(args, watched, syntax):
            problem("args", f"{f.spelled.partition('=')[0]} is not allowed: {f.why}; write "
                            f"{f.flag}")
    for flag, why in backend.refused_flags:
        for f in find_options(args, (flag,), syntax):
            problem("args", f"{f.shown()} is not supported: {why}")
    env_names = dict(env)
    for var, why in backend.refused_env:
        if var in env_names:
            problem(f"env.{var}", f"is not supported: {why}")
    for f in find_options(args, backend.endpoint_flags, syntax):
        problem("args", f"{f.shown()} is not allowed: the server's own endpoint belongs to "
                        "unitgen (it listens privately and the socket owns the public port)")


T = TypeVar("T", int, str)


def _parse_port(value: str) -> int | None:
    if not value.isdigit():
        return None
    port = int(value)
    return port if 1 <= port <= 65535 else None


def _parse_host(value: str) -> str | None:
    # No IPv6 scope IDs ("fe80::1%eth0"): Python accepts any text after the "%",
    # newlines included, and systemd would read it as a specifier. Bind a
    # link-local address with a plain address instead.
    if "%" in value:
        return None
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        return None


def _decide(
    key: str,
    spec_value: T | None,
    claims: list[tuple[str, str, str | None]],
    parse: Callable[[str], T | None],
    problem: Callable[[str, str], None],
    notices: list[str],
) -> T | None:
    """Combine the spec's value with what args/env claim, per the policy."""
    parsed: list[tuple[str, str, T]] = []
    for where, shown, raw in claims:
        if raw is None:
            problem(where, f"{shown}: the option needs a value; the {key} is set once, with "
                           f"{key} = ... in the spec")
            continue
        value = parse(raw)
        if value is None:
            problem(where, f"{shown}: {raw!r} is not a valid {key}")
            continue
        parsed.append((where, shown, value))
    if not parsed:
        return spec_value
    if spec_value is not None:
        spec_norm = parse(str(spec_value))
        for where, shown, value in parsed:
            if value != spec_norm:
                problem(where, f"{shown} conflicts with {key} = {_show(spec_value)}; the {key} "
                               "is written once: remove one of them")
                return spec_value
        for where, shown, _ in parsed:
            notices.append(f"{where}: {shown} repeats {key} = {_show(spec_value)}; removed from "
                           "the server's options (the socket owns it)")
        return spec_value
    values = {v for _, _, v in parsed}
    if len(values) > 1:
        listed = " and ".join(shown for _, shown, _ in parsed)
        problem(parsed[1][0], f"{listed} disagree; set {key} = ... once in the spec")
        return None
    where, shown, value = parsed[0]
    notices.append(f"{where}: {shown} taken as the public {key}; the socket owns it and the "
                   "server listens on a private endpoint behind it")
    return value


def _show(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def _check_custom(
    source: str, key: str, argv: tuple[str, ...], problems: list[Problem]
) -> None:
    """A custom command must listen where unitgen says ({port}, {host}, {unix})."""
    # unitgen does not know a custom program's parser: exact names, as it always has
    for f in find_options(argv, GENERIC_LISTEN_FLAGS, EXACT):
        if f.value is not None and "{" in f.value:
            continue  # a placeholder: unitgen fills it in
        problems.append(Problem(source, key, f"{f.shown()} fixes the server's own listen "
                                "address; use {host}/{port} or {unix} so it listens where the "
                                "proxy forwards, and set the public port with port = ..."))
