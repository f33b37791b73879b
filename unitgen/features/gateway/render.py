"""A gateway's HAProxy configuration and the files it answers with, from its
routing plan (:mod:`unitgen.features.gateway.plan`). Target-independent: the systemd and
the supervisor targets install the same files and differ only in who holds the
gateway's socket (passed to HAProxy as fd 3 either way).

Every value reaches the configuration through a filter (``q``: a single-quoted
word, ``num``, ``ident``, ``address``, ``comment``); the Jinja environment
refuses a bare one (:func:`unitgen.targets.base.strict_environment`, as for
the other targets)."""

from __future__ import annotations

import functools
import json
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from unitgen.features.gateway.patterns import ONE_MODEL_RE, ROUTED_PATHS
from unitgen.features.gateway.plan import BALANCE_FACTOR, GatewaySettings, Route
from unitgen.inunit.gwkeys import MAPS, MEMBER_KEYS, METRICS_KEYS
from unitgen.targets.base import MARKER, RenderedFile, strict_environment

if TYPE_CHECKING:
    import jinja2

__all__ = ["FILES", "MEMBER_KEYS", "PROMPT_PREFIX", "SESSION_HEADER", "GatewayPaths",
           "member_keys_map", "render_gateway"]

# the files a gateway's configuration names, in its directory
FILES = {
    "routes": "routes.map", "models": "models.json", "e400": "400.json", "e401": "401.json",
    "e404": "404.json", "e404path": "404-path.json", "e413": "413.json", "e429": "429.http",
    "e400twice": "400-model-twice.json", "e408": "408.http", "one_model": "one-model.re",
    # what a key's policy answers (api_keys_file): its own list and 404, its 429s
    "models_key": "models-key.lf", "e404key": "404-key.lf", "e429rate": "429-rate.json",
    "e429flight": "429-in-flight.json",
    # the page, the counters per key and their JSON for status (unitgen.lua.j2)
    "lua": "unitgen.lua",
}
CONFIG = "haproxy.cfg"
# What names a conversation, first found first (docs/gateway.md, "Replicas"): a
# header a client may send, then the body's prompt_cache_key, user, the start of
# its prompt. A completion's prompt (or an input) grows with the conversation:
# its first bytes name it.
SESSION_HEADER = "x-session-id"
PROMPT_PREFIX = 256


@dataclass(frozen=True)
class GatewayPaths:
    """Where a gateway's files are on the host (absolute: HAProxy reads them)."""

    directory: str  # its configuration directory
    # its runtime directory: the admin socket, and the keys as HAProxy reads them
    # (maps that unitgen.inunit.gwkeys makes from the keys files at start and reload)
    runtime: str


def _q(value: object) -> str:
    text = str(value)
    if "'" in text or any(ord(c) < 32 or ord(c) == 127 for c in text) or not text:
        raise ValueError(f"{text!r} cannot be written in an HAProxy configuration")
    return f"'{text}'"


def _num(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{value!r} is not a number")
    return str(round(value)) if isinstance(value, float) else str(value)


def _ident(value: object) -> str:
    text = str(value)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]*", text):
        raise ValueError(f"{text!r} is not an HAProxy name")
    return text


def _address(value: object) -> str:
    text = str(value)
    if not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[0-9.]+):[0-9]{1,5}", text):
        raise ValueError(f"{text!r} is not host:port")
    return text


def _comment(value: object) -> str:
    return "".join(c if c.isprintable() else "?" for c in str(value))


def _lua(value: object) -> str:
    """A Lua string literal: every byte but plain printable ASCII as ``\\ddd``."""
    return '"' + "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else
                         "".join(f"\\{b:03d}" for b in c.encode()) for c in str(value)) + '"'


_FILTERS: dict[str, Callable[[object], str]] = {
    "q": _q, "num": _num, "ident": _ident, "address": _address, "comment": _comment,
    "lua": _lua,
}


@functools.cache
def _environment() -> jinja2.Environment:
    return strict_environment("haproxy", _FILTERS)


def _error(status: int, kind: str, message: str) -> str:
    """An OpenAI-style error body."""
    return json.dumps({"error": {"message": message, "type": kind, "code": status,
                                 "param": None}}) + "\n"


def render_gateway(settings: GatewaySettings, routes: list[Route], paths: GatewayPaths,
                   keyed: set[str] | frozenset[str] = frozenset()) -> list[RenderedFile]:
    """``haproxy.cfg`` and the files it names (all in the gateway's directory).
    ``keyed``: the backends whose members have an API key of their own (in
    :data:`MEMBER_KEYS`); with ``api_keys_file`` they get it instead of the
    client's key."""
    names = sorted(n for r in routes for n in r.names)
    files = {k: f"{paths.directory}/{v}" for k, v in FILES.items()}
    keymaps = {k: f"{_lf_path(paths.runtime)}/{v}" for k, v in MAPS.items()}
    values = {
        "name": settings.name, "maxconn": settings.max_connections,
        # HAProxy keeps a part of each buffer for rewrites (tune.maxrewrite, 1024 by
        # default above 2 KiB buffers): the body may fill the rest
        "bufsize": settings.max_body + 1024 + 16384,
        "admin_socket": f"{paths.runtime}/admin.sock",
        "client_timeout": settings.client_timeout, "request_timeout": settings.request_timeout,
        "per_client": settings.per_client, "paths": ROUTED_PATHS,
        "default_wait": max([r.wait for r in routes] or [60.0]),
        "keys": bool(settings.api_keys_file), "keymaps": keymaps,
        "metrics": bool(settings.metrics),
        "metrics_keys": f"{paths.runtime}/{METRICS_KEYS}" if settings.metrics_keys_file else "",
        "member_keys": f"{paths.runtime}/{MEMBER_KEYS}",
        "keyed": keyed if settings.api_keys_file else frozenset(),
        "files": files, "routes": routes,
        "session_header": SESSION_HEADER, "prefix": PROMPT_PREFIX, "factor": BALANCE_FACTOR,
        # a replica's part of its score: its name's, so the same in every reload
        "seeds": {m.instance: zlib.crc32(m.instance.encode()) for r in routes
                  for m in r.members},
    }
    cfg = _environment().get_template("gateway.cfg.j2").render(values)
    lua = _environment().get_template("unitgen.lua.j2").render(values)
    listing = ", ".join(names) if names else "none yet"
    models = {"object": "list", "data": [
        {"id": n, "object": "model", "created": 0, "owned_by": "unitgen"} for n in names]}
    bodies = {
        "routes": "".join(f"{n} {r.backend}\n" for r in routes for n in r.names),
        "models": json.dumps(models, indent=1) + "\n",
        "e400": _error(400, "invalid_request_error", "the request has no \"model\": say which "
                       f"model to use (here: {listing})"),
        "e401": _error(401, "authentication_error", "no valid API key: send Authorization: "
                       "Bearer <key>"),
        "e404": _error(404, "not_found_error", f"no such model here; the models are: {listing}"),
        "e404path": _error(404, "not_found_error", "not an endpoint of this gateway: POST "
                           "a request with a \"model\" to " + ", ".join(ROUTED_PATHS)
                           + "; or GET /v1/models"),
        "e400twice": _error(400, "invalid_request_error", "the request body must be a JSON "
                            "object that names its \"model\" once (at most 200 levels deep)"),
        "e413": _error(413, "invalid_request_error", f"the request body is larger than "
                       f"{settings.max_body} bytes, the most this gateway reads to find its "
                       "\"model\"; raise max_body in the gateway's spec"),
        "e429": _http(429, "Too Many Requests", _error(
            429, "rate_limit_error", "the model's requests in flight are at its bound "
            "(max_concurrent) and this one waited longer than its queue timeout")),
        "e408": _http(408, "Request Timeout", _error(
            408, "invalid_request_error", f"the request was not sent whole within "
            f"{settings.request_timeout:g} s (the gateway's request_timeout)")),
        "one_model": ONE_MODEL_RE + "\n",
        "lua": lua,
        # log-format files: a key's own list and its 404 come from its name's maps
        "models_key": f"%[var(txn.kname),map({keymaps['listing']})]\n",
        "e404key": _error(404, "not_found_error", "no such model for this API key; its models "
                          f"are: %[var(txn.kname),map({keymaps['names']})]"),
        "e429rate": _error(429, "rate_limit_error", "this API key sent as many requests in the "
                           "last minute as its rpm (the gateway's keys file) lets it: retry "
                           "later"),
        "e429flight": _error(429, "rate_limit_error", "this API key has as many requests in "
                             "flight as its in_flight (the gateway's keys file) lets it: retry "
                             "when one has been answered"),
    }
    out = [RenderedFile(CONFIG, f"{cfg}")]
    out += [RenderedFile(FILES[k], text) for k, text in bodies.items()]
    return out


def _lf_path(path: str) -> str:
    """A directory a log-format expression names unquoted (``map(PATH)``)."""
    if not re.fullmatch(r"/[A-Za-z0-9/._@+-]*", path) or "%" in path:
        raise ValueError(f"{path!r} cannot be named in an HAProxy log-format expression: the "
                         "gateway's runtime directory may hold letters, digits and /._@+- only")
    return path


def member_keys_map(name: str, keys: dict[str, str]) -> str:
    """The keys gateway ``name`` sends its members, as the HAProxy map file
    :data:`MEMBER_KEYS` (``backend Bearer KEY`` lines). A secret: mode 0600."""
    lines = [f"# The API keys gateway {name} sends its members; mode 0600. Generated: do not "
             "edit.", f"{MARKER}{name}", *(f"{b} Bearer {k}" for b, k in sorted(keys.items()))]
    return "\n".join(lines) + "\n"


def _http(status: int, reason: str, body: str) -> str:
    """A whole HTTP response, as HAProxy's ``errorfile`` wants it."""
    data = body.encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\ncache-control: no-cache\r\n"
            f"connection: close\r\n\r\n{body}")
